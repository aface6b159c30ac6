"""The Triton models in serving/ (and pipelines/serving.py under them): configs agree with pipelines.names,
decoding equals the offline loader, and a real tritonserver started by `python -m pipelines.serve` answers the
seed's requests with the in-process model's embeddings, batches, rejects bad requests, and is measurable."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from tritonclient.grpc import model_config_pb2

from pipelines import loadgen, names, serve_bench, serving, store, triton
from pipelines.config import REPO_ROOT
from pipelines.data import DecodeError, ImageFolderDataset, ImageRecord, decode
from pipelines.embed import run_embed
from pipelines.siglip import SO400M_PREPROCESSOR, Preprocess, load_encoder

SERVING = REPO_ROOT / "serving"
PIXEL_VALUES_JSON = REPO_ROOT / "data" / "siglip" / "pixel_values.json"
READY = re.compile(r"tritonserver \(pid (\d+)\) ready .*HTTP http://localhost:(\d+), gRPC localhost:(\d+)")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ---------------------------------------------------------------- configs and model-side helpers (no server)


@pytest.mark.parametrize("model", names.MODELS)
def test_config_agrees_with_names(model):
    config = triton.read_config(SERVING / model / "config.pbtxt")
    assert config.name == model and config.backend == "python"
    [tensor_in], [tensor_out] = config.input, config.output  # the seed's clients read outputs[0]
    expected_in = {names.SIGLIP: (names.PIXEL_VALUES, "TYPE_FP32", [3, 384, 384]),
                   names.EMBED_IMAGE: (names.IMAGE, "TYPE_STRING", [1])}[model]
    assert (tensor_in.name, model_config_pb2.DataType.Name(tensor_in.data_type), list(tensor_in.dims)) == expected_in
    assert model_config_pb2.DataType.Name(tensor_out.data_type) == "TYPE_FP32"
    assert tensor_out.name == names.EMBEDDING and list(tensor_out.dims) == [-1]
    assert config.max_batch_size >= 64 and config.HasField("dynamic_batching")
    assert {names.PARAM_MODEL, names.PARAM_REVISION} <= set(config.parameters)
    assert (SERVING / model / "1" / "model.py").is_file()


def test_embed_image_batches_fit_siglip():
    siglip, embed_image = (triton.read_config(SERVING / m / "config.pbtxt") for m in names.MODELS)
    assert embed_image.max_batch_size <= siglip.max_batch_size  # one BLS request per execute() must fit
    assert {names.PARAM_DTYPE, names.PARAM_DEVICE, names.PARAM_THREADS} <= set(siglip.parameters)


def test_model_settings_follow_the_instance():
    config = {"name": "siglip", "parameters": {"name_or_path": {"string_value": "/ckpt"},
                                                "revision": {"string_value": ""},
                                                "num_threads": {"string_value": "3"}}}
    gpu = serving.model_settings(config, instance_kind="GPU", device_id=2)
    assert (gpu.name_or_path, gpu.revision, gpu.dtype, gpu.device, gpu.num_threads) == ("/ckpt", None, "auto",
                                                                                        "cuda:2", 3)
    assert serving.model_settings(config, instance_kind="CPU", device_id=0).device == "cpu"
    config["parameters"]["device"] = {"string_value": "cpu"}
    assert serving.model_settings(config, instance_kind="GPU", device_id=0).device == "cpu"
    with pytest.raises(ValueError, match="name_or_path"):
        serving.model_settings({"name": "siglip", "parameters": {}}, instance_kind="CPU", device_id=0)
    assert serving.resolve_threads("auto") >= 1
    with pytest.raises(ValueError, match="num_threads"):
        serving.resolve_threads("0")


def test_decode_images_equals_the_offline_loader(tmp_path, photo_bytes):
    preprocess = Preprocess.from_config(SO400M_PREPROCESSOR)
    for name, data in photo_bytes.items():
        (tmp_path / name).write_bytes(data)
    dataset = ImageFolderDataset(tmp_path, [ImageRecord(name, "x") for name in photo_bytes], preprocess)
    offline = torch.stack([dataset[i]["pixels"] for i in range(len(dataset))])
    blobs = np.array([[data] for data in photo_bytes.values()], dtype=object)  # BYTES [n, 1] as Triton gives it
    online = serving.decode_images(blobs, preprocess)
    assert online.dtype == torch.uint8 and online.shape == (len(photo_bytes), 3, 384, 384)
    assert torch.equal(online, offline)


def test_decode_images_names_the_bad_row(photo_bytes):
    preprocess = Preprocess.from_config(SO400M_PREPROCESSOR)
    blobs = np.array([[photo_bytes["rgb.jpg"]], [b"not an image"]], dtype=object)
    with pytest.raises(DecodeError, match=r"IMAGE\[1\]"):
        serving.decode_images(blobs, preprocess)
    with pytest.raises(DecodeError, match="no image"):
        serving.decode_images(np.empty((0, 1), dtype=object), preprocess)


def test_split_rows_keeps_request_order():
    embeddings = np.arange(12, dtype=np.float32).reshape(6, 2)
    blocks = serving.split_rows(embeddings, [1, 3, 0, 2])
    assert [b.shape[0] for b in blocks] == [1, 3, 0, 2]
    np.testing.assert_array_equal(np.concatenate(blocks), embeddings)
    with pytest.raises(ValueError, match="6 embeddings"):
        serving.split_rows(embeddings, [1, 2])


def test_pixel_values_json_is_the_preprocessed_photo():
    import sklearn.datasets

    pixels = loadgen.load_pixel_values(PIXEL_VALUES_JSON)
    photo = (Path(sklearn.datasets.__file__).parent / "images" / "china.jpg").read_bytes()
    expected = Preprocess.from_config(SO400M_PREPROCESSOR)(decode(photo)).numpy()
    assert pixels.shape == (1, 3, 384, 384) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels[0], expected)
    assert PIXEL_VALUES_JSON.stat().st_size < 4 << 20


# ---------------------------------------------------------------- a real server


@dataclass
class Launched:
    """A `python -m pipelines.serve` process and the tritonserver it reported ready."""

    launcher: subprocess.Popen
    output: Path
    server_pid: int
    http_port: int
    grpc_port: int

    @property
    def base_url(self) -> str:
        return f"http://localhost:{self.http_port}/v2/models"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the launcher, wait; whatever is left of the server's session is killed (and reported)."""
        if self.launcher.poll() is None:
            self.launcher.send_signal(sig)
        try:
            code = self.launcher.wait(timeout)
        finally:
            if self.launcher.poll() is None:
                self.launcher.kill()
            kill_session(self.server_pid)
        return code


def session_processes(sid: int) -> list[int]:
    """Live processes of session `sid` (the launcher starts tritonserver as a session leader)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def kill_session(sid: int) -> None:
    for pid in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch(tmp_path: Path, *overrides: str, timeout: float = 300) -> Launched:
    """Start the launcher with free ports; return once it reports the server ready (fail with its output)."""
    output = tmp_path / "launcher.out"
    args = ["http_port=0", "grpc_port=0", "address=127.0.0.1", "echo_log=false", f"run_dir={tmp_path / 'run'}",
            *overrides]
    with open(output, "wb") as out:
        launcher = subprocess.Popen([sys.executable, "-m", "pipelines.serve", *args], cwd=REPO_ROOT,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = READY.search(output.read_text(errors="replace"))
        if match:
            pid, http_port, grpc_port = map(int, match.groups())
            return Launched(launcher, output, pid, http_port, grpc_port)
        if launcher.poll() is not None:
            pytest.fail(f"launcher exited ({launcher.returncode}) before the server was ready:\n"
                        f"{output.read_text(errors='replace')}")
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(60)
    pytest.fail(f"server not ready after {timeout} s:\n{output.read_text(errors='replace')}")


def server_args(checkpoint: Path) -> list[str]:
    # Small batches keep /dev/shm use low on CI; the 50 ms queue delay makes batching certain under load.
    return [f"model.name_or_path={checkpoint}", "max_batch_size=16", "max_queue_delay_us=50000", "num_threads=1"]


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
    index = requests.post(f"http://localhost:{server.http_port}/v2/repository/index").json()
    assert {(m["name"], m["state"]) for m in index} == {(names.SIGLIP, "READY"), (names.EMBED_IMAGE, "READY")}
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


@pytest.mark.server
def test_sixty_concurrent_seed_requests_are_batched(server, encoder):
    rng = np.random.default_rng(0)
    pixel_values_batch = rng.normal(loc=0.5, scale=0.5, size=[60, 3, 384, 384]).astype(np.float32)
    before = stats(server, names.SIGLIP)
    # The seed's "Sending Many Images" client: 60 threads, one JSON request per image.
    futures, embeddings = {}, {}
    with ThreadPoolExecutor(max_workers=60) as executor:
        for i, pixel_values in enumerate(pixel_values_batch):
            inference_request = {"inputs": [{"name": "PIXEL_VALUES", "shape": [1, 3, 384, 384], "datatype": "FP32",
                                             "data": pixel_values.flatten().tolist()}]}
            future = executor.submit(requests.post, url=f"{server.base_url}/siglip/infer", json=inference_request)
            futures[future] = i
        for future in as_completed(futures):
            response = future.result()
            assert response.status_code == 200, response.text
            embeddings[futures[future]] = np.array(response.json()["outputs"][0]["data"], dtype=np.float32)
    inferences, executions = (a - b for a, b in zip(stats(server, names.SIGLIP), before))
    assert inferences == 60 and executions < inferences
    expected = encoder.embed(torch.from_numpy(pixel_values_batch)).numpy()
    assert cosine(np.stack([embeddings[i] for i in range(60)]), expected).min() >= 0.9999


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


@pytest.mark.server
@pytest.mark.parametrize("body", [b'{"inputs": [', b"not json", b'{"inputs": [{"name": "PIXEL_VALUES"'])
def test_malformed_json_is_refused_with_a_message(server, body, photo_bytes):
    response = requests.post(f"{server.base_url}/siglip/infer", data=body,
                             headers={"Content-Type": "application/json"})
    # Triton 2.51 answers an unparsable body itself, with 500 (not 400: its JSON parser reports INTERNAL).
    assert response.status_code in (400, 500)
    assert "failed to parse the request JSON" in response.json()["error"]
    assert_still_serving(server, photo_bytes)


@pytest.mark.server
def test_a_bad_image_fails_only_its_own_request(server, photo_bytes, encoder):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"localhost:{server.grpc_port}")
    files = [photo_bytes["rgb.jpg"], b"\xff\xd8 broken jpeg", photo_bytes["flower.png"], photo_bytes["cmyk.jpg"]]
    answers: dict[int, tuple] = {}
    before = stats(server, names.EMBED_IMAGE)
    for i, data in enumerate(files):  # all in flight at once: one execute() gets good and bad requests
        tensor = grpcclient.InferInput(names.IMAGE, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[data]], dtype=object))
        client.async_infer(names.EMBED_IMAGE, [tensor], callback=lambda result, error, i=i: answers.update(
            {i: (result, error)}))
    deadline = time.monotonic() + 60
    while len(answers) < len(files) and time.monotonic() < deadline:
        time.sleep(0.05)
    inferences, executions = (a - b for a, b in zip(stats(server, names.EMBED_IMAGE), before))
    assert executions < inferences == len(files)
    assert answers[1][0] is None and "IMAGE[0]" in answers[1][1].message()
    assert "INVALID_ARGUMENT" in str(answers[1][1].status())
    for i in (0, 2, 3):
        result, error = answers[i]
        assert error is None
        pixels = Preprocess.from_config(SO400M_PREPROCESSOR)(decode(files[i])).unsqueeze(0)
        assert cosine(result.as_numpy(names.EMBEDDING), encoder.embed(pixels).numpy())[0] >= 0.9999
    client.close()


@pytest.mark.server
def test_protocols_agree(server):
    payload = loadgen.load_pixel_values(PIXEL_VALUES_JSON)
    out = {p: loadgen.make_sender(p, model=names.SIGLIP, payload=payload, host="localhost",
                                  http_port=server.http_port, grpc_port=server.grpc_port)() for p in loadgen.PROTOCOLS}
    np.testing.assert_allclose(out["http"], out["grpc"], rtol=0, atol=0)
    np.testing.assert_allclose(out["http-json"].reshape(out["http"].shape), out["http"], rtol=1e-6, atol=1e-6)


@pytest.mark.server
def test_loadgen_measures_throughput_and_latency(server):
    result = loadgen.run_load(model=names.SIGLIP, protocol="grpc", concurrency=4, duration_s=1.5, warmup_s=0.5,
                              payload=loadgen.load_pixel_values(PIXEL_VALUES_JSON), host="localhost",
                              http_port=server.http_port, grpc_port=server.grpc_port)
    summary = result.summary()
    assert summary["errors"] == 0 and summary["requests"] > 0 and summary["infer_per_s"] > 0
    assert summary["p50_ms"] <= summary["p90_ms"] <= summary["p95_ms"] <= summary["p99_ms"]
    assert summary["server_inferences"] >= summary["requests"] > 0
    assert "infer/sec" in result.report() and "| grpc | 4 |" in loadgen.format_table([summary])


@pytest.mark.server
def test_perf_analyzer_runs_the_seed_command(server):
    # The seed's command, with the server's port, a short window and fewer clients.
    command = [sys.executable, "-m", "pipelines.perf_analyzer", "-m", "siglip", "-u", f"localhost:{server.http_port}",
               "-v", "--input-data", "data/siglip/pixel_values.json", "--measurement-mode=time_windows",
               "--measurement-interval=1000", "--concurrency-range=4", "--latency-threshold=1000",
               "--stability-percentage=100", "--max-trials=3"]
    result = subprocess.run(command, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert "Successfully read data for 1 stream" in result.stdout, result.stdout + result.stderr
    assert re.search(r"Pass \[1\] throughput: [1-9][\d.]* infer/sec", result.stdout), result.stdout
    figures = serve_bench.parse_perf_analyzer(result.stdout)  # what python -m pipelines.serve_bench tabulates
    assert figures["infer_per_s"] > 0 and 0 < figures["p50_ms"] <= figures["p99_ms"]
    assert figures["server_inferences"] >= figures["server_executions"] > 0


@pytest.mark.server
def test_loadgen_cli_prints_the_table(server, photo_bytes, tmp_path):
    image = tmp_path / "photo.jpg"
    image.write_bytes(photo_bytes["rgb.jpg"])
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.loadgen", f"http_port={server.http_port}", f"grpc_port={server.grpc_port}",
         "triton_model=embed_image", f"image={image}", "protocols=[http,grpc]", "concurrency=[2]", "duration_s=1",
         "warmup_s=0.3", f"output={tmp_path / 'figures.jsonl'}"],
        check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"\| loadgen \| http \| 2 \| [1-9]", result.stdout), result.stdout
    assert re.search(r"\| loadgen \| grpc \| 2 \| [1-9]", result.stdout), result.stdout
    assert len((tmp_path / "figures.jsonl").read_text().splitlines()) == 2


def test_loadgen_cli_refuses_what_it_cannot_send():
    run = [sys.executable, "-m", "pipelines.loadgen", "duration_s=1"]
    no_image = subprocess.run([*run, "triton_model=embed_image"], check=False, cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=120)
    assert no_image.returncode == 2 and "triton_model=embed_image needs image=FILE" in no_image.stderr
    bad_protocol = subprocess.run([*run, "protocols=[udp]"], check=False, cwd=REPO_ROOT, capture_output=True,
                                  text=True, timeout=120)
    assert bad_protocol.returncode == 2 and "protocol='udp'" in bad_protocol.stderr
