"""serving/embed_text: its config agrees with pipelines/serve/names.py, and a real tritonserver started by
`python -m pipelines.serve` embeds text as `pipelines.text` does offline, refusing bad rows with a 400 that names
them while the other requests are served."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tritonclient.grpc
import tritonclient.http
from helpers.server import Launched, launch, server_args
from helpers.vectors import cosine
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from pipelines.config import REPO_ROOT
from pipelines.serve import names, repository
from pipelines.text import load_text_encoder

CONFIG = REPO_ROOT / "serving" / names.EMBED_TEXT / "config.pbtxt"
LONG = " ".join(["a photo of two striped cats on the wooden table near the river"] * 12)  # > 64 tokens
TEXTS = ["a photo of a red bag", "A Photo, of TWO dogs!!", "un café près de la rivière ☕", LONG]


def test_config_agrees_with_names():
    config = repository.read_config(CONFIG)
    assert config.name == names.EMBED_TEXT and config.backend == "python" and names.EMBED_TEXT in names.MODELS
    [tensor_in], [tensor_out] = config.input, config.output
    assert (tensor_in.name, model_config_pb2.DataType.Name(tensor_in.data_type), list(tensor_in.dims)) == (
        names.TEXT, "TYPE_STRING", [1])
    assert (tensor_out.name, model_config_pb2.DataType.Name(tensor_out.data_type), list(tensor_out.dims)) == (
        names.EMBEDDING, "TYPE_FP32", [-1])
    assert config.max_batch_size >= 64 and config.HasField("dynamic_batching")
    # The launcher gives it the checkpoint and, as to siglip, dtype, threads and placement.
    assert {names.PARAM_MODEL, names.PARAM_REVISION, names.PARAM_DTYPE, names.PARAM_DEVICE,
            names.PARAM_THREADS} <= set(config.parameters)
    assert (CONFIG.parent / "1" / "model.py").is_file()


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    launched = launch(tmp_path_factory.mktemp("serve-text"), *server_args(tiny_checkpoint))
    yield launched
    launched.stop()


@pytest.fixture(scope="module")
def offline(tiny_checkpoint):
    return load_text_encoder(str(tiny_checkpoint), revision=None, device="cpu", dtype="float32")


def text_body(texts: list[str]) -> dict:
    return {"inputs": [{"name": names.TEXT, "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}]}


def post_json(server: Launched, texts: list[str]) -> requests.Response:
    return requests.post(f"{server.base_url}/{names.EMBED_TEXT}/infer", json=text_body(texts), timeout=120)


def infer_bytes(server: Launched, rows: list[bytes]) -> np.ndarray:
    """The binary HTTP protocol, which (unlike JSON) can carry any bytes: raises InferenceServerException."""
    client = tritonclient.http.InferenceServerClient(f"localhost:{server.http_port}")
    text = tritonclient.http.InferInput(names.TEXT, [len(rows), 1], "BYTES")
    text.set_data_from_numpy(np.array([[row] for row in rows], dtype=object), binary_data=True)
    return client.infer(names.EMBED_TEXT, [text]).as_numpy(names.EMBEDDING)


@pytest.mark.server
def test_served_text_embeddings_equal_the_offline_ones(server, offline):
    expected = offline.embed(TEXTS).numpy()
    response = post_json(server, TEXTS)
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    assert output["name"] == names.EMBEDDING and output["datatype"] == "FP32" and output["shape"] == [len(TEXTS), 32]
    served = np.asarray(output["data"], np.float32).reshape(output["shape"])
    assert cosine(served, expected).min() >= 0.9999
    # gRPC, one text per request, sent together: the dynamic batcher may put them in one batch, or not.
    client = tritonclient.grpc.InferenceServerClient(f"localhost:{server.grpc_port}")

    def one(text: str) -> np.ndarray:
        text_input = tritonclient.grpc.InferInput(names.TEXT, [1, 1], "BYTES")
        text_input.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
        return client.infer(names.EMBED_TEXT, [text_input]).as_numpy(names.EMBEDDING)[0]

    with ThreadPoolExecutor(8) as pool:
        singles = np.stack(list(pool.map(one, TEXTS * 4)))
    assert cosine(singles, np.tile(expected, (4, 1))).min() >= 0.9999


@pytest.mark.server
def test_bad_rows_get_400_naming_them_while_other_requests_are_served(server, offline):
    with pytest.raises(InferenceServerException) as info:
        infer_bytes(server, [b"a red bag", b"caf\xe9 au lait", b"a dog", b""])
    assert info.value.status() == "400"
    assert info.value.message() == ("text row 1: not valid UTF-8 (invalid continuation byte at byte 3); "
                                    "text row 3: empty text (nothing to embed)")
    empty = post_json(server, ["a cat", ""])
    assert empty.status_code == 400 and empty.json()["error"] == "text row 1: empty text (nothing to embed)"
    # Bad and good requests at once: each bad one fails alone, whichever batch it shares.
    requests_ = [[b"\xff"], b"a red bag", [b"  "], LONG.encode()] * 3
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda rows: _answer(server, rows), requests_))
    for rows, answer in zip(requests_, answers):
        if isinstance(rows, list):
            assert isinstance(answer, InferenceServerException) and answer.status() == "400", answer
            assert answer.message().startswith("text row 0: "), answer.message()
        else:
            assert isinstance(answer, np.ndarray), answer
            assert cosine(answer, offline.embed([rows.decode()]).numpy())[0] >= 0.9999
    assert cosine(infer_bytes(server, [TEXTS[0].encode()]), offline.embed(TEXTS[:1]).numpy())[0] >= 0.9999
    assert requests.get(f"{server.base_url}/{names.EMBED_TEXT}/ready", timeout=30).status_code == 200


def _answer(server: Launched, rows: list[bytes] | bytes) -> np.ndarray | InferenceServerException:
    try:
        return infer_bytes(server, rows if isinstance(rows, list) else [rows])
    except InferenceServerException as exc:
        return exc


@pytest.mark.server
def test_a_vision_only_checkpoint_serves_images_and_says_why_not_text(tiny_vision_checkpoint, tmp_path):
    launched = launch(tmp_path, *server_args(tiny_vision_checkpoint))
    try:
        answer = post_json(launched, ["a cat"])
        assert answer.status_code == 503, answer.text
        assert f"model.name_or_path='{tiny_vision_checkpoint}'" in answer.json()["error"]
        assert "the text side needs the full SiglipModel checkpoint" in answer.json()["error"]
        client = tritonclient.http.InferenceServerClient(f"localhost:{launched.http_port}")
        pixels = tritonclient.http.InferInput(names.PIXEL_VALUES, [1, 3, 384, 384], "FP32")
        pixels.set_data_from_numpy(np.zeros((1, 3, 384, 384), np.float32))
        assert client.infer(names.SIGLIP, [pixels]).as_numpy(names.EMBEDDING).shape == (1, 32)
    finally:
        launched.stop()
