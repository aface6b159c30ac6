"""One job on several devices (tested as device=[cpu,cpu]), and device=auto on a GPU host whose GPUs torch
cannot use (the host's signals simulated: device files, a `nvidia-smi` on PATH)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers.jobs import embed_args, one_line_error

from pipelines import store
from pipelines.config import REPO_ROOT
from pipelines.devices import NoUsableGpuError, check_gpu_host
from pipelines.embed import run_embed
from pipelines.errors import UserError


def all_rows(out: Path) -> dict[str, np.ndarray]:
    rows = {}
    for split in ("train", "valid"):
        for part in store.parts(store.split_dir(out, split)):
            table = store.read_part(part)
            embeddings = store.embedding_matrix(table.column("embedding"), 32)
            for path, vector in zip(table.column("path").to_pylist(), embeddings):
                assert (split, path) not in rows, f"{split}/{path} written twice"
                rows[(split, path)] = vector
    return rows


@pytest.mark.job
def test_two_cpu_devices_write_what_one_process_writes(tmp_path):
    settings = {"root": REPO_ROOT / "data" / "sample", "splits": ["train", "valid"], "model": "tiny",
                "progress": False, "batch_size": 16, "num_workers": 1}
    one = run_embed(output_dir=tmp_path / "one", device="cpu", **settings)
    two = run_embed(output_dir=tmp_path / "two", device=["cpu", "cpu"], **settings)
    assert one["images"] == two["images"] == 300
    assert [d["device"] for d in two["devices"]] == ["cpu#0", "cpu#1"]
    assert sum(d["images"] for d in two["devices"]) == 300 and min(d["images"] for d in two["devices"]) > 100
    a, b = all_rows(tmp_path / "one"), all_rows(tmp_path / "two")
    assert sorted(a) == sorted(b)
    x, y = np.stack([a[k] for k in sorted(a)]), np.stack([b[k] for k in sorted(a)])
    cosine = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert cosine.min() > 0.99999
    prefixes = {p.name.split("-")[2] for split in ("train", "valid") for p in store.parts(store.split_dir(
        tmp_path / "two", split))}
    assert prefixes == {"dev0of2", "dev1of2"}  # each device writes its own parts


def start(out: Path, *extra: str) -> subprocess.Popen:
    args = embed_args(out, "device=[cpu,cpu]", "batch_size=4", "rows_per_part=8", "num_workers=1", *extra)
    return subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_parts(out: Path, proc: subprocess.Popen, count: int = 1) -> None:
    deadline = time.monotonic() + 240
    while sum(len(store.parts(store.split_dir(out, s))) for s in ("train", "valid")) < count:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no part written"
        time.sleep(0.02)


@pytest.mark.job
def test_kill_9_of_a_two_device_job_then_rerun_is_exactly_once(tmp_path):
    out = tmp_path / "out"
    proc = start(out)
    wait_for_parts(out, proc)
    os.kill(proc.pid, signal.SIGKILL)  # the job alone: its device processes must die with it
    proc.wait()
    deadline = time.monotonic() + 30
    while any("pipelines.embed" in " ".join(p.cmdline()) for p in psutil.process_iter(["cmdline"])
              if p.info["cmdline"] and str(out) in " ".join(p.info["cmdline"])) and time.monotonic() < deadline:
        time.sleep(0.1)
    before = len(all_rows(out))
    assert 0 < before < 300
    rerun = subprocess.run(embed_args(out, "device=[cpu,cpu]", "num_workers=1"), cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len(all_rows(out)) == 300  # all_rows refuses a path written twice
    assert json.loads((out / "_summary.json").read_text())["already_done"] == before


@pytest.mark.job
def test_a_device_that_dies_leaves_the_others_to_finish_and_one_line(tmp_path):
    out = tmp_path / "out"
    proc = start(out)
    wait_for_parts(out, proc)
    devices = psutil.Process(proc.pid).children()  # the job's direct children: one process per device
    assert len(devices) == 2, devices
    victim = max(devices, key=lambda p: p.create_time())  # the second device's
    victim.kill()
    _, stderr = proc.communicate(timeout=600)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    line = one_line_error(result)
    assert line.startswith("error: device cpu#") and "failed: its process was killed by SIGKILL (out of memory?)" \
        in line and "the other device(s) finished" in line and "rerun the same command" in line, line
    saved = len(all_rows(out))
    assert 0 < saved < 300
    rerun = subprocess.run(embed_args(out, "device=[cpu,cpu]", "num_workers=1"), cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len(all_rows(out)) == 300


def fake_nvidia_smi(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0000)'\n")
    smi.chmod(0o755)
    return folder


def test_device_auto_on_a_gpu_host_torch_cannot_use_stops_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host's torch reaches its GPUs")
    bin_dir = fake_nvidia_smi(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(embed_args(tmp_path / "out"), cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300, check=False, env=env)
    line = one_line_error(result)
    assert line.startswith("error: device=auto: this host has NVIDIA GPUs (GPU 0: NVIDIA H100 80GB HBM3")
    assert "torch cannot use them" in line and "pass device=cpu to run on the CPU on purpose" in line
    assert not (tmp_path / "out").exists()  # stopped before anything was made or loaded
    on_purpose = subprocess.run(embed_args(tmp_path / "out", "device=cpu", "splits=[valid]"), cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=300, check=False, env=env)
    assert on_purpose.returncode == 0, on_purpose.stderr[-2000:]


def test_the_cause_is_named(tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host's torch reaches its GPUs")
    (tmp_path / "nvidia0").touch()
    (tmp_path / "nvidiactl").touch()
    no_smi = lambda name: None  # noqa: E731
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(NoUsableGpuError, match=r"\(.*/nvidia0\).*CUDA_VISIBLE_DEVICES='' hides every GPU"):
        check_gpu_host("auto", dev_dir=str(tmp_path), which=no_smi)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    if torch.version.cuda is None:
        expected = "CPU-only build"
    else:
        expected = "NVIDIA driver is missing or does not match this torch"
    with pytest.raises(NoUsableGpuError, match=expected):
        check_gpu_host("auto", dev_dir=str(tmp_path), which=no_smi)
    check_gpu_host("cpu", dev_dir=str(tmp_path), which=no_smi)  # on purpose: passes
    check_gpu_host("auto", dev_dir=str(tmp_path / "none"), which=no_smi)  # no GPU: the CPU is what auto means


@pytest.mark.parametrize(("device", "message"), [
    (["cpu", "cuda:0"], "one kind of device per job"),
    (["cuda:0", "cuda:0"], "a CUDA device is named twice"),
    ([], "expected auto, cpu, cuda, cuda:N or mps, or a list of them"),
    (["auto", "cpu"], "expected auto, cpu, cuda, cuda:N or mps, or a list of them"),
    ("auto:1", "expected auto, cpu, cuda, cuda:N or mps"),
])
def test_device_lists_that_cannot_work_are_one_line(tmp_path, device, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_embed(root=REPO_ROOT / "data" / "sample", splits=["valid"], output_dir=tmp_path / "o", model="tiny",
                  device=device)
