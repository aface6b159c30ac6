"""pipelines/serve/: the launcher (`python -m pipelines.serve`), the rendered repository, the bundled server's
layout, ports, perf_analyzer's libraries, and the launcher's life cycle (ready, stopped by SIGTERM or Ctrl-C,
nothing left)."""

from __future__ import annotations

import inspect
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from helpers.server import launch, model_options, serve_settings, server_args, session_processes

from pipelines.config import REPO_ROOT
from pipelines.serve import ServerError, names, perf_analyzer, ports, process, repository, watchdog
from pipelines.serve.__main__ import run_serve
from pipelines.serve.install import find_install

SERVING = REPO_ROOT / "serving"


def rendered(tmp_path: Path, **options) -> dict:
    target = repository.render_repository(SERVING, tmp_path / "models", model_options(**options))
    return {model: repository.read_config(target / model / "config.pbtxt") for model in names.MODELS}


def kind(config) -> str:
    return type(config.instance_group[0]).Kind.Name(config.instance_group[0].kind)


def test_render_writes_the_settings_into_both_configs(tmp_path):
    before = {m: (SERVING / m / "config.pbtxt").read_text() for m in names.MODELS}
    configs = rendered(tmp_path, name_or_path="/models/so400m", revision="abc", dtype="float16", device="cpu",
                       num_threads="2", max_batch_size=8, max_queue_delay_us=500, decode_instances=3,
                       max_pixels=1234)
    for model, config in configs.items():
        assert config.parameters[names.PARAM_MODEL].string_value == "/models/so400m"
        assert config.parameters[names.PARAM_REVISION].string_value == "abc"
        assert config.max_batch_size == 8 and config.dynamic_batching.max_queue_delay_microseconds == 500
        assert (tmp_path / "models" / model / "1" / "model.py").read_text() == \
            (SERVING / model / "1" / "model.py").read_text()
    siglip, embed_image = configs[names.SIGLIP], configs[names.EMBED_IMAGE]
    assert siglip.parameters[names.PARAM_DTYPE].string_value == "float16"
    assert siglip.parameters[names.PARAM_THREADS].string_value == "2"
    assert kind(siglip) == "KIND_CPU"
    assert kind(embed_image) == "KIND_CPU" and embed_image.instance_group[0].count == 3
    assert embed_image.parameters[names.PARAM_MAX_PIXELS].string_value == "1234"
    assert before == {m: (SERVING / m / "config.pbtxt").read_text() for m in names.MODELS}


@pytest.mark.parametrize("device, expected, gpus", [("auto", "KIND_AUTO", []), ("cuda", "KIND_GPU", []),
                                                    ("cuda:1", "KIND_GPU", [1])])
def test_render_places_siglip_on_the_device(tmp_path, device, expected, gpus):
    siglip = rendered(tmp_path, name_or_path="tiny", device=device)[names.SIGLIP]
    assert kind(siglip) == expected and list(siglip.instance_group[0].gpus) == gpus


@pytest.mark.parametrize("gpus", [1, 4])
def test_device_auto_places_one_siglip_instance_on_each_visible_gpu(tmp_path, gpus):
    siglip = rendered(tmp_path, name_or_path="tiny", device="auto", visible_gpus=gpus)[names.SIGLIP]
    assert kind(siglip) == "KIND_GPU" and list(siglip.instance_group[0].gpus) == list(range(gpus))
    assert siglip.instance_group[0].count == 1  # Triton starts `count` instances on each GPU listed
    embed_image = rendered(tmp_path, name_or_path="tiny", device="auto", visible_gpus=gpus)[names.EMBED_IMAGE]
    assert kind(embed_image) == "KIND_CPU"  # decoding stays on the CPU


def test_render_refuses_an_unknown_device(tmp_path):
    with pytest.raises(ServerError, match="device='tpu'"):
        rendered(tmp_path, name_or_path="tiny", device="tpu")
    with pytest.raises(ServerError, match="max_pixels=0"):
        rendered(tmp_path, name_or_path="tiny", max_pixels=0)


def test_the_server_listens_on_this_machine_only_by_default(tmp_path, compose_cfg):
    assert compose_cfg("serve").address == "127.0.0.1"
    # conf/serve.yaml is the one source of the setting: no second default in Python.
    assert inspect.signature(process.prepare_server).parameters["address"].default is inspect.Parameter.empty
    settings = serve_settings("metrics_port=8002")
    del settings["run_dir"]
    server = process.prepare_server(run_dir=tmp_path, **settings)
    command = server.command()
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in command
    # Model control is on (the launcher reloads crashed models) and answers only requests with the token.
    assert "--model-control-mode=explicit" in command
    assert [a for a in command if a.startswith("--load-model=")] == [f"--load-model={m}" for m in names.MODELS]
    restricted = f"model-repository:{process.CONTROL_HEADER}={server.control_token}"
    assert f"--http-restricted-api={restricted}" in command and f"--grpc-restricted-protocol={restricted}" in command
    assert len(server.control_token) >= 32 and server.control_token != process.prepare_server(
        run_dir=tmp_path / "other", **settings).control_token


def test_the_entry_point_starts_without_torch():
    code = ("import sys, pipelines.serve.__main__; heavy = {'torch', 'tritonclient'} & set(sys.modules); "
            "print(sorted(heavy)); sys.exit(bool(heavy))")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    shown = subprocess.run([sys.executable, "-m", "pipelines.serve", "--cfg", "job"], check=False, cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "address: 127.0.0.1" in shown.stdout, shown.stderr


def test_bundled_install_lays_out_the_python_backend(tmp_path):
    install = find_install("auto", tmp_path)
    assert install.binary.is_file() and install.binary.name == "tritonserver"
    backend = install.backend_dir / "python"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"):
        assert (backend / name).resolve().is_file()
    libpython = Path(install.env["LD_LIBRARY_PATH"].split(":")[0])
    assert list(libpython.glob(f"libpython{sys.version_info.major}.{sys.version_info.minor}*.so*"))
    assert install.env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_missing_binary_is_reported(tmp_path):
    with pytest.raises(ServerError, match="no such file"):
        find_install(str(tmp_path / "tritonserver"), tmp_path)


def test_a_taken_port_is_refused_before_starting(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert ports.port_in_use("127.0.0.1", port)
        with pytest.raises(ServerError, match=f"http_port={port} is in use"):
            run_serve(**serve_settings("model=tiny", f"http_port={port}", f"grpc_port={ports.free_port()}",
                                       "address=127.0.0.1", f"run_dir={tmp_path}", "echo_log=false"))
    assert not ports.port_in_use("127.0.0.1", port)


def test_perf_analyzer_libraries_are_linked():
    folder = perf_analyzer.library_dir()
    for soname in perf_analyzer.LIBRARIES:
        assert (folder / soname).resolve().is_file()
    result = subprocess.run([sys.executable, "-m", "pipelines.serve.perf_analyzer", "--version"], check=False,
                            capture_output=True, text=True, timeout=60)
    assert "error while loading shared libraries" not in result.stderr
    assert result.returncode == 0 and "Perf Analyzer Version 2.51" in result.stdout + result.stderr


def test_configs_compose(compose_cfg):
    serve = compose_cfg("serve", ["model=tiny", "http_port=9000"])
    assert serve.model.name_or_path == "tiny" and serve.http_port == 9000 and serve.grpc_port == 8001
    assert Path(serve.repository) == SERVING
    load = compose_cfg("loadgen", ["protocols=[grpc]"])
    assert list(load.protocols) == ["grpc"] and Path(load.pixel_values).is_file()


@pytest.mark.server
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_launcher_stops_the_server_and_leaves_nothing(tmp_path, tiny_checkpoint, sig):
    launched = launch(tmp_path, *server_args(tiny_checkpoint), echo=True)
    try:
        processes = session_processes(launched.server_pid)
        assert launched.server_pid in processes and len(processes) >= 3  # tritonserver and one stub per model
        regions = [Path("/dev/shm") / stub.shm_region for stub in watchdog.list_stubs(launched.server_pid)]
        assert len(regions) == len(names.MODELS) and all(region.exists() for region in regions)
        assert requests.get(f"http://localhost:{launched.http_port}/v2/health/ready").status_code == 200
    finally:
        code = launched.stop(sig)
        left = session_processes(launched.server_pid)
    output, log = launched.output.read_text(), (tmp_path / "run" / "tritonserver.log").read_text()
    assert code == 0, output
    assert left == [] and not ports.port_in_use("127.0.0.1", launched.http_port)
    assert not [region for region in regions if region.exists()]  # the stubs' shared memory is released
    assert "stopped" in output and "successfully unloaded 'siglip'" in log
    # A normal start and stop echo no Triton error line: the harmless ones stay in the log file only.
    assert not re.findall(r"^E\d{4} .*", output, flags=re.MULTILINE)
    assert "Exit timeout expired" not in log
    for harmless in process.HARMLESS:
        assert harmless not in output


@pytest.mark.server
def test_a_model_that_cannot_load_is_reported(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.serve", f"model.name_or_path={missing}", "http_port=0", "grpc_port=0",
         "address=127.0.0.1", "echo_log=false", "ready_timeout_s=120", f"run_dir={tmp_path / 'run'}"],
        check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: tritonserver exited") and str(missing) in result.stderr


@pytest.mark.server
def test_a_killed_launcher_takes_the_server_with_it(tmp_path, tiny_checkpoint):
    launched = launch(tmp_path, *server_args(tiny_checkpoint))
    try:
        launched.launcher.kill()  # SIGKILL: no clean-up code of the launcher runs
        launched.launcher.wait(30)
        deadline = time.monotonic() + 180
        while session_processes(launched.server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_processes(launched.server_pid) == []
    finally:
        launched.stop()
