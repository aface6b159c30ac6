"""Hostile files end to end: a decoder that really segfaults, a bomb, symlink loops, 16-bit and broken files.

The crash: PNGs now go through PIL, which raises on the crash PNG, so these tests put torchvision's raw PNG
decoder back (monkeypatched in this process, whose forked DataLoader workers inherit it; or, for jobs in a
subprocess, through `hostile_files.write_crash_hook` on PYTHONPATH). torchvision then really segfaults.
"""

from __future__ import annotations

import faulthandler
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import hostile_files
from helpers.images import SAMPLE
from helpers.jobs import runner_job

import pipelines.data
from pipelines import store
from pipelines.data import list_split
from pipelines.runners import local
from pipelines.runners.split import SplitStats
from pipelines.siglip import load_encoder

CRASH_REASON = "DecodeError: decoder crashed (signal 11)"


def split_folder(output_dir: Path, split: str) -> Path:
    """Where the store keeps a split's parts and errors (`store.split_dir` where the store has one)."""
    return store.split_dir(output_dir, split) if hasattr(store, "split_dir") else output_dir / split


@pytest.fixture(autouse=True)
def quiet_segfaults():
    """The segfaults here are expected: pytest's fault handler, inherited by every forked worker, would print
    each one's stack (200 lines); the children still die of the signal without it."""
    enabled = faulthandler.is_enabled()
    faulthandler.disable()
    yield
    if enabled:
        faulthandler.enable()


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("tiny", device="cpu")


def crash_folder(root: Path) -> tuple[list[str], list[str]]:
    """train/<2 classes>/: 6 sample PNGs each and a crash PNG in each (different batches); (good, crashing)."""
    good, crashing = [], []
    for label in ("bag", "coat"):
        folder = root / "train" / label
        folder.mkdir(parents=True)
        for src in sorted((SAMPLE / "train" / label).iterdir())[:6]:
            shutil.copy(src, folder / src.name)
            good.append(f"train/{label}/{src.name}")
        hostile_files.write_crash_png(folder / "crash.png")
        crashing.append(f"train/{label}/crash.png")
    return sorted(good), sorted(crashing)


def embed_train(encoder, root: Path, out: Path, *, device_decode: bool = False, **kwargs) -> SplitStats:
    job = runner_job(root, out, **{"batch_size": 4, "num_workers": 1, "rows_per_part": 100, **kwargs})
    return local.embed_split(encoder, job, split="train", records=list_split(root, "train"),
                             device_decode=device_decode)


@pytest.mark.job
@pytest.mark.parametrize(("num_workers", "device_decode"), [(0, False), (1, False), (2, False), (1, True)])
def test_a_segfaulting_decoder_costs_only_its_file(encoder, tmp_path, monkeypatch, num_workers, device_decode):
    monkeypatch.setattr(pipelines.data, "decode", hostile_files.torchvision_png_decode(pipelines.data.decode))
    good, crashing = crash_folder(tmp_path / "images")
    out = tmp_path / "out"

    stats = embed_train(encoder, tmp_path / "images", out, num_workers=num_workers, device_decode=device_decode)

    embedded = store.read_split(out, "train").paths
    assert sorted(embedded) == good  # every good image, once
    errors = store.read_errors(split_folder(out, "train"))
    assert sorted(e["path"] for e in errors) == crashing
    assert {e["error"] for e in errors} == {CRASH_REASON}
    assert stats.embedded == len(good) and stats.errors == len(crashing)
    again = embed_train(encoder, tmp_path / "images", out, num_workers=num_workers, device_decode=device_decode)
    assert again.embedded == again.errors == 0 and again.already_done == len(good) + len(crashing)


@pytest.mark.job
def test_workers_dying_without_a_culprit_end_with_one_line(encoder, tmp_path, monkeypatch):
    # Workers killed from outside (as an out-of-memory killer does) while every file decodes fine on its own.
    real = pipelines.data.decode

    def killed_in_workers(data: bytes, **kwargs) -> torch.Tensor:
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(data, **kwargs)

    monkeypatch.setattr(pipelines.data, "decode", killed_in_workers)
    crash_folder(tmp_path / "images")
    with pytest.raises(local.DecodeWorkersDiedError, match=r"died 3 times in a row and no file crashes"):
        embed_train(encoder, tmp_path / "images", tmp_path / "out")
    assert not store.read_errors(split_folder(tmp_path / "out", "train"))  # nothing innocent was recorded


@pytest.mark.job
def test_a_file_that_hangs_its_decoder_costs_only_itself(encoder, tmp_path, monkeypatch):
    real = pipelines.data.decode

    def hangs_on_marked_files(data: bytes, **kwargs) -> torch.Tensor:
        if data.startswith(b"HANG"):
            time.sleep(3600)
        return real(data, **kwargs)

    monkeypatch.setattr(pipelines.data, "decode", hangs_on_marked_files)
    # Generous against a loaded host: a tiny PNG decodes in milliseconds.
    monkeypatch.setattr(local, "HANG_TIMEOUT_S", 20.0)
    good, crashing = crash_folder(tmp_path / "images")
    for path in crashing:
        (tmp_path / "images" / path).unlink()
    (tmp_path / "images" / "train" / "bag" / "hang.png").write_bytes(b"HANG and never return")

    stats = embed_train(encoder, tmp_path / "images", tmp_path / "out")

    assert sorted(store.read_split(tmp_path / "out", "train").paths) == good
    assert store.read_errors(split_folder(tmp_path / "out", "train")) == [
        {"path": "train/bag/hang.png", "label": "bag", "error": "DecodeError: decoder hung (killed after 20 s)"}]
    assert stats.embedded == len(good) and stats.errors == 1


def run_job(root: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipelines.embed", "model=tiny", "device=cpu", f"dataset.root={root}",
               f"output_dir={out}", "progress=false", "batch_size=4", *extra]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, env=env or dict(os.environ),
                          cwd=out.parent)


def check_output(out: Path, made: dict, reasons: dict[str, str]) -> None:
    embedded = [p for split in ("train", "valid") for p in store.read_split(out, split).paths]
    assert sorted(embedded) == made["good"]  # each good image exactly once, nothing else
    errors = {e["path"]: e["error"] for split in ("train", "valid") for e in store.read_errors(split_folder(out, split))}
    assert sorted(errors) == sorted(made["bad"])
    for path, pattern in reasons.items():
        assert re.search(pattern, errors[path]), (path, errors[path])


@pytest.mark.job
@pytest.mark.parametrize("crashing_decoder", [False, True], ids=["pil", "torchvision-segfaults"])
def test_hostile_folder_embeds_to_rc0(tmp_path, crashing_decoder):
    made = hostile_files.build_mixed_folder(tmp_path / "images")
    out = tmp_path / "out"
    env = dict(os.environ)
    reasons = dict(made["bad"])
    crash = next(p for p in made["bad"] if p.endswith("crash.png"))
    if crashing_decoder:
        hostile_files.write_crash_hook(tmp_path / "hook")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "hook"), env.get("PYTHONPATH", "")])
        reasons[crash] = r"^DecodeError: decoder crashed \(signal 11\)$"
    else:
        reasons[crash] = r"^DecodeError: .*truncated"

    done = run_job(tmp_path / "images", out, "num_workers=1", env=env)

    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    check_output(out, made, reasons)
    log = done.stdout + done.stderr
    assert "train/stray.jpg" in log and "valid/empty_class" in log  # reported, not silently ignored
    errors_before = {s: (split_folder(out, s) / store.ERRORS).read_text() for s in ("train",)}

    again = run_job(tmp_path / "images", out, "num_workers=1", env=env)

    assert again.returncode == 0, again.stderr[-3000:]
    check_output(out, made, reasons)
    assert {s: (split_folder(out, s) / store.ERRORS).read_text() for s in ("train",)} == errors_before  # nothing retried
