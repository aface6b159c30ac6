"""The `tritonserver` process: its command line, start, readiness, model control, log, stop and restart.

`prepare_server` lays out a run folder (backend directory, rendered repository) and returns a TritonServer on
it; `pipelines.serve.watchdog` reloads a model whose backend stub dies while it serves.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.hub import WeightsUnavailableError, input_geometry
from pipelines.serve import ServerError, names, watchdog
from pipelines.serve.install import ServerInstall, find_install
from pipelines.serve.ports import free_port, port_in_use
from pipelines.serve.repository import ModelOptions, render_repository

log = logging.getLogger(__name__)

# A model that fails to load: `E... model_lifecycle.cc:642] "failed to load 'siglip' version 1: Internal: ...`
LOAD_FAILED = re.compile(r"failed to load '([^']+)' version \d+: (?:Internal: )?(.*?)(?:\\n|\"$|$)")
HTTP_STARTED = "Started HTTPService at"
GRPC_STARTED = "Started GRPCInferenceService at"
_PR_SET_PDEATHSIG = 1
# Triton's model control (load, unload, repository index) answers only requests carrying this header with the
# server's own token: the launcher uses it to reload a model, and nobody who merely reaches the port can.
CONTROL_HEADER = "pipelines-model-control"
_SHM_PREFIX = "triton_python_backend_shm_region_"
# Lines Triton logs as errors on every start of a host without a GPU: kept in tritonserver.log, not echoed.
HARMLESS = ("CudaDriverHelper has not been initialized",)


def prepare_server(*, run_dir: Path, model: str, revision: str | None, repository: str | Path, device: str,
                   dtype: str, num_threads: str | int, max_batch_size: int, max_queue_delay_us: int,
                   decode_instances: int, max_pixels: int, tritonserver: str, http_port: int, grpc_port: int,
                   metrics_port: int | None, address: str, shm_default_mb: int, shm_growth_mb: int,
                   exit_timeout_s: int, ready_timeout_s: float, echo_log: bool) -> TritonServer:
    """Lay out `run_dir` (backend, rendered repository) and return a server on it, not yet started.

    The arguments are conf/serve.yaml's keys (`model`, `revision`: its model group); port 0 means a free port.
    """
    if Path(model).expanduser().is_dir():  # the model instances run in other processes: no relative paths
        model = str(Path(model).expanduser().resolve())
    options = ModelOptions(
        name_or_path=model, revision=revision, dtype=dtype, device=device, num_threads=str(num_threads),
        max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us, decode_instances=decode_instances,
        max_pixels=max_pixels, geometry=_geometry(model, revision), visible_gpus=_visible_gpus(device),
    )
    return TritonServer(
        install=find_install(tritonserver, run_dir),
        repository=render_repository(Path(repository), run_dir / "models", options),
        log_path=run_dir / "tritonserver.log",
        http_port=http_port or free_port(), grpc_port=grpc_port or free_port(), metrics_port=metrics_port,
        address=address, shm_default_mb=shm_default_mb, shm_growth_mb=shm_growth_mb, exit_timeout_s=exit_timeout_s,
        load_timeout_s=ready_timeout_s, echo=echo_log,
    )


def _visible_gpus(device: str) -> int:
    """The CUDA devices torch sees (CUDA_VISIBLE_DEVICES respected), for device=auto's one instance per GPU."""
    if device != "auto":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _geometry(model: str, revision: str | None) -> tuple[str, int, int] | None:
    """`hub.input_geometry`, or None (siglip's committed inputs) when the checkpoint's config cannot be had here:
    the model instances then say so themselves, in their own load error, as for any checkpoint."""
    try:
        return input_geometry(model, revision)
    except WeightsUnavailableError as exc:
        log.warning("%s; siglip keeps its committed inputs", exc)
        return None


@dataclass(kw_only=True)
class TritonServer:
    """A tritonserver process on `repository`: `start()`, `wait_ready()`, `stop()`, or use it as a context.

    Its output goes to `log_path` (and to stderr when `echo`, less the HARMLESS lines); the process runs in its
    own session so that `stop()` can end it and its Python backend stubs together, and Ctrl-C reaches only the
    launcher. Models are loaded through Triton's explicit model control, which only this object may use (see
    CONTROL_HEADER): once ready, a watchdog reloads a model whose stub died (`heal`), and `stop()` unloads
    every model before SIGTERM, so the stubs end and release their /dev/shm regions within the exit timeout.
    """

    install: ServerInstall
    repository: Path
    log_path: Path
    http_port: int
    grpc_port: int
    metrics_port: int | None
    address: str
    shm_default_mb: int
    shm_growth_mb: int
    exit_timeout_s: int
    load_timeout_s: float
    echo: bool
    heal: bool = True
    process: subprocess.Popen | None = field(default=None, init=False)
    control_token: str = field(default_factory=lambda: secrets.token_hex(16), init=False, repr=False)
    _seen: set[str] = field(default_factory=set, init=False)
    _tail: deque = field(default_factory=lambda: deque(maxlen=40), init=False)
    _load_failures: list[str] = field(default_factory=list, init=False)
    _watchdog: watchdog.StubWatchdog | None = field(default=None, init=False)
    _pump_thread: threading.Thread | None = field(default=None, init=False)
    # Set by the watchdog when a model cannot be unloaded (its dead stub left Triton waiting on it): only a
    # new server process frees it. The launcher's main thread calls `restart()` (PDEATHSIG follows the thread
    # that started the server, so the watchdog thread must not start one).
    restart_needed: threading.Event = field(default_factory=threading.Event, init=False)

    @property
    def shm_prefix(self) -> str:
        """The start of this server's /dev/shm region names: what it leaves there can be found and removed."""
        return f"{_SHM_PREFIX}{self.control_token[:12]}_"

    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    def command(self) -> list[str]:
        """The tritonserver command line."""
        restricted = f"model-repository:{CONTROL_HEADER}={self.control_token}"
        args = [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.install.backend_dir}",
            f"--http-address={self.address}", f"--http-port={self.http_port}",
            f"--grpc-address={self.address}", f"--grpc-port={self.grpc_port}",
            "--model-control-mode=explicit", *(f"--load-model={model}" for model in names.MODELS),
            f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}",
            "--strict-readiness=true", "--exit-on-error=true",
            "--disable-auto-complete-config", "--log-verbose=0", f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--backend-config=python,shm-default-byte-size={self.shm_default_mb << 20}",
            f"--backend-config=python,shm-growth-byte-size={self.shm_growth_mb << 20}",
        ]
        if self.metrics_port is None:
            args.append("--allow-metrics=false")
        else:
            args += [f"--metrics-address={self.address}", f"--metrics-port={self.metrics_port}"]
        if not _cuda_available():
            # Without a GPU these pools only cost start-up time and warnings.
            args += ["--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0"]
        return args

    def start(self) -> None:
        """Start the process; raises ServerError when one of its ports is taken already."""
        for flag, port in (("http_port", self.http_port), ("grpc_port", self.grpc_port),
                           ("metrics_port", self.metrics_port)):
            if port is not None and port_in_use(self.address, port):
                raise ServerError(f"{flag}={port} is in use (another server?): stop it or choose another port")
        log.debug("starting %s", " ".join(self.command()).replace(self.control_token, "<token>"))
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: the child only calls it
        self.process = subprocess.Popen(
            self.command(), env=self.install.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
            # SIGTERM to the server when the launcher dies, even by SIGKILL (Linux PR_SET_PDEATHSIG). The
            # launcher and the benchmark start the server before starting any thread of their own.
            preexec_fn=lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM),  # noqa: PLW1509
        )
        self._pump_thread = threading.Thread(target=self._pump, name="tritonserver-log", daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        with open(self.log_path, "ab") as out:
            for line in self.process.stdout:
                out.write(line)
                out.flush()
                text = line.decode("utf-8", "replace").rstrip()
                self._tail.append(text)
                self._seen.update(marker for marker in (HTTP_STARTED, GRPC_STARTED) if marker in text)
                if failed := LOAD_FAILED.search(text):
                    self._load_failures.append(f"model {failed[1]}: {failed[2]}")
                if self.echo and not any(harmless in text for harmless in HARMLESS):
                    print(text, file=sys.stderr, flush=True)

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until both endpoints are up and every model is ready; ServerError if the server dies first.

        From then on (with `heal`) a watchdog thread reloads any model whose backend stub dies.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                if self._pump_thread is not None:
                    self._pump_thread.join(timeout=10)  # its last lines say why
                raise ServerError(f"tritonserver exited with status {self.returncode()} before it was ready"
                                  f"{self.log_tail()}")
            # The markers prove that this process, not an older one on the same ports, answers.
            if {HTTP_STARTED, GRPC_STARTED} <= self._seen and self._ready():
                if self.heal and self._watchdog is None:
                    self._watchdog = watchdog.StubWatchdog(self)
                    self._watchdog.start()
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def control(self, path: str, *, timeout_s: float = 30.0) -> object:
        """POST to Triton's model control API (`repository/index`, `repository/models/<m>/load`, ...) with the
        token; returns the decoded JSON answer (None when empty); ServerError with Triton's message."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/v2/{path}", data=b"", method="POST",
            headers={CONTROL_HEADER: self.control_token},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            raise ServerError(f"{path}: HTTP {exc.code}: {_error_text(exc.read())}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ServerError(f"{path}: {exc}") from exc
        return json.loads(body) if body.strip() else None

    def model_states(self) -> dict[str, str]:
        """Each model of the repository and its state (READY, UNLOADING, UNAVAILABLE, LOADING)."""
        return {entry["name"]: entry.get("state", "UNAVAILABLE") for entry in self.control("repository/index")}

    def load(self, model: str) -> None:
        """(Re)load `model`; returns once it is ready, ServerError with Triton's reason if it cannot load."""
        self.control(f"repository/models/{model}/load", timeout_s=self.load_timeout_s)

    def stubs(self) -> list[watchdog.Stub]:
        """This server's Python backend stubs, live or dead but not yet reaped."""
        return [] if self.process is None else watchdog.list_stubs(self.process.pid)

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log_tail(self) -> str:
        """Why the server failed, for error messages: the models that failed to load, else its last log lines."""
        # The first line says it all: entry points print only that line of an error.
        if self._load_failures:
            return ": " + "; ".join(dict.fromkeys(self._load_failures)) + f" (log: {self.log_path})"
        lines = [line for line in self._tail if line.strip()]
        if not lines:
            return f" (log: {self.log_path})"
        return f"; its last log line: {lines[-1]} (log: {self.log_path}); before it:\n" + "\n".join(lines[:-1])

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """Unload every model (their stubs end and free /dev/shm), SIGTERM, and SIGKILL if the server takes
        `timeout_s` more than its own exit timeout; returns the exit status."""
        if self.process is None:
            return None
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self.process.poll() is None:
            if not self.restart_needed.is_set():  # a wedged model would only make the unload wait
                self._unload_all(timeout_s)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.exit_timeout_s + timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %.0f s: killing it", timeout_s)
        # Whatever is left of its session (a stub the server did not reap, or the server itself) goes too.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        code = self.process.wait()
        self._remove_regions()
        return code

    def restart(self) -> None:
        """Replace a server that cannot recover (see watchdog.StubWatchdog): kill its session at once (its
        requests in flight fail; a clean stop would only wait out the exit timeout on the wedged model), remove
        its /dev/shm regions, and start a new server on the same ports."""
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.process.wait()
            self._remove_regions()
        self.restart_needed.clear()
        self._seen.clear()
        self._load_failures.clear()
        self.start()
        self.wait_ready(self.load_timeout_s)

    def _remove_regions(self) -> None:
        # Only once the server and its stubs are gone: Triton reopens a region by name when it grows it.
        for path in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            log.info("removing %s, left by tritonserver", path)
            path.unlink(missing_ok=True)

    def _unload_all(self, timeout_s: float) -> None:
        # Triton's own shutdown spends its exit timeout waiting for idle client connections and then exits
        # without unloading ("Exit timeout expired"), which leaves the stubs' /dev/shm regions behind.
        try:
            for model, state in self.model_states().items():
                if state == "READY":
                    self.control(f"repository/models/{model}/unload")
            deadline = time.monotonic() + timeout_s
            while any(s in ("READY", "UNLOADING") for s in self.model_states().values()):
                if time.monotonic() > deadline:
                    log.warning("models still unloading after %.0f s; stopping tritonserver anyway", timeout_s)
                    return
                time.sleep(0.1)
        except ServerError as exc:  # not up yet, or hung: SIGTERM does what it can
            log.debug("could not unload the models before stopping: %s", exc)

    def __enter__(self) -> TritonServer:  # noqa: PYI034 - Self needs Python 3.11
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _error_text(body: bytes) -> str:
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
