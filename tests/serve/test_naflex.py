"""Serving a SigLIP 2 NaFlex checkpoint: the launcher renders siglip's NaFlex inputs (patches, mask, grid), and a real
tritonserver embeds image files (embed_image, unchanged for clients), NaFlex tensors (siglip) and texts
(embed_text) as the offline code does; a grid or mask the model cannot take is a 400 while the server serves on."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from helpers.images import PHOTOS, encode
from helpers.server import launch, model_options, server_args
from helpers.vectors import cosine
from PIL import Image
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from pipelines.config import REPO_ROOT
from pipelines.data import decode
from pipelines.hub import input_geometry
from pipelines.serve import names, repository
from pipelines.siglip import load_encoder, stack_pixels
from pipelines.text import load_text_encoder


def photos() -> list[bytes]:
    """Real photos of several shapes: landscape, a very wide strip, a very tall strip."""
    china = Image.open(PHOTOS / "china.jpg").convert("RGB")
    return [(PHOTOS / "china.jpg").read_bytes(), encode(china.crop((0, 200, 640, 230)), "PNG"),
            encode(china.crop((300, 0, 318, 427)), "PNG")]


def test_the_launcher_renders_siglips_naflex_inputs(naflex_checkpoint, tiny_checkpoint, tmp_path):
    assert input_geometry(str(naflex_checkpoint), None) == ("naflex", 256, 16)
    assert input_geometry(str(tiny_checkpoint), None) == ("fixres", 384, 384)
    target = repository.render_repository(REPO_ROOT / "serving", tmp_path / "models", model_options(
        name_or_path=str(naflex_checkpoint), geometry=("naflex", 256, 16)))
    config = repository.read_config(target / names.SIGLIP / "config.pbtxt")
    inputs = [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.input]
    assert inputs == [(names.PIXEL_VALUES, "TYPE_FP32", [256, 768]), (names.PIXEL_ATTENTION_MASK, "TYPE_INT32", [256]),
                      (names.SPATIAL_SHAPES, "TYPE_INT64", [2])]
    # embed_image and embed_text keep their contracts: bytes and texts in
    image = repository.read_config(target / names.EMBED_IMAGE / "config.pbtxt")
    assert [t.name for t in image.input] == [names.IMAGE]
    # a fixed-resolution checkpoint of another size (SigLIP base: 224 px) gets siglip's pixels at its size
    other = repository.render_repository(REPO_ROOT / "serving", tmp_path / "other", model_options(
        name_or_path=str(tiny_checkpoint), geometry=("fixres", 224, 224)))
    [pixels] = repository.read_config(other / names.SIGLIP / "config.pbtxt").input
    assert (pixels.name, list(pixels.dims)) == (names.PIXEL_VALUES, [3, 224, 224])


@pytest.fixture(scope="module")
def server(naflex_checkpoint, tmp_path_factory):
    launched = launch(tmp_path_factory.mktemp("serve-naflex"), *server_args(naflex_checkpoint))
    yield launched
    launched.stop()


def naflex_inputs(pixels: dict) -> list[grpcclient.InferInput]:
    tensors = []
    for key, name in names.NAFLEX_INPUTS.items():
        value = pixels[key].numpy()
        tensor = grpcclient.InferInput(name, list(value.shape), {"float32": "FP32", "int32": "INT32",
                                                                 "int64": "INT64"}[str(value.dtype)])
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


@pytest.mark.server
def test_a_naflex_checkpoint_serves_files_patches_and_texts(server, naflex_checkpoint):
    client = grpcclient.InferenceServerClient(f"localhost:{server.grpc_port}")
    encoder = load_encoder(str(naflex_checkpoint), device="cpu", dtype="float32")
    blobs = photos()
    resized = stack_pixels([encoder.preprocess.resize(decode(blob)) for blob in blobs])
    offline = encoder.embed_uint8(resized).numpy()
    # embed_image: bytes in, exactly as for a SigLIP checkpoint
    image = grpcclient.InferInput(names.IMAGE, [len(blobs), 1], "BYTES")
    image.set_data_from_numpy(np.array([[blob] for blob in blobs], dtype=object))
    online = client.infer(names.EMBED_IMAGE, [image]).as_numpy(names.EMBEDDING)
    assert online.shape == offline.shape and cosine(online, offline).min() >= 0.9999
    # siglip: the preprocessed patches, mask and grid
    patches = client.infer(names.SIGLIP, naflex_inputs(encoder.preprocess.normalize(resized))).as_numpy(
        names.EMBEDDING)
    assert cosine(patches, offline).min() >= 0.9999
    # embed_text: SigLIP 2's text tower
    text = grpcclient.InferInput(names.TEXT, [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"A photo of a Flower"]], dtype=object))
    expected = load_text_encoder(str(naflex_checkpoint), revision=None, device="cpu", dtype="float32").embed(
        ["A photo of a Flower"]).numpy()
    assert cosine(client.infer(names.EMBED_TEXT, [text]).as_numpy(names.EMBEDDING), expected).min() >= 0.9999
    # a grid the model cannot take: a 400 naming it, and the server serves on
    bad = encoder.preprocess.normalize(resized)
    bad["spatial_shapes"][1] = bad["spatial_shapes"].new_tensor([40, 40])
    with pytest.raises(InferenceServerException) as info:
        client.infer(names.SIGLIP, naflex_inputs(bad))
    assert "SPATIAL_SHAPES[1]=[40, 40]" in info.value.message() and info.value.status() == "StatusCode.INVALID_ARGUMENT"
    again = client.infer(names.EMBED_IMAGE, [image]).as_numpy(names.EMBEDDING)
    assert cosine(again, offline).min() >= 0.9999


def test_naflex_rows_names_what_the_model_cannot_take():
    from pipelines.serve import models

    pixels, mask = np.zeros((3, 8, 12), np.float32), np.zeros((3, 8), np.int32)
    shapes = np.array([[2, 3], [3, 3], [2, 2]], np.int64)
    mask[0, :6], mask[1, :8], mask[2, 1:5] = 1, 1, 1
    message = models.naflex_rows(pixels, mask, shapes)
    assert message == ("SPATIAL_SHAPES[1]=[3, 3]: expected at least one patch and at most 8 (rows x columns); "
                       "PIXEL_ATTENTION_MASK[2]: expected 4 ones (the 2x2 patches, first) then zeros")
    mask[2] = [1, 1, 1, 1, 0, 0, 0, 0]
    assert models.naflex_rows(pixels[[0, 2]], mask[[0, 2]], shapes[[0, 2]]) is None
    pixels[2, 0, 0] = np.nan
    assert models.naflex_rows(pixels, mask, shapes).startswith("PIXEL_VALUES[2]: pixel values must be finite")
