"""The embed job's safety: overwrite deletes only what it wrote, one writer per output and shard (real racing
processes), settings checked before loading, one-line errors (ENOSPC, corrupt parts, duplicates), Ctrl-C and
SIGTERM save and exit 130 / 143, no-op resumes keep the summary, multirun output, entry points import fast."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.jobs import (
    embed_args,
    embed_cli,
    is_locked,
    one_line_error,
    open_fds,
    start_job,
    start_job_writing,
    stopped,
    stopped_with_workers,
    wait_for,
)

from pipelines import store
from pipelines.config import REPO_ROOT, UserError, clean_errors
from pipelines.data import list_split
from pipelines.embed import run_embed
from pipelines.validate import run_validate

SAMPLE = REPO_ROOT / "data" / "sample"
N_SAMPLE = 300  # data/sample: 100 train + 200 valid


def run(root: Path, out: Path, **kwargs) -> dict:
    settings = {"splits": ["train", "valid"], "num_workers": 0, "batch_size": 8, "progress": False, "model": "tiny",
                "device": "cpu"}
    return run_embed(root=root, output_dir=out, **{**settings, **kwargs})


def all_paths(out: Path, splits=("train", "valid")) -> list[str]:
    return [p for split in splits for part in store.parts(store.split_dir(out, split))
            for p in pq.read_table(part, columns=["path"])["path"].to_pylist()]


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def mount_tmpfs(folder: Path, options: str) -> bool:
    """Mount a small tmpfs on `folder` (root only); False where this machine does not allow it."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=False,
                          capture_output=True, timeout=30).returncode == 0


def unmount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], capture_output=True, timeout=30, check=True)


@pytest.fixture()
def dataset(tmp_path) -> Path:
    """A copy of data/sample (train/valid x 10 classes) that the tests may plant files in."""
    root = tmp_path / "dataset"
    shutil.copytree(SAMPLE, root)
    return root


# --- 1. nothing is deleted that we did not write ------------------------------------------------------------------

def test_overwrite_refuses_the_dataset_root_and_its_split_folders(tmp_path, dataset):
    (dataset / "notes.txt").write_text("keep me")
    before = tree(dataset)
    for overwrite in (True, False):
        with pytest.raises(store.UnsafeOutputError, match=f"output_dir={dataset} is the dataset root"):
            run(dataset, dataset, overwrite=overwrite)
    with pytest.raises(store.UnsafeOutputError, match="its split=train/ folder and the dataset's .* overlap"):
        run(dataset, dataset / "train" / "embeddings")
    # A folder holding the dataset, even one that looks like our output.
    store.write_json(tmp_path / store.MANIFEST, {})
    with pytest.raises(store.UnsafeOutputError, match=r"refuses to delete .* it holds the dataset"):
        run(dataset, tmp_path, overwrite=True)
    assert tree(dataset) == before
    assert not list(dataset.glob(".lock*")) and not (dataset / store.MANIFEST).exists()


@pytest.mark.job
def test_overwrite_refuses_a_folder_we_did_not_make(tmp_path, dataset):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    with pytest.raises(store.UnsafeOutputError, match=f"output_dir={notes}: it has no _embeddings.json"):
        run(dataset, notes, overwrite=True)
    assert tree(notes) == {"notes.txt": b"keep me"} and sorted(p.name for p in notes.iterdir()) == ["notes.txt"]

    out = tmp_path / "out"
    run(dataset, out, splits=["valid"])
    (out / "notes.txt").write_text("mine")
    (store.split_dir(out, "valid") / "by-hand").mkdir()
    with pytest.raises(store.UnsafeOutputError,
                       match=r"files this project did not write \(notes.txt, split=valid/by-hand\)"):
        run(dataset, out, splits=["valid"], overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and len(all_paths(out, ["valid"])) == 200

    (out / "notes.txt").unlink()
    (store.split_dir(out, "valid") / "by-hand").rmdir()
    (out / "split=old").mkdir()  # a folder of ours with nothing in it (a split all of whose files failed)
    report = run_validate(embeddings_dir=out, train_split="valid", query_split="valid")  # beside out, not in it
    summary = run(dataset, out, splits=["valid"], overwrite=True)
    assert summary["images"] == 200 and sorted(all_paths(out, ["valid"])) == [r.path for r in
                                                                            list_split(dataset, "valid")]
    assert not (out / "split=old").exists()
    assert Path(report["files"]["report"]).parent == store.validation_dir(out)  # outside: overwrite leaves it
    assert Path(report["files"]["report"]).is_file()


def test_overwrite_never_deletes_home_or_root(tmp_path, dataset, monkeypatch):
    home = tmp_path / "home"
    (home / "documents").mkdir(parents=True)
    (home / "documents" / "letter.txt").write_text("keep me")
    store.write_json(home / store.MANIFEST, {})  # even with our manifest in it
    monkeypatch.setenv("HOME", str(home))
    for target, what in ((home, "your home directory"), (tmp_path, "a folder holding your home directory")):
        with pytest.raises(store.UnsafeOutputError, match=f"refuses to delete output_dir={target}: it is {what}"):
            run(dataset, target, overwrite=True)
    assert (home / "documents" / "letter.txt").read_text() == "keep me"
    # The check alone (it deletes nothing): the filesystem root.
    with pytest.raises(store.UnsafeOutputError, match="it is the filesystem root"):
        store.check_overwrite(Path("/"))


def test_cli_overwrite_refusal_is_one_line(tmp_path, dataset):
    result = embed_cli(dataset, "dataset=imagenet", f"dataset.root={dataset}", "overwrite=true")
    assert one_line_error(result) == (f"error: output_dir={dataset} is the dataset root (dataset.root={dataset}): "
                                      "the parts would be written among the images; choose another output_dir")
    assert sorted(p.name for p in dataset.iterdir()) == sorted(p.name for p in SAMPLE.iterdir())


# --- 2. one writer per output and shard ---------------------------------------------------------------------------

def test_lock_refuses_a_second_writer_in_process(tmp_path):
    out = tmp_path / "out"
    held = store.lock_output(out, shard_index=0, shard_count=2)
    with pytest.raises(store.OutputBusyError, match=f"shard 0 of 2 is being written .*pid {os.getpid()}"):
        store.lock_output(out, shard_index=0, shard_count=2)
    with pytest.raises(store.OutputBusyError, match=f"job with shard.count=2 \\(pid {os.getpid()}\\)"):
        store.lock_output(out, shard_index=0, shard_count=3)
    store.lock_output(out, shard_index=1, shard_count=2).release()  # another shard: side by side
    held.release()
    store.lock_output(out, shard_index=0, shard_count=3).release()  # released: free again
    assert all(p.name.startswith(".") for p in out.iterdir())  # hidden: Parquet readers skip them


@pytest.mark.job
def test_two_racing_jobs_one_is_refused_and_nothing_is_duplicated(tmp_path):
    out = tmp_path / "out"
    first = start_job(out, "batch_size=4", "num_workers=0")
    lock = out / ".lock-shard0of1"
    wait_for(lambda: is_locked(lock), first, "the first job holds its lock")
    with stopped(first):
        second = embed_cli(out)
        assert one_line_error(second) == (f"error: output_dir={out} shard 0 of 1 is being written by another job "
                                          f"(pid {first.pid}); wait for it to finish, or stop it")
        other_count = embed_cli(out, "shard.count=2", "shard.index=1")
        assert one_line_error(other_count).startswith(
            f"error: output_dir={out} is being written by a job with shard.count=1 (pid {first.pid})")
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    paths = all_paths(out)
    assert len(paths) == len(set(paths)) == N_SAMPLE
    assert len(store.read_split(out, "valid").paths) == 200


@pytest.mark.job
def test_other_shards_run_side_by_side_and_kill_9_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out"
    first = start_job_writing(out, "shard.count=2", "shard.index=0", "batch_size=4", "num_workers=1",
                              "rows_per_part=8")
    with stopped_with_workers(first) as children:
        for child in children:  # a forked worker must not keep the lock alive after the job dies
            assert not [f for f in open_fds(child.pid) if Path(f).name.startswith(".lock")], child
        other = embed_cli(out, "shard.count=2", "shard.index=1")  # runs while shard 0 is held
        assert other.returncode == 0, other.stderr[-3000:]
    first.kill()  # kill -9 of the job alone: its decode worker, forked with the lock open, may outlive it a while
    first.communicate(timeout=60)
    assert not is_locked(out / ".lock-shard0of2")
    again = embed_cli(out, "shard.count=2", "shard.index=0")
    assert again.returncode == 0, again.stderr[-3000:]
    paths = all_paths(out)
    assert len(paths) == len(set(paths)) == N_SAMPLE


@pytest.mark.job
def test_validate_refuses_a_split_holding_a_path_twice(tmp_path, dataset):
    out = tmp_path / "out"
    run(dataset, out, splits=["valid"])
    part = store.parts(store.split_dir(out, "valid"))[0]
    # as a second writer would
    store.write_part(store.split_dir(out, "valid"), pq.read_table(part).slice(0, 7), prefix="shard0of1")
    message = "holds 7 path(s) more than once (7 duplicate rows, e.g. valid/"
    with pytest.raises(store.CorruptPartError, match=re.escape(message)):
        run_validate(embeddings_dir=out, train_split="valid", query_split="valid")
    result = subprocess.run([sys.executable, "-m", "pipelines.validate", f"embeddings_dir={out}", "train_split=valid"], check=False,
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert one_line_error(result).startswith(f"error: {store.split_dir(out, 'valid')} {message}")


# --- 3. settings checked before the model loads -------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "message"), [
    ({"batch_size": 0}, "batch_size=0: expected a whole number of at least 1"),
    ({"batch_size": "64"}, "batch_size='64': expected a whole number of at least 1"),
    ({"rows_per_part": 0}, "rows_per_part=0: expected a whole number of at least 1"),
    ({"rows_per_part": True}, "rows_per_part=true: expected a whole number of at least 1"),
    ({"num_workers": -1}, "num_workers=-1: expected auto or a whole number of at least 0"),
    ({"num_workers": "many"}, "num_workers='many': expected auto or a whole number of at least 0"),
    ({"compile": "banana"}, "compile='banana': expected true or false"),
    ({"overwrite": "yes"}, "overwrite='yes': expected true or false"),
    ({"progress": 1}, "progress=1: expected true or false"),
    ({"dtype": "float8"}, "dtype='float8': expected one of auto, float32, bfloat16, float16"),
    ({"device": "gpu"}, r"device='gpu': expected auto, cpu, cuda, cuda:N or mps, or a list of them "
                        r"\(\[cuda:0,cuda:2\]: one encoder process each\)"),
    ({"shard_index": 2, "shard_count": 2}, r"shard.index=2: expected 0 to 1 \(shard.count=2\)"),
    ({"shard_count": 0}, "shard.count=0: expected a whole number of at least 1"),
    ({"max_image_pixels": 0}, "max_image_pixels=0: expected a whole number of at least 1, or null for no limit"),
])
def test_bad_settings_are_refused_before_anything_is_loaded(tmp_path, setting, message):
    missing = tmp_path / "no-dataset"  # listing it would fail: the settings are checked first
    with pytest.raises(UserError, match=f"^{message}$"):
        run(missing, tmp_path / "out", model="/no/such/model", **setting)
    assert not (tmp_path / "out").exists()


def test_a_device_this_host_lacks_is_refused(tmp_path):
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device in ("cuda", "cuda:3"):
        if count == 0:
            expected = f"device={device}: this host has no CUDA device"
        elif device == "cuda:3" and count <= 3:
            expected = f"device=cuda:3: this host has {count} CUDA device"
        else:
            continue
        with pytest.raises(UserError, match=f"^{expected}"):
            run(tmp_path / "no-dataset", tmp_path / "out", model="/no/such/model", device=device)


def test_an_output_dir_that_cannot_be_written_is_refused(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match=f"^output_dir={afile}: is a file, not a folder"):
        run(SAMPLE, afile)
    with pytest.raises(UserError, match=f"^output_dir={afile / 'sub'}: cannot write there: Not a directory"):
        run(SAMPLE, afile / "sub")
    readonly = tmp_path / "readonly"
    if mount_tmpfs(readonly, "ro,size=64k"):
        try:
            with pytest.raises(UserError, match=f"^output_dir={readonly}: cannot write there: Read-only file system$"):
                run(SAMPLE, readonly, model="/no/such/model")
            deeper = readonly / "a" / "b"
            with pytest.raises(UserError, match=f"^output_dir={deeper}: cannot write there: Read-only file system "
                                                f"\\({readonly / 'a'}\\)$"):
                run(SAMPLE, deeper, model="/no/such/model")
        finally:
            unmount(readonly)
    elif os.geteuid() != 0:
        readonly.mkdir()
        readonly.chmod(0o555)
        with pytest.raises(UserError, match=f"^output_dir={readonly}: cannot write there: Permission denied$"):
            run(SAMPLE, readonly, model="/no/such/model")


@pytest.mark.job
def test_cli_setting_errors_are_one_line(tmp_path):
    assert one_line_error(embed_cli(tmp_path / "o", "compile=banana")) == \
        "error: compile='banana': expected true or false"
    assert one_line_error(embed_cli(tmp_path / "o", "rows_per_part=0", "overwrite=yes")) == \
        "error: rows_per_part=0: expected a whole number of at least 1"
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert one_line_error(embed_cli(afile)) == \
        f"error: output_dir={afile}: is a file, not a folder; choose another output_dir"


# --- 4. one line for every failure a user can cause ---------------------------------------------------------------

def test_disk_full_while_writing_a_part_names_enospc_and_the_folder(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a part")
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    table = store.to_table(["train/a/x.png"], ["a"], np.zeros((1, 4), np.float32), {"model": "m"})
    with pytest.raises(store.StoreWriteError, match=f"^no space left on device \\(ENOSPC\\) writing to "
                                                    f"{tmp_path / 'train'}: make room"):
        store.write_part(tmp_path / "train", table, prefix="shard0of1")
    assert list((tmp_path / "train").iterdir()) == []  # the temporary file is gone


def test_entry_points_turn_a_wrapped_user_error_into_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    @clean_errors()
    def job():
        try:
            with store.writing(tmp_path):
                raise OSError(errno.ENOSPC, "No space left on device")
        except store.StoreWriteError as exc:
            raise RuntimeError("Parquet writer failed") from exc  # as the runner's writer thread reports it

    with pytest.raises(SystemExit) as info:
        job()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: no space left on device (ENOSPC) writing to {tmp_path}: make room or fix it (or " \
                  "choose another output_dir), then rerun: the parts already written are kept and the job resumes\n"

    @clean_errors()
    def bug():
        raise ValueError("a bug keeps its traceback")

    with pytest.raises(ValueError, match="a bug"):
        bug()
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(SystemExit):
        job()
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.job
def test_a_real_full_disk_is_one_line_and_the_rerun_resumes(tmp_path):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "size=48k"):
        pytest.skip("mounting a small tmpfs needs root (the message path is tested above)")
    try:
        out = disk / "out"
        result = embed_cli(out, "rows_per_part=8", "batch_size=8", "num_workers=0")
        line = one_line_error(result)
        assert line.startswith("error: no space left on device (ENOSPC) writing to ") and str(out) in line
        assert not list(out.rglob(".part-*.tmp"))
        saved = all_paths(out)
        assert 0 < len(saved) < N_SAMPLE and len(saved) == len(set(saved))
        moved = tmp_path / "moved"
        shutil.copytree(out, moved, ignore=shutil.ignore_patterns(".lock*"))
    finally:
        unmount(disk)
    again = embed_cli(moved)  # room again: the rerun resumes
    assert again.returncode == 0, again.stderr[-3000:]
    paths = all_paths(moved)
    assert len(paths) == len(set(paths)) == N_SAMPLE


@pytest.mark.job
def test_a_corrupt_part_on_resume_is_named_with_what_to_do(tmp_path, dataset):
    out = tmp_path / "out"
    run(dataset, out, splits=["valid"], rows_per_part=50, batch_size=10)
    broken = store.parts(store.split_dir(out, "valid"))[1]
    broken.write_bytes(broken.read_bytes()[:300])  # truncated
    expected = f"^{broken} is not a readable part \\(.*\\); delete it and rerun the embed job: its rows are embedded"
    with pytest.raises(store.CorruptPartError, match=expected):
        run(dataset, out, splits=["valid"])
    with pytest.raises(store.CorruptPartError, match=expected):
        run_validate(embeddings_dir=out, train_split="valid", query_split="valid")
    line = one_line_error(embed_cli(out, "splits=[valid]", "dataset=imagenet", f"dataset.root={dataset}"))
    assert line.startswith(f"error: {broken} is not a readable part (Parquet magic bytes not found")
    broken.unlink()
    summary = run(dataset, out, splits=["valid"])
    assert summary["images"] == 50 and summary["already_done"] == 150
    assert sorted(all_paths(out, ["valid"])) == [r.path for r in list_split(dataset, "valid")]


# --- 5. Ctrl-C and SIGTERM ----------------------------------------------------------------------------------------

@pytest.mark.job
@pytest.mark.parametrize(("sig", "to_group", "rc"), [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)])
def test_interrupt_saves_rows_and_the_rerun_resumes(tmp_path, sig, to_group, rc):
    out = tmp_path / "out"
    args = ("splits=[train]", "batch_size=4", "rows_per_part=8", "num_workers=1")  # 100 images
    job = start_job_writing(out, *args)
    with stopped(job):  # the signal is delivered when it resumes, mid-job
        assert job.poll() is None
        if to_group:
            os.killpg(job.pid, sig)  # Ctrl-C in a terminal: the whole foreground group, workers included
        else:
            job.send_signal(sig)  # kill PID
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == rc, stderr[-3000:]
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 3, stderr[-3000:]
    saved = all_paths(out, ["train"])
    line = stderr.strip().splitlines()[-1]
    assert line == (f"interrupted ({signal.Signals(sig).name}): {len(saved)} newly embedded rows saved in {out}; "
                    "rerun the same command to resume (nothing is embedded twice)")
    assert 0 < len(saved) < 100 and len(saved) == len(set(saved))
    again = subprocess.run(embed_args(out, *args), check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    paths = all_paths(out, ["train"])
    assert sorted(paths) == [r.path for r in list_split(SAMPLE, "train")]
    assert json.loads((out / store.SUMMARY).read_text())["already_done"] == len(saved)


# --- 6. small items: no-op resume summary, multirun, fast entry points --------------------------------------------

@pytest.mark.job
def test_a_resume_with_nothing_to_do_keeps_the_last_summary(tmp_path, dataset):
    out = tmp_path / "out"
    first = run(dataset, out, splits=["valid"])
    again = run(dataset, out, splits=["valid"])
    assert again["images"] == 0 and again["already_done"] == 200
    kept = json.loads((out / store.SUMMARY).read_text())
    assert kept["images"] == first["images"] == 200 and kept["wall_s"] == first["wall_s"]


@pytest.mark.job
def test_listing_notes_reach_the_summary(tmp_path, dataset):
    shutil.copy(next((dataset / "valid" / "bag").iterdir()), dataset / "valid" / "stray.png")
    (dataset / "valid" / "empty_class").mkdir()
    summary = run(dataset, tmp_path / "out", splits=["valid"])
    from pipelines import data

    if not hasattr(data, "scan_split"):
        pytest.skip("the listing does not report stray files yet")
    notes = summary["listing"]["valid"]
    assert notes["stray_files"] == ["valid/stray.png"] or notes["stray_files"] == ["stray.png"]
    assert any("empty_class" in name for name in notes["empty_classes"])
    saved = json.loads((tmp_path / "out" / store.SUMMARY).read_text())
    assert saved["listing"] == summary["listing"]


@pytest.mark.job
def test_multirun_writes_under_outputs_not_the_working_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.embed", "-m", "model=tiny", "progress=false", "splits=[valid]",
         "output_dir=emb", "shard.count=2", "shard.index=0,1", "num_workers=0"],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "multirun.yaml").exists() and not (tmp_path / "multirun").exists()
    assert len(list((tmp_path / "outputs" / "multirun").glob("*/multirun.yaml"))) == 1
    assert sorted(all_paths(tmp_path / "emb", ["valid"])) == [r.path for r in list_split(SAMPLE, "valid")]


def test_entry_points_import_no_heavy_library_and_print_their_config():
    heavy = ("torch", "transformers", "sklearn", "matplotlib", "pandas", "torchvision")
    code = f"import sys, pipelines.embed, pipelines.validate; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
    for entry, key in (("embed", "rows_per_part"), ("validate", "embeddings_dir")):
        shown = subprocess.run([sys.executable, "-m", f"pipelines.{entry}", "--cfg", "job"], check=False, cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0 and f"{key}:" in shown.stdout, shown.stderr


def test_validate_names_an_output_folder_it_cannot_write(tmp_path):
    meta = {"model": "m", "revision": None, "embedding_dim": 4, "dtype": "float32", "image_size": [384, 384],
            "preprocess": {}, "version": "0"}
    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        paths = [f"{split}/{c}/{i}.png" for c in ("a", "b") for i in range(3)]
        store.write_part(store.split_dir(tmp_path / "emb", split), store.to_table(
            paths, [p.split("/")[1] for p in paths], rng.standard_normal((6, 4)).astype(np.float32), meta), prefix="t")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(store.StoreWriteError, match=f"^a file stands where a folder is needed \\(ENOTDIR\\) "
                                                    f"writing to {afile / 'v'}: .*then rerun$"):
        run_validate(embeddings_dir=tmp_path / "emb", output_dir=afile / "v", k=2)
    assert afile.read_text() == "x"


def test_an_os_error_names_its_file():
    from pipelines.config import describe

    assert describe(PermissionError(errno.EACCES, "Permission denied", "/data/out/valid/part-1.parquet")) == \
        "Permission denied: /data/out/valid/part-1.parquet"
