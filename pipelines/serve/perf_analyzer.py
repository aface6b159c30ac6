"""`python -m pipelines.serve.perf_analyzer ARGS...`: Triton's perf_analyzer from the tritonclient 2.51 wheel.

The wheel installs the binary (`<venv>/bin/perf_analyzer`) but not two libraries it links: libb64.so.0d and
libcudart.so.12. nvidia-pytriton vendors both under hashed names; this links them under their sonames into
`<venv>/lib/perf_analyzer-libs` and runs the binary with that folder on LD_LIBRARY_PATH. The arguments are
perf_analyzer's own and pass through unchanged (hence no Hydra here), e.g. the seed's command:

    python -m pipelines.serve.perf_analyzer -m siglip -v --input-data data/siglip/pixel_values.json \
        --measurement-mode=time_windows --measurement-interval=20000 --concurrency-range=60 --latency-threshold=1000

To type `perf_analyzer ...` itself: `eval "$(python -m pipelines.serve.perf_analyzer --print-env)"`.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from pipelines.config import UserError, clean_errors

# soname the binary asks for -> pattern of the vendored file in nvidia_pytriton.libs
LIBRARIES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


def find_binary() -> Path:
    """The perf_analyzer next to this interpreter (the tritonclient wheel's), else the one on PATH."""
    beside = Path(sys.executable).parent / "perf_analyzer"
    found = beside if beside.is_file() else shutil.which("perf_analyzer")
    if not found:
        raise UserError("perf_analyzer not found: pip install 'tritonclient[http,grpc]==2.51.0' (its manylinux "
                        "wheel carries the binary), or use NVIDIA's Triton SDK container")
    return Path(found)


def library_dir() -> Path:
    """A folder holding libb64.so.0d and libcudart.so.12, linked from nvidia-pytriton's vendored copies."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None:
        raise UserError("nvidia-pytriton is not installed (it vendors perf_analyzer's libraries): "
                        "pip install -e '.[serve]'")
    vendored = Path(spec.submodule_search_locations[0]).parent / "nvidia_pytriton.libs"
    target = Path(sys.prefix) / "lib" / "perf_analyzer-libs"
    if not os.access(target.parent, os.W_OK):
        target = Path(tempfile.gettempdir()) / f"perf_analyzer-libs-{os.getuid()}"
    target.mkdir(parents=True, exist_ok=True)
    for soname, pattern in LIBRARIES.items():
        matches = sorted(vendored.glob(pattern))
        if not matches:
            raise UserError(f"{vendored} has no {pattern}: install nvidia-pytriton==0.7.0 (the serve extra)")
        staged = target / f".{soname}.{os.getpid()}"
        staged.unlink(missing_ok=True)
        staged.symlink_to(matches[-1])
        staged.replace(target / soname)  # atomic: a concurrent run never sees the link missing
    return target


def environment() -> dict[str, str]:
    """This process's environment with the library folder first on LD_LIBRARY_PATH and the binary on PATH."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(library_dir()), env.get("LD_LIBRARY_PATH")) if p)
    env["PATH"] = os.pathsep.join([str(find_binary().parent), env.get("PATH", "")])
    return env


@clean_errors()
def main(argv: list[str]) -> None:
    if argv[:1] == ["--print-env"]:
        env = environment()
        print(f"export LD_LIBRARY_PATH={shlex.quote(env['LD_LIBRARY_PATH'])} PATH={shlex.quote(env['PATH'])}")
        return
    binary = find_binary()
    os.execve(binary, [str(binary), *argv], environment())


if __name__ == "__main__":
    main(sys.argv[1:])
