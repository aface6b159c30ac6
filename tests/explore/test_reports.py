"""pipelines/explore/reports.py: a zero-shot report's files (top-5 probabilities, no neighbours) become the page's
per-class table and misclassified lists; absent outputs are no pages."""

from __future__ import annotations

import json

import pandas as pd

from pipelines.explore.reports import Reports


def test_zeroshot_report_without_neighbours(tmp_path):
    out = tmp_path / "emb"
    out.mkdir()
    folder = tmp_path / "emb-zeroshot"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"top1": 0.5, "top5": 1.0, "num_classes": 2, "num_query": 4}))
    pd.DataFrame({"label": ["a", "b"], "name": ["an a", "a b"], "n_query": [2, 2], "top1": [1.0, 0.0],
                  "top5": [1.0, 1.0], "confused_with": ["", "a"], "confused_share": [0.0, 1.0]}).to_csv(
        folder / "per_class.csv", index=False)
    pd.DataFrame({"path": ["v/a/1", "v/a/2", "v/b/3", "v/b/4"], "label": ["a", "a", "b", "b"],
                  "prediction": ["a", "a", "a", "a"], "top5": [["a", "b"]] * 4, "probability": [0.9, 0.8, 0.7, 0.6],
                  "top5_probabilities": [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]]}).to_parquet(
        folder / "predictions.parquet")
    reports = Reports(out)
    assert set(reports.available()) == {"zeroshot"} and reports.pairs_path is None
    table = reports.per_class("zeroshot")
    assert [c["label"] for c in table["classes"]] == ["a", "b"] and table["classes"][1]["confused_with"] == "a"
    wrong = reports.misclassified("zeroshot", "b", limit=1)
    assert (wrong["queries"], wrong["wrong"], len(wrong["shown"])) == (2, 2, 1)
    assert wrong["shown"][0] == {"path": "v/b/3", "label": "b", "prediction": "a", "top5": ["a", "b"],
                                 "probability": 0.7, "top5_probabilities": [0.7, 0.3]}
    assert reports.misclassified("zeroshot", "a", limit=5)["shown"] == []
    assert reports.misclassified("zeroshot", "zzz", limit=5) is None
