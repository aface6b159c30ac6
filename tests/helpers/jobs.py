"""Starting embed jobs in tests: the CLI in a subprocess (and watching it), and the runners' settings."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from pipelines import store
from pipelines.config import REPO_ROOT
from pipelines.embed import defaults
from pipelines.runners.split import Job
from pipelines.siglip import EncoderSpec

DEADLINE_S = 180  # generous: CI shares 2 cores
# A local Ray sized for a 2-core CI machine; quiet, and without the dashboard.
LOCAL_RAY = {"num_cpus": 2, "object_store_memory": 200 * 2**20, "log_to_driver": False}


def embed_args(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.embed", "model=tiny", f"output_dir={out}", "progress=false", *extra]


def ray_embed_args(root: Path, out: Path, *extra: str) -> list[str]:
    """The CLI on a local Ray of its own (LOCAL_RAY's size) over `root`, tiny model on CPU."""
    return [sys.executable, "-m", "pipelines.embed", "model=tiny", "device=cpu", "runner=ray",
            f"runner.num_cpus={LOCAL_RAY['num_cpus']}", f"runner.object_store_memory={LOCAL_RAY['object_store_memory']}",
            "runner.log_to_driver=false", f"dataset.root={root}", f"output_dir={out}", "progress=false", *extra]


def embed_cli(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(embed_args(out, *extra), check=False, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def start_job(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(embed_args(out, *extra), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def start_job_writing(out: Path, *extra: str) -> subprocess.Popen:
    """`start_job`, returned once the job has written its first train part."""
    job = start_job(out, *extra)
    wait_for(lambda: store.parts(store.split_dir(out, "train")), job, "the first part is written")
    return job


def one_line_error(result: subprocess.CompletedProcess, rc: int = 2) -> str:
    """The last stderr line, after checking the exit status and that no traceback was printed."""
    assert result.returncode == rc, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def is_locked(path: Path) -> bool:
    """Whether another process holds an flock on `path`."""
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def open_fds(pid: int) -> list[str]:
    """The paths a process has open (Linux /proc)."""
    fds = Path(f"/proc/{pid}/fd")
    return [os.readlink(fd) for fd in fds.iterdir()] if fds.is_dir() else []


def wait_for(condition, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@contextlib.contextmanager
def stopped(proc: subprocess.Popen):
    """SIGSTOP the job's process group (it keeps its locks), SIGCONT it afterwards."""
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


@contextlib.contextmanager
def stopped_with_workers(proc: subprocess.Popen):
    """`stopped`, at a moment when the job has decode workers (none between two splits, or once it is done
    listing): stop, look, go on and look again until the deadline. Yields the job's child processes."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        with stopped(proc):
            children = psutil.Process(proc.pid).children(recursive=True)
            if children:
                yield children
                return
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before a decode worker was seen")
        assert time.monotonic() < deadline, "no decode worker seen"
        time.sleep(0.05)


def runner_job(root: Path, out: Path, **settings) -> Job:
    """A runner's `Job` for the tiny model on CPU: conf/embed.yaml's settings, with `settings` instead."""
    config = defaults()
    values = {"batch_size": config["batch_size"], "num_workers": config["num_workers"],
              "rows_per_part": config["rows_per_part"], "progress": False, "compile": config["compile"],
              "max_pixels": config["max_image_pixels"], "prefix": "t", **settings}
    return Job(encoder=EncoderSpec("tiny", None, "cpu", "float32"), root=Path(root), output_dir=Path(out), **values)


def embed_sample_subset(tmp_path_factory, *, labels: tuple[str, ...], per_split: dict[str, int]) -> tuple[Path, Path]:
    """(root, output_dir): the first `per_split[split]` images of each of `labels` in data/sample, copied to a
    dataset root and embedded with the tiny model on CPU."""
    import shutil

    from helpers.images import SAMPLE
    from pipelines.embed import run_embed

    root = tmp_path_factory.mktemp("data")
    for split, n in per_split.items():
        for label in labels:
            (root / split / label).mkdir(parents=True)
            for src in sorted((SAMPLE / split / label).iterdir())[:n]:
                shutil.copy(src, root / split / label / src.name)
    out = tmp_path_factory.mktemp("emb") / "sample-tiny"
    run_embed(root=root, splits=list(per_split), output_dir=out, model="tiny", device="cpu", num_workers=0,
              batch_size=8, progress=False)
    return root, out


def ray_cli_env(ray_tmpdir: str, *, pythonpath: Path | None = None) -> dict[str, str]:
    """The environment for a CLI job that starts a local Ray of its own under `ray_tmpdir` (never a cluster named
    by RAY_ADDRESS), with `pythonpath` first on PYTHONPATH when given."""
    env = {**os.environ, "RAY_TMPDIR": ray_tmpdir}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")])
    env.pop("RAY_ADDRESS", None)
    return env
