"""pipelines/index.py: exact search equals brute force; approximate indexes are saved beside the embeddings,
reused, refused when the embeddings change and rebuilt on request; the auto rule by size."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import index as ann
from pipelines import store
from pipelines.errors import UserError

DIM = 16
META = {"model": "tiny", "revision": None, "embedding_dim": DIM, "dtype": "float32", "image_size": [384, 384],
        "preprocess": {}, "version": "test"}
OPTIONS = {"exact_below": 50, "hnsw_below": 500, "ivf_nlist": 8, "ivf_nprobe": 8, "ivf_train_rows": "auto",
           "ivf_train_iters": 10, "hnsw_m": 16, "hnsw_ef_construction": 80, "hnsw_ef_search": 200, "seed": 0}


def write_split(out, split, vectors, *, start=0, meta=META, prefix="shard0of1"):
    paths = [f"{split}/c{i % 3}/img{i:05d}.png" for i in range(start, start + len(vectors))]
    labels = [f"c{i % 3}" for i in range(start, start + len(vectors))]
    store.write_part(store.split_dir(out, split), store.to_table(paths, labels, vectors, meta), prefix=prefix)
    return paths


@pytest.fixture()
def embedded(tmp_path):
    rng = np.random.default_rng(0)
    out = tmp_path / "emb"
    train = rng.normal(size=(120, DIM)).astype(np.float32) * 3  # not unit: the index normalises
    valid = rng.normal(size=(40, DIM)).astype(np.float32)
    write_split(out, "train", train[:70])
    write_split(out, "train", train[70:], start=70)
    write_split(out, "valid", valid)
    return out, train, valid


def brute_force(rows, queries, k):
    x = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ x.T.astype(np.float64)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k], np.sort(sims, axis=1)[:, ::-1][:, :k]


def test_exact_search_equals_brute_force_over_parts_and_splits(embedded):
    out, train, valid = embedded
    source = ann.open_source(out, None)
    assert source.splits == ["train", "valid"] and source.rows == 160 and len(source.parts) == 3
    searcher = ann.open_index(source, kind="exact", rebuild=False, folder=None, device="cpu", options=OPTIONS)
    queries = np.random.default_rng(1).normal(size=(20, DIM)).astype(np.float32)
    scores, ids = searcher.search(queries, k=5)
    # parts in name order: the row order of each split depends on the part names
    rows = ann.read_rows(source)
    order = {p: i for i, p in enumerate(rows.paths.to_pylist())}
    written = [f"train/c{i % 3}/img{i:05d}.png" for i in range(120)] + [f"valid/c{i % 3}/img{i:05d}.png"
                                                                           for i in range(40)]
    matrix = np.concatenate([train, valid])[[written.index(p) for p in rows.paths.to_pylist()]]
    want_ids, want_scores = brute_force(matrix, queries, 5)
    assert (ids == want_ids).all()
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    hit = rows.take(ids[0, :1])[0]
    assert order[hit["path"]] == ids[0, 0] and hit["split"] == hit["path"].split("/")[0]
    assert not (out.parent / "emb-index").exists()  # exact: nothing saved


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_saved_beside_reused_and_refused_when_embeddings_change(embedded, kind):
    out, _, valid = embedded
    source = ann.open_source(out, ["train"])
    built = ann.open_index(source, kind=kind, rebuild=False, folder=None, device="cpu", options=OPTIONS)
    folder = out.parent / "emb-index"
    assert not built.loaded and (folder / f"train-{kind}.faiss").is_file()
    info = json.loads((folder / f"train-{kind}.json").read_text())
    assert info["rows"] == 120 and info["model"] == META and info["fingerprint"]["parts"] == 2
    assert store.foreign_entries(out) == []  # nothing of ours inside the embeddings folder
    exact = ann.open_index(source, kind="exact", rebuild=False, folder=None, device="cpu", options=OPTIONS)
    _, want = exact.search(valid, k=5)
    _, got = built.search(valid, k=5)
    assert (got == want).mean() >= 0.95  # nprobe = nlist: IVF scans every cell; HNSW with a wide beam

    again = ann.open_index(ann.open_source(out, ["train"]), kind=kind, rebuild=False, folder=None, device="cpu",
                           options=OPTIONS)
    assert again.loaded and (again.search(valid, k=5)[1] == got).all()

    write_split(out, "train", np.ones((3, DIM), np.float32), start=500, prefix="shard0of1b")
    changed = ann.open_source(out, ["train"])
    with pytest.raises(ann.StaleIndexError, match=r"120 rows then, 123 now.*rebuild=true"):
        ann.open_index(changed, kind=kind, rebuild=False, folder=None, device="cpu", options=OPTIONS)
    rebuilt = ann.open_index(changed, kind=kind, rebuild=True, folder=None, device="cpu", options=OPTIONS)
    assert not rebuilt.loaded and rebuilt.index.ntotal == 123
    assert ann.open_index(changed, kind=kind, rebuild=False, folder=None, device="cpu", options=OPTIONS).loaded


def test_touched_part_makes_the_index_stale(embedded):
    out, _, _ = embedded
    source = ann.open_source(out, ["valid"])
    ann.open_index(source, kind="hnsw", rebuild=False, folder=None, device="cpu", options=OPTIONS)
    part = source.parts[0][1]
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))
    with pytest.raises(ann.StaleIndexError, match="parts changed"):
        ann.open_index(ann.open_source(out, ["valid"]), kind="hnsw", rebuild=False, folder=None, device="cpu",
                       options=OPTIONS)


def test_part_rewritten_at_the_same_size_and_mtime_makes_the_index_stale(tmp_path):
    """An adversary's rewrite: other embeddings, the same byte count, the old mtime put back; the footer shows it."""
    out = tmp_path / "emb"
    vectors = np.random.default_rng(2).normal(size=(50, DIM)).astype(np.float32)
    paths = [f"valid/c{i % 3}/img{i:05d}.png" for i in range(50)]
    labels = [f"c{i % 3}" for i in range(50)]
    part = store.split_dir(out, "valid") / "part-shard0of1-x.parquet"
    part.parent.mkdir(parents=True)

    def write(emb):  # uncompressed, plain: the size depends on the row count alone
        pq.write_table(store.to_table(paths, labels, emb, META), part, compression="none", use_dictionary=False)

    write(vectors)
    source = ann.open_source(out, ["valid"])
    ann.open_index(source, kind="hnsw", rebuild=False, folder=None, device="cpu", options=OPTIONS)
    before = part.stat()
    write(-vectors)  # every search answer changes
    os.utime(part, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert part.stat().st_size == before.st_size and part.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(ann.StaleIndexError, match="parts changed"):
        ann.open_index(ann.open_source(out, ["valid"]), kind="hnsw", rebuild=False, folder=None, device="cpu",
                       options=OPTIONS)
    part.write_bytes(part.read_bytes()[:-8] + b"\xff\xff\xff\x7fPAR1")  # a footer length that runs off the file
    with pytest.raises(store.CorruptPartError, match="not a readable part"):
        ann.footer_digest(part)


def test_ivf_with_more_cells_than_the_rows_allow_uses_fewer_and_says_so(tmp_path, caplog):
    out = tmp_path / "emb"
    write_split(out, "train", np.random.default_rng(3).normal(size=(300, DIM)).astype(np.float32))
    source = ann.open_source(out, ["train"])
    with caplog.at_level("WARNING", logger="pipelines.index"):
        built = ann.open_index(source, kind="ivf", rebuild=False, folder=None, device="cpu",
                               options={**OPTIONS, "ivf_nlist": 1024, "ivf_nprobe": 32})
    assert "ann.ivf_nlist=1024 is too many cells for 300 rows" in caplog.text and "using 7" in caplog.text
    assert built.info["settings"] == {"nlist": 7, "nprobe": 7} and built.index.ntotal == 300
    _, ids = built.search(np.ones((1, DIM), np.float32), k=5)
    assert (ids >= 0).all()


def test_index_folder_inside_the_embeddings_is_refused(embedded):
    out, _, _ = embedded
    with pytest.raises(UserError, match="inside embeddings_dir"):
        ann.open_index(ann.open_source(out, ["valid"]), kind="hnsw", rebuild=False, folder=out / "idx",
                       device="cpu", options=OPTIONS)


def test_auto_rule_and_ivf_cells():
    rule = {"exact_below": 50_000, "hnsw_below": 1_000_000}
    assert [ann.choose_kind("auto", n, **rule) for n in (10, 49_999, 50_000, 999_999, 1_000_000)] == [
        "exact", "exact", "hnsw", "hnsw", "ivf"]
    assert ann.choose_kind("ivf", 10, **rule) == "ivf"
    with pytest.raises(UserError, match="index='flat'"):
        ann.choose_kind("flat", 10, **rule)
    assert ann.ivf_nlist(1_000_000, "auto") == 1024 and ann.ivf_nlist(100, "auto") == 2
    assert ann.ivf_nlist(10, "auto") == 1 and ann.ivf_nlist(5000, 7) == 7
    assert ann.ivf_nlist(300, 1024) == 7 and ann.ivf_nlist(10, 4) == 1


def test_training_sample_is_seeded_and_drawn_across_chunks():
    chunks = [np.arange(i, i + 10, dtype=np.float32)[:, None] for i in range(0, 100, 10)]
    a = ann.training_sample(iter(chunks), rows=100, size=30, seed=3)
    b = ann.training_sample(iter(chunks), rows=100, size=30, seed=3)
    assert a.shape == (30, 1) and (a == b).all() and len(np.unique(a)) == 30 and a.max() >= 50


def test_mixed_settings_duplicates_and_missing_split_are_refused(tmp_path):
    out = tmp_path / "emb"
    vec = np.eye(DIM, dtype=np.float32)[:4]
    write_split(out, "valid", vec)
    with pytest.raises(UserError, match="split 'test': no parts.*embedded splits: valid"):
        ann.open_source(out, ["test"])
    write_split(out, "valid", vec, prefix="shard0of1x")  # the same paths again
    with pytest.raises(store.CorruptPartError, match="more than once"):
        ann.read_rows(ann.open_source(out, ["valid"]))
    write_split(out, "train", vec, meta={**META, "model": "other"})
    with pytest.raises(store.StoreMismatchError, match="model"):
        ann.open_source(out, None)
    with pytest.raises(UserError, match="no such folder"):
        ann.open_source(tmp_path / "nothing", None)
