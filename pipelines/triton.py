"""Running a real `tritonserver` on the model repository: find the binary, render the repository, start, stop.

Two installs are supported: the server and Python backend bundled in the `nvidia-pytriton` wheel (any Linux
host with this package installed), and NVIDIA's Triton container (`tritonserver` on PATH, backends under
/opt/tritonserver/backends). The rendered repository is a copy of `serving/` whose `config.pbtxt` files carry
the model, dtype, device and batch sizes chosen at launch, so the code and the committed configs never change.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import re
import secrets
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
# Triton's model control (load, unload, repository index) answers only requests carrying this header with the
# server's own token: the launcher uses it to reload a model, and nobody who merely reaches the port can.
CONTROL_HEADER = "pipelines-model-control"
_SHM_PREFIX = "triton_python_backend_shm_region_"
# Lines Triton logs as errors on every start of a host without a GPU: kept in tritonserver.log, not echoed.
HARMLESS = ("CudaDriverHelper has not been initialized",)


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
    max_pixels: int = 25_000_000


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
    if options.max_pixels < 1:
        raise ServerError(f"max_pixels={options.max_pixels}: expected a positive number of pixels")
    _set_parameter(config, names.PARAM_MAX_PIXELS, str(options.max_pixels))


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

    Its output goes to `log_path` (and to stderr when `echo`, less the HARMLESS lines); the process runs in its
    own session so that `stop()` can end it and its Python backend stubs together, and Ctrl-C reaches only the
    launcher. Models are loaded through Triton's explicit model control, which only this object may use (see
    CONTROL_HEADER): once ready, a watchdog reloads a model whose stub died (`heal`), and `stop()` unloads
    every model before SIGTERM, so the stubs end and release their /dev/shm regions within the exit timeout.
    """

    install: ServerInstall
    repository: Path
    log_path: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int | None = None
    address: str = "127.0.0.1"
    shm_default_mb: int = 16
    shm_growth_mb: int = 16
    exit_timeout_s: int = 5
    load_timeout_s: float = 900.0
    heal: bool = True
    echo: bool = False
    process: subprocess.Popen | None = field(default=None, init=False)
    control_token: str = field(default_factory=lambda: secrets.token_hex(16), init=False, repr=False)
    _seen: set[str] = field(default_factory=set, init=False)
    _tail: deque = field(default_factory=lambda: deque(maxlen=40), init=False)
    _load_failures: list[str] = field(default_factory=list, init=False)
    _watchdog: StubWatchdog | None = field(default=None, init=False)
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
                    self._watchdog = StubWatchdog(self)
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

    def stubs(self) -> list[Stub]:
        """This server's Python backend stubs, live or dead but not yet reaped."""
        return [] if self.process is None else list_stubs(self.process.pid)

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
        """Replace a server that cannot recover (see StubWatchdog): kill its session at once (its requests in
        flight fail; a clean stop would only wait out the exit timeout on the wedged model), remove its
        /dev/shm regions, and start a new server on the same ports."""
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


@dataclass(frozen=True)
class Stub:
    """One Python backend stub process: pid, start time (tells a reused pid apart), model, /dev/shm region."""

    pid: int
    start_time: int
    model: str
    shm_region: str


def list_stubs(server_pid: int) -> list[Stub]:
    """The live Python backend stubs that are children of `server_pid` (a stub's own children are not)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # A stub's command line: the stub, <repository>/<model>/<version>/model.py, its shm region name, ...
        if int(fields[1]) != server_pid or len(argv) < 3 or Path(os.fsdecode(argv[0])).name != _STUB:
            continue
        found.append(Stub(pid=int(entry.name), start_time=int(fields[19]),
                          model=Path(os.fsdecode(argv[1])).parent.parent.name, shm_region=os.fsdecode(argv[2])))
    return found


def stub_exit(stub: Stub) -> str | None:
    """None while `stub` lives; else how it ended ('killed by signal 9', 'exited with status 1', 'ended')."""
    try:
        fields = Path(f"/proc/{stub.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return "ended"
    if int(fields[19]) != stub.start_time:
        return "ended"  # the pid belongs to another process now
    if fields[0] not in ("Z", "X"):
        return None
    status = int(fields[49]) if len(fields) > 49 else 0  # a zombie's wait status (Linux 3.5+)
    return f"killed by signal {status & 0x7F}" if status & 0x7F else f"exited with status {status >> 8}"


class StubWatchdog:
    """Reloads a model whose Python backend stub died: Triton 2.51 neither restarts the stub nor stops
    reporting the model ready; every request to it fails with "Stub process ... is not healthy" until then.

    Every `poll_s` it looks at the stubs the server had when the model was last (re)loaded. When one of them
    is dead it unloads the model (readiness turns false at once). If Triton ends the instance within
    `unload_timeout_s` (the dead stub reaped, its /dev/shm region freed), it loads the model again, retrying
    every `retry_s` if that fails. If not (a stub killed in the middle of a request can leave Triton waiting
    on it for good), it sets `server.restart_needed`: the launcher then replaces the server process.
    """

    def __init__(self, server: TritonServer, *, poll_s: float = 0.5, retry_s: float = 5.0,
                 unload_timeout_s: float = 5.0) -> None:
        self.server, self.poll_s, self.retry_s, self.unload_timeout_s = server, poll_s, retry_s, unload_timeout_s
        self.known: dict[str, list[Stub]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tritonserver-watchdog", daemon=True)

    def start(self) -> None:
        self.known = self._by_model(self.server.stubs())
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s) and self.server.returncode() is None:
            for model, stubs in list(self.known.items()):
                ended = {stub.pid: how for stub in stubs if (how := stub_exit(stub))}
                dead = [stub for stub in stubs if stub.pid in ended]
                if dead and not self._stop.is_set() and not self._heal(model, dead, ended):
                    return  # the server is to be replaced; its next watchdog takes over

    def _heal(self, model: str, dead: list[Stub], ended: dict[int, str]) -> bool:
        """Unload and reload `model`; False when the server itself must be restarted."""
        found = time.monotonic()
        for stub in dead:
            log.warning("model %s: its Triton backend stub (pid %d) %s; reloading the model", model, stub.pid,
                        ended[stub.pid])
        if not self._unload(model, dead):
            log.warning("model %s: Triton did not release the dead stub within %.0f s; restarting tritonserver",
                        model, self.unload_timeout_s)
            self.server.restart_needed.set()
            return False
        while not self._stop.is_set() and self.server.returncode() is None:
            try:
                self.server.load(model)
            except ServerError as exc:
                log.error("model %s: reload failed, retrying in %.0f s: %s", model, self.retry_s, exc)
                self._stop.wait(self.retry_s)
                continue
            self.known[model] = self._by_model(self.server.stubs()).get(model, [])
            log.info("model %s: ready again %.1f s after its stub was found dead", model, time.monotonic() - found)
            return True
        return True

    def _unload(self, model: str, dead: list[Stub]) -> bool:
        """Unload `model`; True once Triton has destroyed the instances: the model unavailable, the dead stubs
        reaped (Triton waits for a stub when it destroys its instance) and their regions gone."""
        deadline = time.monotonic() + self.unload_timeout_s
        try:
            self.server.control(f"repository/models/{model}/unload")
            while self.server.model_states().get(model) in ("READY", "UNLOADING") or any(
                    stub_exit(stub) != "ended" or (Path("/dev/shm") / stub.shm_region).exists()
                    for stub in dead):
                if time.monotonic() > deadline or self._stop.is_set():
                    return False
                time.sleep(0.1)
        except ServerError as exc:
            log.warning("model %s: unload failed: %s", model, exc)
            return False
        return True

    @staticmethod
    def _by_model(stubs: list[Stub]) -> dict[str, list[Stub]]:
        models: dict[str, list[Stub]] = {}
        for stub in stubs:
            models.setdefault(stub.model, []).append(stub)
        return models


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
