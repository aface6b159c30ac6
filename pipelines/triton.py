"""Running a real `tritonserver` on the model repository: find the binary, render the repository, start, stop.

Two installs are supported: the server and Python backend bundled in the `nvidia-pytriton` wheel (any Linux
host with this package installed), and NVIDIA's Triton container (`tritonserver` on PATH, backends under
/opt/tritonserver/backends). The rendered repository is a copy of `serving/` whose `config.pbtxt` files carry
the model, dtype, device and batch sizes chosen at launch, so the code and the committed configs never change.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import names

log = logging.getLogger(__name__)

CONTAINER_BACKENDS = Path("/opt/tritonserver/backends")
# A model that fails to load: `E... model_lifecycle.cc:642] "failed to load 'siglip' version 1: Internal: ...`
LOAD_FAILED = re.compile(r"failed to load '([^']+)' version \d+: (?:Internal: )?(.*?)(?:\\n|\"$|$)")
HTTP_STARTED = "Started HTTPService at"
GRPC_STARTED = "Started GRPCInferenceService at"
_PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_STUB = "triton_python_backend_stub"
_PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """The server could not be found, started or kept running; the message carries its last log lines."""


@dataclass(frozen=True)
class ServerInstall:
    """A runnable tritonserver: the binary, a backend directory holding `python/`, and its environment."""

    binary: Path
    backend_dir: Path
    env: dict[str, str]


@dataclass(frozen=True)
class ModelOptions:
    """What `render_repository` writes into the configs (see conf/serve.yaml for each field's meaning)."""

    name_or_path: str
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    num_threads: str = "auto"
    max_batch_size: int = 64
    max_queue_delay_us: int = 2000
    decode_instances: int = 1


def find_install(binary: str, run_dir: Path) -> ServerInstall:
    """'auto': the nvidia-pytriton bundle when installed, else `tritonserver` on PATH; or a binary's path."""
    if binary == "auto":
        if importlib.util.find_spec("pytriton") is not None:
            return bundled_install(run_dir)
        binary = shutil.which("tritonserver") or ""
        if not binary:
            raise ServerError("no tritonserver: install the serve extra (pip install -e '.[serve]', which brings "
                              "nvidia-pytriton) or run inside NVIDIA's Triton container")
    path = Path(binary)
    if not path.is_file():
        raise ServerError(f"tritonserver={binary!r}: no such file")
    return ServerInstall(path, CONTAINER_BACKENDS, dict(os.environ))


def bundled_install(run_dir: Path) -> ServerInstall:
    """The tritonserver of the nvidia-pytriton wheel, with a backend directory laid out under `run_dir`."""
    package = Path(importlib.util.find_spec("pytriton").submodule_search_locations[0])
    root, libs = package / "tritonserver", package.parent / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / _STUB
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
    # The embedded interpreter of the backend needs a shared libpython of this very version.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise ServerError(f"{sys.executable} was built without a shared libpython, which Triton's Python "
                          "backend loads; use a Python built with --enable-shared (pyenv: "
                          "PYTHON_CONFIGURE_OPTS=--enable-shared) or NVIDIA's Triton container")
    backend = run_dir / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for source in [root / "backends" / "python" / name for name in _PYTHON_BACKEND_FILES] + [stub]:
        _link(source, backend / source.name)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH")) if p)
    # The stub finds its Python prefix (and so this environment's packages) from `python3` on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return ServerInstall(root / "bin" / "tritonserver", run_dir / "backends", env)


def _link(source: Path, target: Path) -> None:
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(source)


def read_config(path: Path):
    """A `config.pbtxt` file -> Triton's ModelConfig protobuf message."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


def render_repository(source: Path, target: Path, options: ModelOptions) -> Path:
    """Copy the repository `source` to `target` with `options` written into both models' config.pbtxt."""
    from google.protobuf import text_format

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.md"))
    for model, render in zip(names.MODELS, (_render_siglip, _render_embed_image)):
        path = target / model / "config.pbtxt"
        if not path.is_file():
            raise ServerError(f"{source} is not the siglip model repository: {model}/config.pbtxt is missing")
        config = read_config(path)
        config.max_batch_size = options.max_batch_size
        config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
        _set_parameter(config, names.PARAM_MODEL, options.name_or_path)
        _set_parameter(config, names.PARAM_REVISION, options.revision or "")
        render(config, options)
        path.write_text(text_format.MessageToString(config))
    return target


def _render_siglip(config, options: ModelOptions) -> None:
    from tritonclient.grpc import model_config_pb2

    _set_parameter(config, names.PARAM_DTYPE, options.dtype)
    _set_parameter(config, names.PARAM_THREADS, str(options.num_threads))
    group = config.instance_group[0]
    kind = model_config_pb2.ModelInstanceGroup.Kind
    # device=auto keeps KIND_AUTO (GPU when Triton sees one); else the instance goes where it was asked.
    if options.device == "cpu":
        group.kind = kind.Value("KIND_CPU")
    elif options.device.startswith("cuda"):
        group.kind = kind.Value("KIND_GPU")
        if ":" in options.device:
            group.gpus[:] = [int(options.device.split(":", 1)[1])]
    elif options.device != "auto":
        raise ServerError(f"device={options.device!r}: expected auto, cpu, cuda or cuda:<index>")


def _render_embed_image(config, options: ModelOptions) -> None:
    config.instance_group[0].count = options.decode_instances


def _set_parameter(config, key: str, value: str) -> None:
    config.parameters[key].string_value = value


def prepare_server(*, run_dir: Path, repository: Path, options: ModelOptions, tritonserver: str = "auto",
                   http_port: int = 8000, grpc_port: int = 8001, **settings) -> TritonServer:
    """Lay out `run_dir` (backend, rendered repository) and return a server on it, not yet started.

    Port 0 means a free port; `settings` are TritonServer's other fields (address, metrics_port, echo, ...).
    """
    return TritonServer(
        install=find_install(tritonserver, run_dir),
        repository=render_repository(repository, run_dir / "models", options),
        log_path=run_dir / "tritonserver.log",
        http_port=http_port or free_port(), grpc_port=grpc_port or free_port(), **settings,
    )


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def port_in_use(address: str, port: int) -> bool:
    """True when something listens on (address, port); connections left in TIME_WAIT do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError:
            return True
    return False


@dataclass
class TritonServer:
    """A tritonserver process on `repository`: `start()`, `wait_ready()`, `stop()`, or use it as a context.

    Its output goes to `log_path` (and to stderr when `echo`); the process runs in its own session so
    that `stop()` can end it and its Python backend stubs together, and Ctrl-C reaches only the launcher.
    """

    install: ServerInstall
    repository: Path
    log_path: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int | None = None
    address: str = "0.0.0.0"
    shm_default_mb: int = 16
    shm_growth_mb: int = 16
    exit_timeout_s: int = 5
    echo: bool = False
    process: subprocess.Popen | None = field(default=None, init=False)
    _seen: set[str] = field(default_factory=set, init=False)
    _tail: deque = field(default_factory=lambda: deque(maxlen=40), init=False)
    _load_failures: list[str] = field(default_factory=list, init=False)

    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    def command(self) -> list[str]:
        """The tritonserver command line."""
        args = [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.install.backend_dir}",
            f"--http-address={self.address}", f"--http-port={self.http_port}",
            f"--grpc-address={self.address}", f"--grpc-port={self.grpc_port}",
            "--model-control-mode=none", "--strict-readiness=true", "--exit-on-error=true",
            "--disable-auto-complete-config", "--log-verbose=0", f"--exit-timeout-secs={self.exit_timeout_s}",
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
        log.debug("starting %s", " ".join(self.command()))
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: the child only calls it
        self.process = subprocess.Popen(
            self.command(), env=self.install.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
            # SIGTERM to the server when the launcher dies, even by SIGKILL (Linux PR_SET_PDEATHSIG). The
            # launcher and the benchmark start the server before starting any thread of their own.
            preexec_fn=lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM),  # noqa: PLW1509
        )
        threading.Thread(target=self._pump, name="tritonserver-log", daemon=True).start()

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
                if self.echo:
                    print(text, file=sys.stderr, flush=True)

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until both endpoints are up and every model is ready; ServerError if the server dies first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with status {self.returncode()} before it was ready"
                                  f"{self.log_tail()}")
            # The markers prove that this process, not an older one on the same ports, answers.
            if {HTTP_STARTED, GRPC_STARTED} <= self._seen and self._ready():
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log_tail(self) -> str:
        """Why the server failed, for error messages: the models that failed to load, else its last log lines."""
        if self._load_failures:
            return ":\n" + "\n".join(self._load_failures) + f"\n(log: {self.log_path})"
        lines = [line for line in self._tail if line.strip()]
        return f"; its last log lines ({self.log_path}):\n" + "\n".join(lines) if lines else ""

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (Triton unloads its models and ends its stubs), SIGKILL if that takes `timeout_s` more than
        the server's own exit timeout; returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
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
        return self.process.wait()

    def __enter__(self) -> TritonServer:  # noqa: PYI034 - Self needs Python 3.11
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def check_shm(*, max_batch_size: int, image_bytes: int = 3 * 384 * 384 * 4, shm: str = "/dev/shm") -> None:
    """Warn when /dev/shm cannot hold a full batch twice (request in, copy to the stub): the Python backend
    would fail such batches with "Failed to increase the shared memory pool size"."""
    needed = 2 * max_batch_size * image_bytes
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        return
    if free < needed:
        log.warning("%s has %d MB free; a batch of %d images needs about %d MB: lower max_batch_size or give "
                    "the machine (container: --shm-size) more shared memory", shm, free >> 20, max_batch_size,
                    needed >> 20)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
