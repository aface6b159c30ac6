"""pipelines/bench/search.py: seeded vectors are the same every pass, queries come from their source rows, and on
a small run the figures are computed against exact search (recall 1 where the index scans everything)."""

from __future__ import annotations

import json

import numpy as np

from pipelines.bench import search as bench


def test_vectors_are_unit_seeded_and_regenerated_alike():
    v = bench.Vectors(rows=1000, dim=8, clusters=0, spread=1.0, seed=4, chunk=300)
    chunks = list(v())
    assert [len(c) for c in chunks] == [300, 300, 300, 100]
    assert all(np.allclose(np.linalg.norm(c, axis=1), 1, atol=1e-6) for c in chunks)
    assert all((a == b).all() for a, b in zip(chunks, v(), strict=True))
    ids = np.array([0, 299, 300, 999])
    assert (v.take(ids) == np.concatenate(chunks)[ids]).all()
    queries, sources = bench.make_queries(v, n=50, noise=0.5, seed=4)
    cos = np.sum(queries * np.concatenate(chunks)[sources], axis=1)
    assert 0.8 < cos.mean() < 0.95 and len(np.unique(sources)) == 50


def test_recall_counts_the_shared_share():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert bench.recall(truth, truth) == 1.0
    assert bench.recall(np.array([[4, 3, 9, 9], [0, 0, 0, 0]]), truth) == 0.25
    assert bench.source_found(np.array([[1, 2], [3, 4]]), np.array([2, 5])) == 0.5


def test_small_run_side_by_side(tmp_path, capsys):
    report = bench.main(["--rows", "3000", "--dim", "32", "--queries", "100", "--kinds", "ivf", "hnsw",
                         "--nlist", "16", "--nprobe", "16", "--ef-search", "400", "--clusters", "20",
                         "--repeat", "1", "--device", "cpu", "--json", str(tmp_path / "r.json")])
    results = {(r["kind"], r["setting"]): r for r in report["results"]}
    assert results[("exact", "flat")]["recall"] == 1.0 and results[("exact", "flat")]["source_found"] == 1.0
    assert results[("ivf", "nlist 16, nprobe 16")]["recall"] == 1.0  # every cell visited: exact
    assert results[("hnsw", "M 32, efSearch 400")]["recall"] >= 0.95
    assert all(r["qps"] > 0 for r in report["results"])
    assert json.loads((tmp_path / "r.json").read_text())["results"] == report["results"]
    assert "recall@10" in capsys.readouterr().out
