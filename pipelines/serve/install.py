"""Finding a runnable `tritonserver` and its Python backend, and checking what the host gives it.

Two installs are supported: the server and Python backend bundled in the `nvidia-pytriton` wheel (any Linux
host with this package installed), and NVIDIA's Triton container (`tritonserver` on PATH, backends under
/opt/tritonserver/backends).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from pipelines.serve import ServerError

log = logging.getLogger(__name__)

CONTAINER_BACKENDS = Path("/opt/tritonserver/backends")
STUB = "triton_python_backend_stub"  # the Python backend's per-instance process (and its file name)
_PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


@dataclass(frozen=True)
class ServerInstall:
    """A runnable tritonserver: the binary, a backend directory holding `python/`, and its environment."""

    binary: Path
    backend_dir: Path
    env: dict[str, str]


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
    stub = root / "python_backend_stubs" / version / STUB
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
