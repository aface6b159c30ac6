"""A real tritonserver started by `python -m pipelines.serve` answers the seed's requests with the in-process
model's embeddings, batches, rejects bad requests, survives hostile files and crashes, and is measurable (the
load generator, perf_analyzer)."""

from __future__ import annotations

import functools
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from helpers import hostile_files
from helpers.server import Launched, current_server_pid, launch, server_args, session_processes
from helpers.vectors import cosine
from PIL import Image

from pipelines import store
from pipelines.bench import serving as serving_bench
from pipelines.config import REPO_ROOT
from pipelines.data import decode
from pipelines.embed import run_embed
from pipelines.serve import loadgen, names, process, watchdog
from pipelines.siglip import SO400M_PREPROCESSOR, Preprocess, load_encoder

PIXEL_VALUES_JSON = REPO_ROOT / "data" / "siglip" / "pixel_values.json"


# ---------------------------------------------------------------- a real server


def server_token(server: Launched) -> str:
    """The model-control token, from tritonserver's command line (readable by the same user only)."""
    argv = Path(f"/proc/{current_server_pid(server)}/cmdline").read_bytes().decode().split("\0")
    [flag] = [a for a in argv if a.startswith("--http-restricted-api=")]
    return flag.rsplit("=", 1)[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    launched = launch(tmp_path_factory.mktemp("serve"), *server_args(tiny_checkpoint))
    yield launched
    launched.stop()


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint):
    return load_encoder(str(tiny_checkpoint), device="cpu", dtype="float32")


def stats(server: Launched, model: str) -> tuple[int, int]:
    entry = requests.get(f"{server.base_url}/{model}/stats").json()["model_stats"][0]
    return entry["inference_count"], entry["execution_count"]


@pytest.mark.server
def test_server_is_ready_with_both_models(server, tiny_checkpoint):
    assert requests.get(f"http://localhost:{server.http_port}/v2/health/ready").status_code == 200
    assert all(requests.get(f"{server.base_url}/{m}/ready").status_code == 200 for m in names.MODELS)
    # Model control (index, load, unload) answers only the launcher, which holds the token it gave the server.
    refused = requests.post(f"http://localhost:{server.http_port}/v2/repository/index")
    assert refused.status_code == 403 and process.CONTROL_HEADER in refused.json()["error"]
    unload = requests.post(f"{server.base_url.rsplit('/', 1)[0]}/repository/models/{names.SIGLIP}/unload")
    assert unload.status_code == 403
    token = server_token(server)
    index = requests.post(f"http://localhost:{server.http_port}/v2/repository/index",
                          headers={process.CONTROL_HEADER: token}).json()
    assert {(m["name"], m["state"]) for m in index} == {(model, "READY") for model in names.MODELS}
    config = requests.get(f"{server.base_url}/{names.SIGLIP}/config").json()
    assert config["parameters"][names.PARAM_MODEL]["string_value"] == str(tiny_checkpoint)
    assert config["max_batch_size"] == 16 and config["instance_group"][0]["kind"] == "KIND_CPU"


@pytest.mark.server
def test_seed_single_request_equals_the_in_process_model(server, encoder):
    # The seed's example request, verbatim but for base_url.
    base_url = server.base_url
    rng = np.random.default_rng()

    pixel_values_np = rng.normal(
        loc=0.5, scale=0.5, size=[1, 3, 384, 384]
    ).astype(np.float32)

    inference_request = {
        "inputs": [
            {
                "name": "PIXEL_VALUES",
                "shape": [1, 3, 384, 384],
                "datatype": "FP32",
                "data": pixel_values_np.flatten().tolist(),
            }
        ]
    }
    siglip_response = requests.post(
        url=f"{base_url}/siglip/infer",
        json=inference_request,
    ).json()

    embedding = np.array(
        siglip_response["outputs"][0]["data"],
        dtype=np.float32
    )
    expected = encoder.embed(torch.from_numpy(pixel_values_np)).numpy()
    assert siglip_response["outputs"][0]["name"] == names.EMBEDDING
    assert siglip_response["outputs"][0]["shape"] == [1, encoder.embedding_dim]
    assert cosine(embedding, expected)[0] >= 0.9999


def until_batched(server: Launched, model: str, burst, *, tries: int = 5) -> None:
    """Run `burst()` (which checks its own answers) until the server ran one of its bursts as fewer executions
    than requests: whether requests meet in the queue depends on timing, what the server answers does not."""
    for _ in range(tries):
        before = stats(server, model)
        burst()
        inferences, executions = (a - b for a, b in zip(stats(server, model), before))
        if executions < inferences:
            return
    pytest.fail(f"{tries} bursts of concurrent requests to {model} never shared an execution")


@pytest.mark.server
def test_sixty_concurrent_seed_requests_are_batched(server, encoder):
    rng = np.random.default_rng(0)
    pixel_values_batch = rng.normal(loc=0.5, scale=0.5, size=[60, 3, 384, 384]).astype(np.float32)
    expected = encoder.embed(torch.from_numpy(pixel_values_batch)).numpy()

    def burst() -> None:
        # The seed's "Sending Many Images" client: 60 threads, one JSON request per image.
        futures, embeddings = {}, {}
        with ThreadPoolExecutor(max_workers=60) as executor:
            for i, pixel_values in enumerate(pixel_values_batch):
                inference_request = {"inputs": [{"name": "PIXEL_VALUES", "shape": [1, 3, 384, 384],
                                                 "datatype": "FP32", "data": pixel_values.flatten().tolist()}]}
                future = executor.submit(requests.post, url=f"{server.base_url}/siglip/infer",
                                         json=inference_request)
                futures[future] = i
            for future in as_completed(futures):
                response = future.result()
                assert response.status_code == 200, response.text
                embeddings[futures[future]] = np.array(response.json()["outputs"][0]["data"], dtype=np.float32)
        assert cosine(np.stack([embeddings[i] for i in range(60)]), expected).min() >= 0.9999

    until_batched(server, names.SIGLIP, burst)


@pytest.mark.server
def test_embed_image_equals_the_offline_embedding(server, tiny_checkpoint, image_root, tmp_path):
    run_embed(root=image_root, splits=["train", "valid"], output_dir=tmp_path, model=str(tiny_checkpoint),
              device="cpu", num_workers=0, batch_size=4, progress=False)
    offline = {split: store.read_split(tmp_path, split) for split in ("train", "valid")}
    paths = [p for split in offline.values() for p in split.paths]
    expected = np.concatenate([split.embeddings for split in offline.values()])
    assert any(p.endswith(("cmyk.jpg", "photo.bmp", "png_named.JPEG")) for p in paths)
    # Concurrent requests, so that embed_image decodes several files in one execute() and batches them.
    with ThreadPoolExecutor(max_workers=8) as pool:
        online = list(pool.map(lambda p: embed_file(server, (image_root / p).read_bytes()), paths))
    assert cosine(np.concatenate(online), expected).min() >= 0.9999


def embed_file(server: Launched, data: bytes, protocol: str = "grpc") -> np.ndarray:
    payload = np.array([[data]], dtype=object)
    return loadgen.make_sender(protocol, model=names.EMBED_IMAGE, payload=payload, host="localhost",
                               http_port=server.http_port, grpc_port=server.grpc_port)()


def pixels_input(shape=(1, 3, 384, 384), datatype="FP32", name=names.PIXEL_VALUES) -> dict:
    return {"name": name, "shape": list(shape), "datatype": datatype, "data": [0.25] * int(np.prod(shape))}


BAD_REQUESTS = {
    "wrong shape": (names.SIGLIP, {"inputs": [pixels_input((1, 3, 224, 224))]}, "unexpected shape"),
    "no batch axis": (names.SIGLIP, {"inputs": [pixels_input((3, 384, 384))]}, "unexpected shape"),
    "wrong dtype": (names.SIGLIP, {"inputs": [pixels_input(datatype="FP64")]}, "data-type is 'FP64'"),
    "missing input": (names.SIGLIP, {"inputs": []}, "missing required input(s) ['PIXEL_VALUES']"),
    "unknown input": (names.SIGLIP, {"inputs": [pixels_input(name="PIXELS")]}, "unexpected inference input"),
    "batch too large": (names.SIGLIP, {"inputs": [pixels_input((17, 3, 384, 384))]}, "batch-size must be <= 16"),
    "undecodable image": (names.EMBED_IMAGE, {"inputs": [{"name": names.IMAGE, "shape": [1, 1], "datatype": "BYTES",
                                                          "data": ["not an image"]}]}, "IMAGE[0]: not an image"),
    "empty image": (names.EMBED_IMAGE, {"inputs": [{"name": names.IMAGE, "shape": [1, 1], "datatype": "BYTES",
                                                    "data": [""]}]}, "IMAGE[0]: empty file"),
}


@pytest.mark.server
@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_gets_4xx_and_the_server_keeps_serving(server, case, photo_bytes):
    model, body, message = BAD_REQUESTS[case]
    response = requests.post(f"{server.base_url}/{model}/infer", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    assert_still_serving(server, photo_bytes)


def assert_still_serving(server: Launched, photo_bytes: dict[str, bytes]) -> None:
    good = requests.post(f"{server.base_url}/siglip/infer", json={"inputs": [pixels_input()]})
    assert good.status_code == 200 and len(good.json()["outputs"][0]["data"]) > 0
    assert embed_file(server, photo_bytes["rgb.jpg"], "http").shape[0] == 1


def bomb_png(side: int = 30000, rows_per_block: int = 100) -> bytes:
    """A valid PNG of side x side black RGB pixels (2.7 GB decoded for 30000), about 2.6 MB, built in a second.

    Each block of rows is deflated once, ending in a full flush (no reference to earlier data), so the same
    compressed block can be repeated; the zlib checksum is computed over all the rows.
    """
    row = bytes(1 + 3 * side)  # filter byte 0, then black pixels
    block, (count, rest) = row * rows_per_block, divmod(side, rows_per_block)
    stream = zlib.compressobj(9)
    first = stream.compress(block) + stream.flush(zlib.Z_FULL_FLUSH)  # starts with the zlib header
    repeated = stream.compress(block) + stream.flush(zlib.Z_FULL_FLUSH)
    tail = stream.compress(row * rest) + stream.flush(zlib.Z_FULL_FLUSH) if rest else b""
    checksum = 1
    for _ in range(count):
        checksum = zlib.adler32(block, checksum)
    checksum = zlib.adler32(row * rest, checksum)
    idat = first + repeated * (count - 1) + tail + b"\x03\x00" + struct.pack(">I", checksum)  # final empty block
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return hostile_files.PNG_MAGIC + b"".join(hostile_files._chunk(kind, data) for kind, data in (
        (b"IHDR", ihdr), (b"IDAT", idat), (b"IEND", b"")))


def test_bomb_png_is_a_valid_png():
    small = bomb_png(side=250, rows_per_block=16)
    with Image.open(io.BytesIO(small)) as image:
        image.load()  # decodes every row and checks the zlib stream
        assert image.size == (250, 250) and image.getextrema() == ((0, 0), (0, 0), (0, 0))
    big = bomb_png()
    assert struct.unpack(">II", big[16:24]) == (30000, 30000) and len(big) < 4 << 20  # IHDR width, height


@pytest.fixture(scope="module")
def hostile_images(photo_bytes) -> dict[str, tuple[bytes, str]]:
    """Hostile files as a scraped folder has them, and the reason embed_image must give for each."""
    jpeg = photo_bytes["rgb.jpg"]
    return {
        "crash png": (hostile_files.crash_png_bytes(),
                      r"IMAGE\[0\]: (truncated PNG|cannot decode image|decoder crashed)"),
        "bomb 30000x30000": (bomb_png(), r"IMAGE\[0\]: too large: 30000x30000 \(limit 25000000 pixels\)"),
        "truncated jpeg": (jpeg[: len(jpeg) // 3], r"IMAGE\[0\]: (cannot decode image|.*truncated)"),
        "empty": (b"", r"IMAGE\[0\]: empty file"),
        "text": (b"hello, this is not an image\n", r"IMAGE\[0\]: not an image"),
        "png short of rows": (hostile_files.truncated_rows_png(), r"IMAGE\[0\]: truncated PNG"),
        "jpeg filled with gray": (jpeg[: len(jpeg) // 2] + b"\xff\xd9", r"IMAGE\[0\]: truncated JPEG"),
    }


def post_images(server: Launched, blobs: list[bytes]) -> requests.Response:
    """embed_image over HTTP with binary tensors (JSON cannot carry raw bytes); the raw response."""
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput(names.IMAGE, [len(blobs), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b] for b in blobs], dtype=object), binary_data=True)
    body, header_length = httpclient.InferenceServerClient.generate_request_body([tensor])
    return requests.post(f"{server.base_url}/{names.EMBED_IMAGE}/infer", data=body, timeout=300,
                         headers={"Inference-Header-Content-Length": str(header_length),
                                  "Content-Type": "application/octet-stream"})


def stub_pids(server: Launched) -> dict[str, list[int]]:
    pids: dict[str, list[int]] = {}
    for stub in watchdog.list_stubs(current_server_pid(server)):
        pids.setdefault(stub.model, []).append(stub.pid)
    return pids


@pytest.mark.server
@pytest.mark.parametrize("case", ["crash png", "bomb 30000x30000", "truncated jpeg", "empty", "text",
                                  "png short of rows", "jpeg filled with gray"])
def test_hostile_image_gets_400_and_kills_nothing(server, hostile_images, case, photo_bytes, encoder):
    data, reason = hostile_images[case]
    stubs = stub_pids(server)
    response = post_images(server, [data])
    assert response.status_code == 400, response.text
    assert re.match(reason, response.json()["error"]), response.json()["error"]
    assert stub_pids(server) == stubs  # no stub died, none was replaced
    good = embed_file(server, photo_bytes["rgb.jpg"])
    assert cosine(good, expected_embedding(encoder, photo_bytes["rgb.jpg"]))[0] >= 0.9999


@pytest.mark.server
def test_bombs_are_refused_by_row_while_other_requests_are_served(server, hostile_images, photo_bytes, encoder):
    bomb = hostile_images["bomb 30000x30000"][0]
    good = photo_bytes["flower.png"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        bombs = pool.submit(post_images, server, [bomb, bomb, good, bomb, bomb])
        goods = [pool.submit(post_images, server, [good]) for _ in range(3)]
        bombs, goods = bombs.result(), [g.result() for g in goods]
    assert bombs.status_code == 400
    assert re.fullmatch(r"IMAGE\[0\]: too large: 30000x30000 \(limit 25000000 pixels\); IMAGE\[1\]: too large: "
                        r".*; IMAGE\[3\]: .*; IMAGE\[4\]: too large: 30000x30000 \(limit 25000000 pixels\)",
                        bombs.json()["error"]), bombs.json()["error"]
    assert [g.status_code for g in goods] == [200] * 3
    assert cosine(embed_file(server, good), expected_embedding(encoder, good))[0] >= 0.9999


@pytest.mark.server
def test_non_finite_pixels_fail_only_their_own_request(server, encoder):
    rng = np.random.default_rng(1)
    pixels = rng.normal(loc=0.5, scale=0.5, size=[4, 1, 3, 384, 384]).astype(np.float32)
    pixels[1, 0, 2, 100, 7], pixels[3, 0, 0, 0, 0] = np.nan, np.inf
    expected = encoder.embed(torch.from_numpy(pixels[:, 0])).numpy()

    def burst() -> None:
        answers = send_all_at_once(server, names.SIGLIP, [(names.PIXEL_VALUES, p) for p in pixels])
        for i in (1, 3):
            result, error = answers[i]
            assert result is None and "INVALID_ARGUMENT" in str(error.status())
            assert error.message() == "PIXEL_VALUES[0]: pixel values must be finite (found NaN or inf)"
        for i in (0, 2):
            result, error = answers[i]
            assert error is None, error
            assert cosine(result.as_numpy(names.EMBEDDING), expected[i])[0] >= 0.9999

    until_batched(server, names.SIGLIP, burst)
    body = {"inputs": [pixels_input()]}
    body["inputs"][0]["data"][5] = float("inf")  # JSON as Python writes it: a bare Infinity token
    response = requests.post(f"{server.base_url}/siglip/infer", data=json.dumps(body),
                             headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 500) and response.json()["error"]


def status_or_refused(url: str) -> int:
    """The HTTP status of a GET, or 0 when nothing listens (the server is being replaced)."""
    try:
        return requests.get(url, timeout=30).status_code
    except requests.ConnectionError:
        return 0


@pytest.mark.server
def test_a_killed_stub_is_replaced_without_help(server, photo_bytes, encoder):
    [stub] = [s for s in watchdog.list_stubs(current_server_pid(server)) if s.model == names.SIGLIP]
    region = Path("/dev/shm") / stub.shm_region
    assert region.exists()
    payload = loadgen.load_pixel_values(PIXEL_VALUES_JSON)
    connect = {"model": names.SIGLIP, "payload": payload, "host": "localhost", "http_port": server.http_port,
               "grpc_port": server.grpc_port}
    outcomes: list[bool] = []
    stop = threading.Event()

    def load() -> None:  # closed-loop clients, as in production, before, during and after the crash
        while not stop.is_set():
            try:
                loadgen.make_sender("http", **connect)()  # a new connection each time: the server may change
                outcomes.append(True)
            except Exception:  # noqa: BLE001 - requests fail while the model is down; counted, not raised
                outcomes.append(False)
                time.sleep(0.05)

    clients = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for client in clients:
        client.start()
    try:
        wait_for(lambda: True in outcomes, 120, "no request succeeded before the kill")
        os.kill(stub.pid, signal.SIGKILL)
        after_kill = len(outcomes)
        readiness: set[tuple[int, int]] = set()
        deadline = time.monotonic() + 120
        while True:
            readiness.add((status_or_refused(f"http://localhost:{server.http_port}/v2/health/ready"),
                           status_or_refused(f"{server.base_url}/{names.SIGLIP}/ready")))
            try:
                embedding = loadgen.make_sender("http", **connect)()
                break
            except Exception:  # noqa: BLE001 - not serving yet
                assert time.monotonic() < deadline, "siglip does not serve 120 s after its stub was killed"
                time.sleep(0.05)
        wait_for(lambda: True in outcomes[after_kill:], 120, "the load's clients never succeeded again")
    finally:
        stop.set()
        for client in clients:
            client.join(60)
    # Not ready in between: 400 while the model was unloaded, or no answer while the server was replaced.
    assert any(code != 200 for code, _ in readiness) and any(code != 200 for _, code in readiness)
    assert cosine(embedding, encoder.embed(torch.from_numpy(payload)).numpy())[0] >= 0.9999
    [new] = [s for s in watchdog.list_stubs(current_server_pid(server)) if s.model == names.SIGLIP]
    assert new.pid != stub.pid and not region.exists()
    assert server.launcher.poll() is None
    assert f"stub (pid {stub.pid}) killed by signal 9; reloading" in server.output.read_text()
    assert cosine(embed_file(server, photo_bytes["rgb.jpg"]), expected_embedding(encoder, photo_bytes["rgb.jpg"]))[
        0] >= 0.9999  # embed_image reaches the new siglip


@pytest.mark.server
def test_a_killed_server_is_replaced_without_help(server, encoder):
    old = current_server_pid(server)
    regions = [Path("/dev/shm") / stub.shm_region for stub in watchdog.list_stubs(old)]
    payload = loadgen.load_pixel_values(PIXEL_VALUES_JSON)
    send = functools.partial(loadgen.make_sender, "http", model=names.SIGLIP, payload=payload, host="localhost",
                             http_port=server.http_port, grpc_port=server.grpc_port)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 180
    while True:
        try:
            embedding = send()()
            break
        except Exception:  # noqa: BLE001 - not serving yet
            assert time.monotonic() < deadline, "no server 180 s after tritonserver was killed"
            time.sleep(0.1)
    assert current_server_pid(server) != old and server.launcher.poll() is None
    assert cosine(embedding, encoder.embed(torch.from_numpy(payload)).numpy())[0] >= 0.9999
    assert session_processes(old) == []  # the old server's stubs and decoders are gone
    assert not [region for region in regions if region.exists()]  # and so is their shared memory
    assert "tritonserver exited on its own with status -9" in server.output.read_text()


def wait_for(condition, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


@pytest.mark.server
@pytest.mark.parametrize("body", [b'{"inputs": [', b"not json", b'{"inputs": [{"name": "PIXEL_VALUES"'])
def test_malformed_json_is_refused_with_a_message(server, body, photo_bytes):
    response = requests.post(f"{server.base_url}/siglip/infer", data=body,
                             headers={"Content-Type": "application/json"})
    # Triton 2.51 answers an unparsable body itself, with 500 (not 400: its JSON parser reports INTERNAL).
    assert response.status_code in (400, 500)
    assert "failed to parse the request JSON" in response.json()["error"]
    assert_still_serving(server, photo_bytes)


def send_all_at_once(server: Launched, model: str, tensors: list[tuple[str, np.ndarray]]) -> dict[int, tuple]:
    """One gRPC request per (input name, array), all in flight at once; per request index (result, error)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"localhost:{server.grpc_port}")
    answers: dict[int, tuple] = {}
    try:
        for i, (name, array) in enumerate(tensors):
            tensor = grpcclient.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else "FP32")
            tensor.set_data_from_numpy(array)
            client.async_infer(model, [tensor], callback=lambda result, error, i=i: answers.update(
                {i: (result, error)}))
        deadline = time.monotonic() + 300
        while len(answers) < len(tensors) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.close()
    assert len(answers) == len(tensors), f"{len(tensors) - len(answers)} requests unanswered after 300 s"
    return answers


def expected_embedding(encoder, data: bytes) -> np.ndarray:
    pixels = Preprocess.from_config(SO400M_PREPROCESSOR)(decode(data)).unsqueeze(0)
    return encoder.embed(pixels).numpy()


@pytest.mark.server
def test_a_bad_image_fails_only_its_own_request(server, photo_bytes, encoder):
    files = [photo_bytes["rgb.jpg"], b"\xff\xd8 broken jpeg", photo_bytes["flower.png"], photo_bytes["cmyk.jpg"]]

    def burst() -> None:  # all in flight at once: one execute() gets good and bad requests
        answers = send_all_at_once(server, names.EMBED_IMAGE,
                                   [(names.IMAGE, np.array([[data]], dtype=object)) for data in files])
        assert answers[1][0] is None and "IMAGE[0]" in answers[1][1].message()
        assert "INVALID_ARGUMENT" in str(answers[1][1].status())
        for i in (0, 2, 3):
            result, error = answers[i]
            assert error is None
            assert cosine(result.as_numpy(names.EMBEDDING), expected_embedding(encoder, files[i]))[0] >= 0.9999

    until_batched(server, names.EMBED_IMAGE, burst)


@pytest.mark.server
def test_protocols_agree(server):
    payload = loadgen.load_pixel_values(PIXEL_VALUES_JSON)
    out = {p: loadgen.make_sender(p, model=names.SIGLIP, payload=payload, host="localhost",
                                  http_port=server.http_port, grpc_port=server.grpc_port)() for p in loadgen.PROTOCOLS}
    np.testing.assert_allclose(out["http"], out["grpc"], rtol=0, atol=0)
    np.testing.assert_allclose(out["http-json"].reshape(out["http"].shape), out["http"], rtol=1e-6, atol=1e-6)


@pytest.mark.server
def test_loadgen_measures_throughput_and_latency(server):
    concurrency = 4
    for duration_s in (1.5, 5, 30):  # a longer window only when a loaded machine finished nothing in the last
        result = loadgen.run_load(model=names.SIGLIP, protocol="grpc", concurrency=concurrency,
                                  duration_s=duration_s, warmup_s=0.5,
                                  payload=loadgen.load_pixel_values(PIXEL_VALUES_JSON), host="localhost",
                                  http_port=server.http_port, grpc_port=server.grpc_port)
        summary = result.summary()
        if summary["requests"] > 0:
            break
    assert summary["errors"] == 0 and summary["requests"] > 0 and summary["infer_per_s"] > 0
    assert summary["p50_ms"] <= summary["p90_ms"] <= summary["p95_ms"] <= summary["p99_ms"]
    # The client counts answers received inside the window, the server executions finished between its two
    # statistics reads: each client may have had one answer in flight across the first read, no more.
    assert summary["server_inferences"] >= summary["requests"] - concurrency
    assert "infer/sec" in result.report() and "| grpc | 4 |" in loadgen.format_table([summary])


@pytest.mark.server
def test_perf_analyzer_runs_the_seed_command(server, tmp_path):
    # The seed's command, with the server's port, a short window and fewer clients (a longer window only
    # when a loaded machine finished no request in the short one), and the CSV report the benchmark reads.
    report = tmp_path / "report.csv"
    for interval_ms in (1000, 5000):
        command = [sys.executable, "-m", "pipelines.serve.perf_analyzer", "-m", "siglip", "-u",
                   f"localhost:{server.http_port}", "-v", "--input-data", "data/siglip/pixel_values.json",
                   "--measurement-mode=time_windows", f"--measurement-interval={interval_ms}",
                   "--concurrency-range=4", "--latency-threshold=1000", "--stability-percentage=100",
                   "--max-trials=3", "-f", str(report), "--verbose-csv"]
        before = loadgen.server_counts(names.SIGLIP, host="localhost", http_port=server.http_port)
        result = subprocess.run(command, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
        after = loadgen.server_counts(names.SIGLIP, host="localhost", http_port=server.http_port)
        passes = re.findall(r"Pass \[1\] throughput: ([\d.]+) infer/sec", result.stdout)
        if passes and float(passes[0]) > 0:
            break
    assert "Successfully read data for 1 stream" in result.stdout, result.stdout + result.stderr
    assert passes and float(passes[0]) > 0, result.stdout
    figures = serving_bench.read_perf_report(report)  # what python -m pipelines.bench.serving tabulates
    assert figures["infer_per_s"] > 0 and 0 < figures["p50_ms"] <= figures["p99_ms"] and figures["avg_ms"] > 0
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences >= executions > 0


@pytest.mark.server
def test_perf_analyzer_sends_the_seed_json_request(server, tmp_path):
    # perf_analyzer 2.51 can send the seed's JSON body itself (HTTP only); the load generator's http-json
    # protocol measures the same request.
    report = tmp_path / "report.csv"
    command = serving_bench.perf_analyzer_command(
        url=f"localhost:{server.http_port}", protocol="http-json", concurrency=1, interval_ms=1000,
        input_data="data/siglip/pixel_values.json", report=report) + ["--stability-percentage=100", "--max-trials=3"]
    assert "--input-tensor-format=json" in command
    before = stats(server, names.SIGLIP)
    result = subprocess.run(command, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    # Whether three 1 s windows agree depends on the machine's load; that every request succeeded does not.
    passes = re.findall(r"Pass \[1\] throughput: ([\d.]+) infer/sec", result.stdout)
    assert passes and float(passes[0]) > 0, result.stdout + result.stderr
    assert stats(server, names.SIGLIP)[0] > before[0]


@pytest.mark.server
def test_loadgen_cli_prints_the_table(server, photo_bytes, tmp_path):
    image = tmp_path / "photo.jpg"
    image.write_bytes(photo_bytes["rgb.jpg"])
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.serve.loadgen", f"http_port={server.http_port}",
         f"grpc_port={server.grpc_port}", "triton_model=embed_image", f"image={image}", "protocols=[http,grpc]",
         "concurrency=[2]", "duration_s=1", "warmup_s=0.3", f"output={tmp_path / 'figures.jsonl'}"],
        check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "figures.jsonl").read_text().splitlines()]
    assert [(r["protocol"], r["concurrency"], r["errors"]) for r in rows] == [("http", 2, 0), ("grpc", 2, 0)]
    for protocol in ("http", "grpc"):  # how many requests fit in the 1 s window depends on the machine's load
        assert re.search(rf"\| loadgen \| {protocol} \| 2 \| \d", result.stdout), result.stdout
