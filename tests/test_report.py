"""pipelines/report.py: counts equal a count by hand (ties, tiny class counts), the report family on disk, the
table read back from the files equals the one returned."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipelines import report
from pipelines.errors import UserError


def by_hand(truth: np.ndarray, ranked: np.ndarray, n_classes: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    hit1, hit5 = ranked[:, 0] == truth, (ranked[:, :5] == truth[:, None]).any(axis=1)
    return (hit1.mean(), hit5.mean(), np.bincount(truth[hit1], minlength=n_classes),
            np.bincount(truth[hit5], minlength=n_classes))


def test_rank_breaks_ties_to_the_lowest_class():
    scores = np.array([[0.0, 2.0, 2.0, 0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(report.rank(scores), [[1, 2, 4, 0, 3], [0, 1, 2, 3, 4]])
    assert report.rank(scores[:, :3]).shape == (2, 3)  # fewer classes than 5: all of them


@pytest.mark.parametrize("n_classes", [1, 2, 3, 4, 5, 6, 12])
def test_counts_equal_a_count_by_hand(n_classes):
    rng = np.random.default_rng(n_classes)
    truth = rng.integers(0, n_classes, size=90)
    scores = rng.integers(0, 3, size=(90, n_classes)).astype(float)  # many ties, which rank settles
    ranked = report.rank(scores)
    counts = report.count(truth, ranked, n_classes=n_classes, info={"note": 1})
    top1, top5, hits1, hits5 = by_hand(truth, ranked, n_classes)
    assert (counts.top1, counts.top5) == (top1, top5)
    np.testing.assert_array_equal(np.diagonal(counts.confusion), hits1)
    np.testing.assert_array_equal(counts.top5_hits, hits5)
    assert counts.confusion.shape == (n_classes, n_classes) and counts.confusion.sum() == 90
    np.testing.assert_array_equal(counts.confusion[truth[0]].sum(), (truth == truth[0]).sum())
    assert counts.info == {"note": 1}


def test_accuracy_and_per_class_table_over_runs():
    truth = np.array([0, 0, 1, 1, 2, 2])
    runs = [report.count(truth, report.rank(np.eye(3)[pred]), n_classes=3)
            for pred in ([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2])]
    acc = report.accuracy(runs)
    assert acc["top1"] == pytest.approx((4 / 6 + 1) / 2) and acc["top1_std"] == pytest.approx(np.std([4 / 6, 1], ddof=1))
    assert acc["top5"] == 1.0 and acc["top5_std"] == 0.0
    table = report.per_class_table(runs, ["a", "b", "c"], {"b": "bee"})
    assert table.columns.tolist() == ["label", "name", "n_query", "top1", "top5", "confused_with", "confused_share"]
    assert table["name"].tolist() == ["a", "bee", "c"] and table["n_query"].tolist() == [2, 2, 2]
    assert table["top1"].tolist() == [3 / 4, 1.0, 3 / 4]
    assert table["confused_with"].tolist() == ["b", "", "a"] and table["confused_share"].tolist() == [1 / 4, 0, 1 / 4]
    assert report.accuracy(runs[:1])["top1_std"] == 0.0
    with_train = report.per_class_table(runs, ["a", "b", "c"], {}, n_train=np.array([5, 5, 4]))
    assert with_train.columns[2] == "n_train" and with_train["n_train"].tolist() == [5, 5, 4]


def test_publish_writes_the_family_and_returns_the_table(tmp_path):
    classes, truth = ["a", "b", "c"], np.array([0, 1, 2, 2])
    run = report.count(truth, report.rank(np.eye(3)[[0, 2, 2, 1]] + 0.1), n_classes=3, info={"extra": 7})
    out = tmp_path / "out"
    written, text = report.publish(
        out, runs=[run], classes=classes, names={}, paths=["q/0", "q/1", "q/2", "q/3"], source={"what": "x"},
        metadata={"num_classes": 3}, title="a title", header=["first line"], note="({seconds[total]:.1f} s)",
        columns={"score": [1.0, 2.0, 3.0, 4.0]}, seconds={"read": 0.5}, start=0.0, worst=2)
    assert sorted(p.name for p in out.iterdir()) == ["per_class.csv", "per_class.png", "predictions.parquet",
                                                     "report.json"]
    saved = json.loads((out / "report.json").read_text())
    assert saved == written and list(saved) == ["what", "top1", "top1_std", "top5", "top5_std", "num_classes",
                                                "per_episode", "seconds", "files"]
    assert saved["top1"] == 0.5 and saved["per_episode"] == [{"episode": 0, "top1": 0.5, "top5": 1.0, "extra": 7}]
    assert list(saved["seconds"]) == ["read", "total"] and saved["files"]["report"] == str(out / "report.json")
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert predictions.columns.tolist() == ["path", "label", "prediction", "top5", "score"]
    assert predictions["prediction"].tolist() == ["a", "c", "c", "b"] and list(predictions["top5"][1]) == ["c", "a", "b"]
    per_class = pd.read_csv(out / "per_class.csv", keep_default_na=False)
    assert text == report.format_table(saved, per_class, header=["first line"], note="({seconds[total]:.1f} s)")
    lines = text.splitlines()
    assert lines[0] == "first line" and lines[1].startswith("top-1 50.00%   top-5 100.00%   (")
    assert lines[-1] == f"report, per-class table, predictions and figure in {out}/"
    assert (out / "per_class.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_class_names_file(tmp_path):
    mapping = tmp_path / report.CLASS_NAMES_FILE
    mapping.write_text("n01440764 tench, Tinca tinca\n\nn01443537 goldfish\n")
    assert report.read_class_names(mapping) == {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish"}
    assert report.find_class_names(None, [tmp_path / "none", tmp_path]) == mapping
    assert report.find_class_names(None, [tmp_path / "none"]) is None
    with pytest.raises(UserError, match="no such file"):
        report.find_class_names(tmp_path / "missing.txt", [])
    mapping.write_text("n01440764\n")
    with pytest.raises(UserError, match=r":1: expected '<label> <name>'"):
        report.read_class_names(mapping)
