"""Starting `python -m pipelines.serve` for a test and finding what it started: the launcher, its tritonserver
(a session leader) and that session's processes; the launcher's settings as conf/serve.yaml gives them."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipelines.config import CONF_DIR, REPO_ROOT
from pipelines.serve.repository import ModelOptions

# The launcher's line once the server is ready: tritonserver's pid, the HTTP and the gRPC port.
READY = re.compile(r"tritonserver \(pid (\d+)\) ready .*HTTP http://localhost:(\d+), gRPC localhost:(\d+)")


def serve_settings(*overrides: str) -> dict:
    """conf/serve.yaml with Hydra `overrides`, as `python -m pipelines.serve` passes it on: `model` and
    `revision` from the model group, every other key as it is."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        settings = OmegaConf.to_container(compose(config_name="serve", overrides=list(overrides)), resolve=True)
    model = settings.pop("model")
    return {"model": model["name_or_path"], "revision": model["revision"], **settings}


def model_options(**options) -> ModelOptions:
    """ModelOptions with conf/serve.yaml's values, but for `options`."""
    settings = serve_settings()
    defaults = {"name_or_path": settings["model"], "num_threads": str(settings["num_threads"]),
                **{key: settings[key] for key in ("revision", "dtype", "device", "max_batch_size",
                                                  "max_queue_delay_us", "decode_instances", "max_pixels")}}
    return ModelOptions(**{**defaults, **options})


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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 180) -> int:
        """Signal the launcher, wait; whatever is left of the server's session is killed (and reported)."""
        sessions = {self.server_pid}
        if self.launcher.poll() is None:
            with contextlib.suppress(AssertionError):
                sessions.add(current_server_pid(self))  # a replacement the launcher started
            self.launcher.send_signal(sig)
        try:
            code = self.launcher.wait(timeout)
        finally:
            if self.launcher.poll() is None:
                self.launcher.kill()
            for sid in sessions:
                kill_session(sid)
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


def launch(tmp_path: Path, *overrides: str, timeout: float = 300, echo: bool = False) -> Launched:
    """Start the launcher with free ports; return once it reports the server ready (fail with its output)."""
    output = tmp_path / "launcher.out"
    args = ["http_port=0", "grpc_port=0", f"echo_log={str(echo).lower()}", f"run_dir={tmp_path / 'run'}",
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


def current_server_pid(server: Launched) -> int:
    """The launcher's tritonserver now (the launcher replaces it when a crashed model cannot be reloaded)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if "(tritonserver)" in stat and int(stat.rsplit(")", 1)[1].split()[1]) == server.launcher.pid:
                return int(entry.name)
    raise AssertionError("the launcher has no tritonserver")


def server_args(checkpoint: Path) -> list[str]:
    # Small batches keep /dev/shm use low on CI; the 50 ms queue delay makes batching certain under load.
    return [f"model.name_or_path={checkpoint}", "max_batch_size=16", "max_queue_delay_us=50000", "num_threads=1"]
