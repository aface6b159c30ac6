"""pipelines/bench/knn.py: every backend timed on the same random embeddings agrees with sklearn's predictions."""

from __future__ import annotations

import json

from pipelines.bench import knn as bench_knn


def test_backends_are_timed_and_agree_with_sklearn(tmp_path, capsys):
    output = tmp_path / "knn.json"
    rows = bench_knn.main(["--train", "300", "--queries", "200", "--dim", "16", "--classes", "30", "--repeat", "2",
                           "--backends", "torch:cpu", "--json", str(output)])
    assert [(r["name"], r["device"]) for r in rows] == [("sklearn", "cpu"), ("torch", "cpu")]
    for row in rows:
        assert row["same_as_sklearn"] == row["queries"] == 200 and row["best_s"] <= row["median_s"]
        assert 0.0 <= row["top1"] <= 1.0
    assert json.loads(output.read_text())["rows"] == rows
    printed = capsys.readouterr().out
    assert "k-NN benchmark: 300 train x 200 queries x 16-d float32, 30 classes" in printed
