"""pipelines/store.py: schema, atomic parts, footer metadata, errors file, resume state, refusal of mismatches."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
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
    part = store.write_part(tmp_path / "train", store.to_table(paths, labels, emb, META), prefix="shard0of1")
    schema = pq.read_schema(part)
    assert schema.field("path").type == pa.string() and schema.field("label").type == pa.string()
    assert schema.field("embedding").type == pa.list_(pa.field("item", pa.float32(), nullable=False), 4)
    assert store.read_metadata(part) == META
    assert [p.name for p in (tmp_path / "train").iterdir()] == [part.name]  # no temporary file left
    split = store.read_split(tmp_path, "train")
    assert split.paths == sorted(paths) and split.metadata == META
    order = np.argsort(paths)
    np.testing.assert_array_equal(split.embeddings, emb[order])
    assert split.labels == [labels[i] for i in order]


def test_read_split_over_many_parts_and_sliced_chunks(tmp_path):
    for start in (0, 7, 20):
        paths, labels, emb = rows(7 if start < 20 else 5, start)
        table = store.to_table(paths, labels, emb, META)
        store.write_part(tmp_path / "train", table.slice(0, len(paths)), prefix="p")
    split = store.read_split(tmp_path, "train")
    assert len(split.paths) == 19 and split.embeddings.shape == (19, 4)
    column = store.to_table(*rows(6), META).column("embedding").slice(2, 3)
    np.testing.assert_array_equal(store.embedding_matrix(column, 4), rows(6)[2][2:5])


def test_read_split_refuses_parts_of_other_models(tmp_path):
    store.write_part(tmp_path / "train", store.to_table(*rows(3), META), prefix="a")
    store.write_part(tmp_path / "train", store.to_table(*rows(3, 3), {**META, "model": "other"}), prefix="b")
    with pytest.raises(store.StoreMismatchError, match="model: 'm' there, 'other' now"):
        store.read_split(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="valid"):
        store.read_split(tmp_path, "valid")


def test_errors_file_is_deduplicated_and_survives_a_torn_line(tmp_path):
    split_dir = tmp_path / "train"
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
    (tmp_path / "out" / "train").mkdir()
    store.prepare_output(tmp_path / "out", {**META, "dtype": "bfloat16"}, overwrite=True)
    assert not (tmp_path / "out" / "train").exists()
    assert json.loads((tmp_path / "out" / store.MANIFEST).read_text())["dtype"] == "bfloat16"


def test_stale_temporary_parts_are_removed_per_prefix(tmp_path):
    split_dir = tmp_path / "train"
    split_dir.mkdir()
    (split_dir / ".part-shard0of2-abc.parquet.tmp").write_bytes(b"partial")
    (split_dir / ".part-shard1of2-def.parquet.tmp").write_bytes(b"partial")
    store.remove_stale_tmp(split_dir, "shard0of2")
    assert [p.name for p in split_dir.iterdir()] == [".part-shard1of2-def.parquet.tmp"]
    assert store.parts(split_dir) == []
