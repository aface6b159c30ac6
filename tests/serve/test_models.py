"""pipelines/serve/models.py and the committed model repository: what the Triton models in serving/ do, minus
Triton (settings, decoding, batching), and their configs agree with pipelines/serve/names.py."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from tritonclient.grpc import model_config_pb2

from pipelines.config import REPO_ROOT
from pipelines.data import DecodeError, ImageFolderDataset, ImageRecord, decode
from pipelines.serve import models, names, repository
from pipelines.siglip import SO400M_PREPROCESSOR, Preprocess

SERVING = REPO_ROOT / "serving"


# The image models' inputs (each other model's own test file checks its config the same way).
IMAGE_INPUTS = {names.SIGLIP: (names.PIXEL_VALUES, "TYPE_FP32", [3, 384, 384]),
                names.EMBED_IMAGE: (names.IMAGE, "TYPE_STRING", [1])}


@pytest.mark.parametrize("model", IMAGE_INPUTS)
def test_config_agrees_with_names(model):
    config = repository.read_config(SERVING / model / "config.pbtxt")
    assert config.name == model and config.backend == "python"
    [tensor_in], [tensor_out] = config.input, config.output  # the seed's clients read outputs[0]
    expected_in = IMAGE_INPUTS[model]
    assert (tensor_in.name, model_config_pb2.DataType.Name(tensor_in.data_type), list(tensor_in.dims)) == expected_in
    assert model_config_pb2.DataType.Name(tensor_out.data_type) == "TYPE_FP32"
    assert tensor_out.name == names.EMBEDDING and list(tensor_out.dims) == [-1]
    assert config.max_batch_size >= 64 and config.HasField("dynamic_batching")
    assert {names.PARAM_MODEL, names.PARAM_REVISION} <= set(config.parameters)
    assert (SERVING / model / "1" / "model.py").is_file()


def test_the_launcher_serves_every_model_of_the_repository():
    # names.MODELS is the one list the launcher renders, loads and watches: a model folder left out of it would
    # be copied but never loaded.
    assert sorted(names.MODELS) == sorted(path.parent.name for path in SERVING.glob("*/config.pbtxt"))
    assert len(set(names.MODELS)) == len(names.MODELS)


def test_embed_image_batches_fit_siglip():
    siglip = repository.read_config(SERVING / names.SIGLIP / "config.pbtxt")
    embed_image = repository.read_config(SERVING / names.EMBED_IMAGE / "config.pbtxt")
    assert embed_image.max_batch_size <= siglip.max_batch_size  # one BLS request per execute() must fit
    assert {names.PARAM_DTYPE, names.PARAM_DEVICE, names.PARAM_THREADS} <= set(siglip.parameters)


def test_model_settings_follow_the_instance():
    config = {"name": "siglip", "parameters": {"name_or_path": {"string_value": "/ckpt"},
                                                "revision": {"string_value": ""},
                                                "num_threads": {"string_value": "3"}}}
    gpu = models.model_settings(config, instance_kind="GPU", device_id=2)
    assert (gpu.name_or_path, gpu.revision, gpu.dtype, gpu.device, gpu.num_threads) == ("/ckpt", None, "auto",
                                                                                        "cuda:2", 3)
    assert models.model_settings(config, instance_kind="CPU", device_id=0).device == "cpu"
    config["parameters"]["device"] = {"string_value": "cpu"}
    assert models.model_settings(config, instance_kind="GPU", device_id=0).device == "cpu"
    with pytest.raises(ValueError, match="name_or_path"):
        models.model_settings({"name": "siglip", "parameters": {}}, instance_kind="CPU", device_id=0)
    assert models.resolve_threads("auto") >= 1
    with pytest.raises(ValueError, match="num_threads"):
        models.resolve_threads("0")


def in_process_decode_many(preprocess: Preprocess, max_pixels: int | None = None):
    """What IsolatedDecoder.decode_many returns, computed in this process."""

    def decode_many(blobs: list[bytes]) -> list[torch.Tensor | DecodeError]:
        out: list[torch.Tensor | DecodeError] = []
        for blob in blobs:
            try:
                out.append(preprocess.resize(decode(blob, max_pixels=max_pixels)))
            except DecodeError as exc:
                out.append(exc)
        return out

    return decode_many


def test_decode_requests_equals_the_offline_loader(tmp_path, photo_bytes):
    preprocess = Preprocess.from_config(SO400M_PREPROCESSOR)
    for name, data in photo_bytes.items():
        (tmp_path / name).write_bytes(data)
    dataset = ImageFolderDataset(tmp_path, [ImageRecord(name, "x") for name in photo_bytes], preprocess)
    offline = torch.stack([dataset[i]["pixels"] for i in range(len(dataset))])
    blobs = np.array([[data] for data in photo_bytes.values()], dtype=object)  # BYTES [n, 1] as Triton gives it
    [online] = models.decode_requests([blobs], in_process_decode_many(preprocess))
    assert online.dtype == torch.uint8 and online.shape == (len(photo_bytes), 3, 384, 384)
    assert torch.equal(online, offline)


def test_decode_requests_fails_only_the_requests_with_bad_rows(photo_bytes):
    preprocess = Preprocess.from_config(SO400M_PREPROCESSOR)
    good, two_bad, empty = (np.array(rows, dtype=object) for rows in (
        [[photo_bytes["rgb.jpg"]]],
        [[photo_bytes["rgb.jpg"]], [b"not an image"], [b""]],
        np.empty((0, 1), dtype=object),
    ))
    calls = []

    def decode_many(blobs):
        calls.append(len(blobs))
        return in_process_decode_many(preprocess)(blobs)

    first, second, third = models.decode_requests([good, two_bad, empty], decode_many)
    assert calls == [4]  # every row of every request in one call (one round trip to the decoder process)
    assert isinstance(first, torch.Tensor) and first.shape == (1, 3, 384, 384)
    assert isinstance(second, DecodeError) and "IMAGE[0]" not in str(second)
    assert re.fullmatch(r"IMAGE\[1\]: not an image.*; IMAGE\[2\]: empty file", str(second))
    assert isinstance(third, DecodeError) and "no image" in str(third)


def test_non_finite_rows_names_them():
    pixels = np.zeros((4, 3, 8, 8), dtype=np.float32)
    assert models.non_finite_rows(pixels) is None
    pixels[1, 2, 3, 4], pixels[3, 0, 0, 0] = np.nan, -np.inf
    message = models.non_finite_rows(pixels)
    assert message.startswith("PIXEL_VALUES[1], PIXEL_VALUES[3]: ") and "NaN or inf" in message


def test_max_pixels_setting():
    config = {"name": "embed_image", "parameters": {"name_or_path": {"string_value": "/ckpt"}}}
    assert models.model_settings(config, instance_kind="CPU", device_id=0).max_pixels == models.DEFAULT_MAX_PIXELS
    config["parameters"]["max_pixels"] = {"string_value": "1000"}
    assert models.model_settings(config, instance_kind="CPU", device_id=0).max_pixels == 1000
    for bad in ("0", "-5", "lots"):
        config["parameters"]["max_pixels"] = {"string_value": bad}
        with pytest.raises(ValueError, match=f"max_pixels='{bad}'"):
            models.model_settings(config, instance_kind="CPU", device_id=0)


def test_split_rows_keeps_request_order():
    embeddings = np.arange(12, dtype=np.float32).reshape(6, 2)
    blocks = models.split_rows(embeddings, [1, 3, 0, 2])
    assert [b.shape[0] for b in blocks] == [1, 3, 0, 2]
    np.testing.assert_array_equal(np.concatenate(blocks), embeddings)
    with pytest.raises(ValueError, match="6 embeddings"):
        models.split_rows(embeddings, [1, 2])


def test_embed_batch_embeds_the_good_requests_once_and_keeps_their_order():
    calls = []

    def embed(accepted):
        calls.append(accepted)
        return np.concatenate(accepted).astype(np.float32)

    inputs = [np.ones((2, 1)), "request 1: bad", np.zeros((1, 1)), "request 3: bad", 3 * np.ones((3, 1))]
    results = models.embed_batch(inputs, embed, good=lambda x: isinstance(x, np.ndarray))
    assert len(calls) == 1 and [len(x) for x in calls[0]] == [2, 1, 3]
    assert [r.tolist() if isinstance(r, np.ndarray) else r for r in results] == [
        [[1.0], [1.0]], "request 1: bad", [[0.0]], "request 3: bad", [[3.0], [3.0], [3.0]]]
    # An error `embed` answers (siglip's, for embed_image) goes to every good request; nothing to embed: no call.
    failed = models.embed_batch(inputs, lambda accepted: "siglip failed", good=lambda x: isinstance(x, np.ndarray))
    assert failed == ["siglip failed", "request 1: bad", "siglip failed", "request 3: bad", "siglip failed"]
    assert models.embed_batch(["a", "b"], embed, good=lambda x: isinstance(x, np.ndarray)) == ["a", "b"]
    assert len(calls) == 1
