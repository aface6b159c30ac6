"""pipelines/store.py: schema, atomic parts, footer metadata, errors file, resume state, refusal of mismatches,
the hive layout and the conversion of the layout before 0.2.0."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipelines import store

META = {"model": "m", "revision": None, "embedding_dim": 4, "dtype": "float32", "image_size": [384, 384],
        "preprocess": {"size": {"height": 384, "width": 384}}, "version": "0"}


def rows(n: int, start: int = 0, dim: int = 4):
    rng = np.random.default_rng(start)
    paths = [f"train/c{i % 3}/{i:04d}.jpg" for i in range(start, start + n)]
    return paths, [p.split("/")[1] for p in paths], rng.standard_normal((n, dim)).astype(np.float32)


def test_schema_and_round_trip(tmp_path):
    paths, labels, emb = rows(10)
    folder = store.split_dir(tmp_path, "train")
    part = store.write_part(folder, store.to_table(paths, labels, emb, META), prefix="shard0of1")
    schema = pq.read_schema(part)
    assert schema.field("path").type == pa.string() and schema.field("label").type == pa.string()
    assert schema.field("embedding").type == pa.list_(pa.field("item", pa.float32(), nullable=False), 4)
    assert store.read_metadata(part) == META
    assert [p.name for p in folder.iterdir()] == [part.name]  # no temporary file left
    split = store.read_split(tmp_path, "train")
    assert split.paths == sorted(paths) and split.metadata == META
    order = np.argsort(paths)
    np.testing.assert_array_equal(split.embeddings, emb[order])
    assert split.labels == [labels[i] for i in order]


def test_read_split_over_many_parts_and_sliced_chunks(tmp_path):
    for start in (0, 7, 20):
        paths, labels, emb = rows(7 if start < 20 else 5, start)
        table = store.to_table(paths, labels, emb, META)
        store.write_part(store.split_dir(tmp_path, "train"), table.slice(0, len(paths)), prefix="p")
    split = store.read_split(tmp_path, "train")
    assert len(split.paths) == 19 and split.embeddings.shape == (19, 4)
    column = store.to_table(*rows(6), META).column("embedding").slice(2, 3)
    np.testing.assert_array_equal(store.embedding_matrix(column, 4), rows(6)[2][2:5])


def test_read_split_refuses_parts_of_other_models(tmp_path):
    folder = store.split_dir(tmp_path, "train")
    store.write_part(folder, store.to_table(*rows(3), META), prefix="a")
    store.write_part(folder, store.to_table(*rows(3, 3), {**META, "model": "other"}), prefix="b")
    with pytest.raises(store.StoreMismatchError, match="model: 'm' there, 'other' now"):
        store.read_split(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="valid"):
        store.read_split(tmp_path, "valid")


def test_errors_file_is_deduplicated_and_survives_a_torn_line(tmp_path):
    split_dir = store.split_dir(tmp_path, "train")
    store.append_errors(split_dir, [{"path": "train/a/x.jpg", "label": "a", "error": "empty file"}])
    store.append_errors(split_dir, [{"path": "train/a/x.jpg", "label": "a", "error": "empty file"}])
    with open(split_dir / store.ERRORS, "a") as f:
        f.write('{"path": "train/a/y.j')  # a crash mid-write
    assert store.read_errors(split_dir) == [{"path": "train/a/x.jpg", "label": "a", "error": "empty file"}]
    store.write_part(split_dir, store.to_table(*rows(2), META), prefix="a")
    assert store.done_paths(split_dir) == {"train/a/x.jpg", *rows(2)[0]}


def test_manifest_refuses_other_settings(tmp_path):
    store.prepare_output(tmp_path / "out", META, overwrite=False)
    store.prepare_output(tmp_path / "out", {**META, "version": "1"}, overwrite=False)  # version alone may differ
    with pytest.raises(store.StoreMismatchError, match="dtype: 'float32' there, 'bfloat16' now") as info:
        store.prepare_output(tmp_path / "out", {**META, "dtype": "bfloat16"}, overwrite=False)
    assert "overwrite=true" in str(info.value)
    store.split_dir(tmp_path / "out", "train").mkdir()
    store.prepare_output(tmp_path / "out", {**META, "dtype": "bfloat16"}, overwrite=True)
    assert not store.split_dir(tmp_path / "out", "train").exists()
    assert json.loads((tmp_path / "out" / store.MANIFEST).read_text())["dtype"] == "bfloat16"


def test_stale_temporary_parts_are_removed_per_prefix(tmp_path):
    split_dir = store.split_dir(tmp_path, "train")
    split_dir.mkdir()
    (split_dir / ".part-shard0of2-abc.parquet.tmp").write_bytes(b"partial")
    (split_dir / ".part-shard1of2-def.parquet.tmp").write_bytes(b"partial")
    store.remove_stale_tmp(split_dir, "shard0of2")
    assert [p.name for p in split_dir.iterdir()] == [".part-shard1of2-def.parquet.tmp"]
    assert store.parts(split_dir) == []


def test_split_folders_are_hive_partitions_readers_decode(tmp_path):
    """'%' and '=' in a split name are percent-encoded; pyarrow's hive partitioning gives the name back."""
    names = {"train": 3, "a=b": 2, "50%": 1}
    for start, (name, n) in enumerate(names.items()):
        folder = store.split_dir(tmp_path, name)
        assert folder.parent == tmp_path and folder.name.startswith("split=")
        store.write_part(folder, store.to_table(*rows(n, 10 * start), META), prefix="a")
        store.append_errors(folder, [{"path": f"{name}/c0/bad.jpg", "label": "c0", "error": "empty file"}])
        assert len(store.read_split(tmp_path, name).paths) == n
    store.write_json(tmp_path / store.MANIFEST, META)
    store.write_json(store.summary_path(tmp_path, shard_index=0, shard_count=1), {"images": 6})
    table = ds.dataset(tmp_path, partitioning="hive").to_table()
    assert sorted(table.column("split").to_pylist()) == sorted(n for n, k in names.items() for _ in range(k))
    for bad in ("", ".", "..", "a/b"):
        with pytest.raises(store.UserError, match="expected the name of a folder"):
            store.split_dir(tmp_path, bad)


def test_validation_goes_beside_the_output(tmp_path):
    assert store.validation_dir(tmp_path / "emb") == tmp_path / "emb-validation"
    assert store.validation_dir(f"{tmp_path}/emb/") == tmp_path / "emb-validation"  # a trailing slash
    assert store.validation_dir(tmp_path / "emb" / ".") == tmp_path / "emb-validation"
    with pytest.raises(store.UserError, match="give output_dir="):
        store.validation_dir("/")


def old_layout(out):
    """An output directory as pipelines 0.1 wrote it: two splits (one with an errors file), summaries, a
    validation run, a finished job's lock files."""
    for split, start in (("train", 0), ("valid", 5)):
        folder = out / split
        folder.mkdir(parents=True)
        pq.write_table(store.to_table(*rows(5, start), META), folder / "part-shard0of1-abc.parquet")
    (out / "valid" / "errors.jsonl").write_text('{"path": "valid/c0/x.jpg", "label": "c0", "error": "empty"}\n')
    (out / "embeddings.json").write_text(json.dumps(META))
    (out / "summary.json").write_text("{}")
    (out / "summary-shard0of2.json").write_text("{}")
    (out / "validation").mkdir()
    (out / "validation" / "report.json").write_text("{}")
    (out / ".lock").touch()
    (out / ".lock-shard0of1").write_text("123\n")


def test_the_old_layout_is_refused_with_the_command_that_converts_it(tmp_path):
    out = tmp_path / "emb"
    old_layout(out)
    for attempt in (lambda: store.read_split(out, "valid"), lambda: store.prepare_output(out, META, overwrite=False)):
        with pytest.raises(store.OldLayoutError) as info:
            attempt()
        message = str(info.value)
        assert "\n" not in message and f"python -m pipelines.upgrade {out}" in message
        assert "embeddings.json" in message or "train/" in message
    assert not (out / store.MANIFEST).exists()  # refused before writing anything


def test_upgrade_renames_in_place_and_readers_open_the_result(tmp_path):
    out = tmp_path / "emb"
    old_layout(out)
    before = {p.name: p.stat().st_ino for p in out.rglob("*.parquet")}
    done = store.upgrade_layout(out)
    assert (out / store.MANIFEST).is_file() and not (out / "embeddings.json").exists()
    assert (out / "_summary.json").is_file() and (out / "_summary-shard0of2.json").is_file()
    assert (tmp_path / "emb-validation" / "report.json").is_file() and not (out / "validation").exists()
    assert store.read_errors(store.split_dir(out, "valid"))[0]["path"] == "valid/c0/x.jpg"
    assert {p.name: p.stat().st_ino for p in out.rglob("*.parquet")} == before  # renamed, not rewritten
    assert store.legacy_entries(out) == [] and store.foreign_entries(out) == []
    assert len(store.read_split(out, "train").paths) == 5 and len(store.read_split(out, "valid").paths) == 5
    table = pq.read_table(out)  # pyarrow's own reader of a folder: bookkeeping skipped, split column added
    assert table.num_rows == 10 and sorted(set(table.column("split").to_pylist())) == ["train", "valid"]
    assert len(done) == 7 and store.upgrade_layout(out) == []  # a second run has nothing left to do


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_upgrade_resumes_after_an_interruption(tmp_path):
    """Stopped after any number of its renames, a rerun finishes the conversion: the same tree as one run."""
    reference = tmp_path / "ref"
    old_layout(reference)
    steps = len(store._upgrade_plan(reference))
    store.upgrade_layout(reference)
    for stop in range(1, steps):
        out = tmp_path / f"emb{stop}"
        old_layout(out)
        for src, dst in store._upgrade_plan(out)[:stop]:  # what an interrupted run had done
            os.rename(src, dst)
        with pytest.raises(store.OldLayoutError):
            store.check_layout(out)
        assert len(store.upgrade_layout(out)) == steps - stop
        store.check_layout(out)
        assert tree(out) == tree(reference)
        assert tree(tmp_path / f"emb{stop}-validation") == tree(tmp_path / "ref-validation") == ["report.json"]


def test_upgrade_is_refused_while_a_job_holds_the_lock(tmp_path):
    out = tmp_path / "emb"
    old_layout(out)
    lock = os.open(out / ".lock-shard0of1", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a job of the old version, still running
    try:
        with pytest.raises(store.OutputBusyError, match=r"being written by a job \(pid 123\)"):
            store.upgrade_layout(out)
    finally:
        os.close(lock)
    assert (out / "embeddings.json").exists() and (out / "train").is_dir()  # nothing renamed
    (out / "split=train").mkdir()  # a target in the way: refused before any rename
    with pytest.raises(store.UserError, match="split=train exists already"):
        store.upgrade_layout(out)
    assert (out / "embeddings.json").exists() and (out / "valid" / "errors.jsonl").exists()


def test_upgrade_command(tmp_path):
    out = tmp_path / "emb"
    old_layout(out)
    command = [sys.executable, "-m", "pipelines.upgrade", str(out)]
    first = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"{out}: converted (7 renames, 3 folders); readers now open it whole"
    again = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    missing = subprocess.run([*command[:-1], str(tmp_path / "nope")], check=False, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: {tmp_path / 'nope'}: no such folder"
