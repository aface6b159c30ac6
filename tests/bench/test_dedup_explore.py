"""pipelines/bench/dedup.py, explore.py, synthetic.py: the generated output holds its planted near-copies and is
reused; the study's recall/precision count planted and false pairs as defined; small runs of both benchmarks
report what dedup found and the API's latencies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines import store
from pipelines.bench import dedup as dedup_bench
from pipelines.bench import explore as explore_bench
from pipelines.bench.synthetic import planted, write_store


def test_generated_output_holds_the_planted_copies_and_is_reused(tmp_path):
    out = tmp_path / "syn"
    first = write_store(out, rows=3000, dim=16, clusters=10, copies=0.02, chunk=1000)
    assert first["planted_pairs"] > 40
    train, valid = store.read_split(out, "train"), store.read_split(out, "valid")
    assert len(train.paths) + len(valid.paths) == 3000 and len(valid.paths) == 60
    rows = {int(p[-12:-4]): e for s in (train, valid) for p, e in zip(s.paths, s.embeddings, strict=True)}
    original, copy = planted(3000, copies=0.02, seed=0)
    cos = [rows[a] @ rows[b] / np.linalg.norm(rows[a]) / np.linalg.norm(rows[b]) for a, b in zip(original, copy,
                                                                                                   strict=True)]
    assert min(cos) > 0.99 and not set(original) & set(copy)
    stamp = (out / "_bench.json").stat().st_mtime_ns
    assert write_store(out, rows=3000, dim=16, clusters=10, copies=0.02, chunk=1000) == first
    assert (out / "_bench.json").stat().st_mtime_ns == stamp  # reused, not written again


def test_measure_counts_planted_and_false_pairs():
    originals = np.eye(4, dtype=np.float32)
    copies = originals.copy()
    copies[3] = np.array([0.6, 0, 0, 0.8], np.float32)  # cos 0.8 to its original, 0.6 to original 0
    rows = {r["threshold"]: r for r in dedup_bench.measure(originals, copies, (0.5, 0.7, 0.9))}
    assert rows[0.9]["recall"] == 0.75 and rows[0.9]["precision"] == 1.0
    assert rows[0.7]["recall"] == 1.0 and rows[0.7]["precision"] == 1.0
    # at 0.5: copy 3 also pairs with original 0 and copy 0 (0.6): 2 false pairs beside the 4 planted
    assert rows[0.5]["recall"] == 1.0 and rows[0.5]["false_pairs"] == 2 and rows[0.5]["precision"] == 4 / 6


@pytest.mark.job
def test_study_and_timing_small(tmp_path, capsys):
    dedup_bench.main(["--rows", "3000", "--dim", "16", "--folder", str(tmp_path), "--json", str(tmp_path / "d.json")])
    report = json.loads((tmp_path / "d.json").read_text())
    study = report["study"]
    assert study["originals"] >= 40 and set(study["per_kind"]) == set(dedup_bench.KINDS)
    exact = {r["threshold"]: r for r in study["per_kind"]["exact"]}
    assert all(r["recall"] == 1.0 for r in exact.values())  # the same bytes: cosine 1
    assert study["copy_cosine"]["exact"]["min"] == pytest.approx(1.0, abs=1e-5)
    assert report["timing"]["planted_found"] == report["timing"]["planted"] > 0
    assert "planted pairs found" in capsys.readouterr().out


@pytest.mark.server
def test_explore_latency_small(tmp_path, capsys):
    explore_bench.main(["--rows", "2000", "--dim", "16", "--queries", "20", "--kinds", "exact", "ivf",
                        "--folder", str(tmp_path), "--port", "0", "--text-model", "", "--json",
                        str(tmp_path / "e.json")])
    runs = json.loads((tmp_path / "e.json").read_text())["runs"]
    assert [r["index"]["kind"] for r in runs] == ["exact", "ivf"] and runs[1]["reopen_s"] is not None
    for r in runs:
        assert 0 < r["all"]["p50_ms"] <= r["all"]["p99_ms"] and r["valid only"]["queries"] == 20
