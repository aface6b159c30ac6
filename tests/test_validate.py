"""pipelines/validate.py: the report on the sample's tiny-model embeddings equals scikit-learn computed here,
every backend gives the same numbers, episodes are seeded draws, mismatched splits are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.neighbors import KNeighborsClassifier

from pipelines import store
from pipelines.config import REPO_ROOT, UserError
from pipelines.embed import run_embed
from pipelines.fewshot import episode_draws
from pipelines.validate import run_validate

SAMPLE = REPO_ROOT / "data" / "sample"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Path:
    """data/sample (10 classes x 10 train + 20 valid) embedded with the tiny model."""
    out = tmp_path_factory.mktemp("sample-tiny")
    run_embed(root=SAMPLE, splits=["train", "valid"], output_dir=out, model="tiny", device="cpu", num_workers=0,
              batch_size=50, progress=False)
    return out


def read_plain(out: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """float64 [N, D] embeddings, labels and paths with plain pyarrow, independent of pipelines.store."""
    table = pq.read_table(out, filters=[("split", "=", split)]).sort_by("path")  # the hive partition
    emb = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(table), -1)
    return emb.astype(np.float64), np.asarray(table.column("label").to_pylist()), table.column("path").to_pylist()


@pytest.mark.job
def test_report_equals_sklearn_computed_here(embedded, tmp_path):
    report = run_validate(embeddings_dir=embedded, output_dir=tmp_path / "v")
    x_train, y_train, _ = read_plain(embedded, "train")
    x_valid, y_valid, paths = read_plain(embedded, "valid")
    clf = KNeighborsClassifier(n_neighbors=10, weights="distance", metric="cosine").fit(x_train, y_train)
    predicted = clf.predict(x_valid)
    top5 = clf.classes_[np.argsort(-clf.predict_proba(x_valid), axis=1, kind="stable")[:, :5]]
    assert report["top1"] == np.mean(predicted == y_valid)
    assert report["top5"] == np.mean((top5 == y_valid[:, None]).any(axis=1))
    assert (report["num_classes"], report["num_train"], report["num_query"]) == (10, 100, 200)
    assert report["model"]["model"] == "tiny" and report["model"]["embedding_dim"] == 32
    assert report["settings"]["subsampled"] is False and len(report["per_episode"]) == 1

    predictions = pd.read_parquet(tmp_path / "v" / "predictions.parquet")
    assert predictions["path"].tolist() == paths and (predictions["prediction"] == predicted).all()
    per_class = pd.read_csv(tmp_path / "v" / "per_class.csv")
    for row in per_class.itertuples():
        mask = y_valid == row.label
        assert row.top1 == np.mean(predicted[mask] == row.label) and row.n_query == mask.sum() == 20
    assert json.loads((tmp_path / "v" / "report.json").read_text())["top1"] == report["top1"]
    assert (tmp_path / "v" / "per_class.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.job
@pytest.mark.parametrize(("metric", "weights"), [("cosine", "distance"), ("euclidean", "uniform")])
def test_every_backend_reports_the_same(embedded, tmp_path, metric, weights):
    reports, predictions = {}, {}
    for backend in ("sklearn", "faiss", "torch"):
        reports[backend] = run_validate(embeddings_dir=embedded, backend=backend, metric=metric, weights=weights,
                                        output_dir=tmp_path / backend)
        predictions[backend] = pd.read_parquet(tmp_path / backend / "predictions.parquet")
    expected = (reports["sklearn"]["top1"], reports["sklearn"]["top5"])
    assert {(r["top1"], r["top5"]) for r in reports.values()} == {expected}
    for backend in ("faiss", "torch"):
        assert reports[backend]["backend"]["name"] == backend
        pd.testing.assert_frame_equal(predictions[backend].drop(columns="distances"),
                                      predictions["sklearn"].drop(columns="distances"))


def test_episode_draws_are_seeded_samples_of_each_class():
    labels = np.repeat(np.arange(4), [12, 20, 7, 15])
    draws = episode_draws(labels, 4, shots=5, episodes=3, seed=1)
    assert len(draws) == 3
    for rows in draws:
        assert np.array_equal(np.bincount(labels[rows], minlength=4), [5, 5, 5, 5])
        assert len(set(rows.tolist())) == len(rows)
    assert len({tuple(d) for d in draws}) == 3
    again = episode_draws(labels, 4, shots=5, episodes=3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(draws, again, strict=True))
    assert not np.array_equal(episode_draws(labels, 4, shots=5, episodes=1, seed=2)[0], draws[0])
    # a class short of `shots` gives all it has
    short = episode_draws(np.repeat(np.arange(2), [12, 3]), 2, shots=5, episodes=1, seed=0)[0]
    assert np.array_equal(np.bincount(np.repeat(np.arange(2), [12, 3])[short]), [5, 3])
    # nothing to draw: every row, once, whatever `episodes` says (the seed protocol)
    (only,) = episode_draws(np.repeat(np.arange(3), 10), 3, shots=10, episodes=5, seed=0)
    assert np.array_equal(only, np.arange(30))


@pytest.mark.job
def test_episodes_subsample_the_train_split(embedded, tmp_path):
    """valid has 20 images per class: as the train split with shots=5, each episode draws 5 of them."""
    args = {"embeddings_dir": embedded, "train_split": "valid", "query_split": "train", "shots": 5, "episodes": 3,
            "backend": "torch"}
    report = run_validate(**args, output_dir=tmp_path / "a")
    again = run_validate(**args, output_dir=tmp_path / "b")
    assert report["num_train"] == 50 and report["num_train_available"] == 200 and report["num_query"] == 100
    assert report["settings"]["subsampled"] and len(report["per_episode"]) == 3
    top1 = [e["top1"] for e in report["per_episode"]]
    assert report["top1"] == pytest.approx(np.mean(top1)) and report["top1_std"] == pytest.approx(np.std(top1, ddof=1))
    assert [e["top1"] for e in again["per_episode"]] == top1
    per_class = pd.read_csv(tmp_path / "a" / "per_class.csv")
    assert (per_class["n_train"] == 5).all()
    weighted = (per_class["top1"] * per_class["n_query"]).sum() / per_class["n_query"].sum()
    assert weighted == pytest.approx(report["top1"])


def write_split(out: Path, split: str, labels: list[str], *, dim: int = 8, **meta) -> None:
    """A split of random embeddings, one row per label, with the footer metadata an embed run writes."""
    metadata = {"model": "tiny", "revision": None, "embedding_dim": dim, "dtype": "float32", "image_size": [384, 384],
                "preprocess": {"size": {"height": 384, "width": 384}}, "version": "0.2.0", **meta}
    emb = np.random.default_rng(len(labels)).normal(size=(len(labels), metadata["embedding_dim"]))
    paths = [f"{split}/{label}/{i}.png" for i, label in enumerate(labels)]
    store.write_part(store.split_dir(out, split), store.to_table(paths, labels, emb, metadata), prefix="test")


@pytest.mark.parametrize(("changes", "message"), [
    ({"model": "google/siglip-base-patch16-224"}, "model: 'tiny' in train, 'google/siglip-base-patch16-224' in valid"),
    ({"embedding_dim": 16}, "embedding_dim: 8 in train, 16 in valid"),
    ({"dtype": "bfloat16"}, "dtype: 'float32' in train, 'bfloat16' in valid"),
])
def test_mismatched_splits_are_refused(tmp_path, changes, message):
    labels = ["a", "b", "c"] * 12
    write_split(tmp_path, "train", labels)
    write_split(tmp_path, "valid", labels, **changes)
    with pytest.raises(UserError, match="cannot compare train with valid: they were embedded differently") as exc:
        run_validate(embeddings_dir=tmp_path)
    assert message in str(exc.value)


def test_other_classes_are_refused(tmp_path):
    write_split(tmp_path, "train", ["ankle_boot", "bag", "coat"] * 12)
    write_split(tmp_path, "valid", ["boot", "coat"] * 5)
    with pytest.raises(UserError, match=r"train and valid hold different classes: 2 \(ankle_boot, bag\) only in "
                                        r"train; 1 \(boot\) only in valid"):
        run_validate(embeddings_dir=tmp_path)


@pytest.mark.job
def test_class_names_are_read_from_the_mapping_file(embedded, tmp_path):
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("bag n04026417 purse\ncoat n03057021 coat, outer garment\n")
    report = run_validate(embeddings_dir=embedded, class_names=mapping, output_dir=tmp_path / "v")
    per_class = pd.read_csv(tmp_path / "v" / "per_class.csv", keep_default_na=False).set_index("label")
    assert per_class.loc["bag", "name"] == "n04026417 purse" and per_class.loc["shirt", "name"] == "shirt"
    assert report["class_names"] == str(mapping)
    with pytest.raises(UserError, match="class_names=.*missing.txt: no such file"):
        run_validate(embeddings_dir=embedded, class_names=tmp_path / "missing.txt")


def validate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.validate", *args], check=False, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.job
def test_cli_prints_the_table_and_errors_are_one_line(embedded, tmp_path):
    result = validate_cli(f"embeddings_dir={embedded}", "knn=faiss", f"output_dir={tmp_path / 'v'}")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert f"top-1 {100 * report['top1']:.2f}%" in result.stdout and "worst classes by top-1" in result.stdout
    assert report["backend"] == {"name": "faiss", "device": "cpu"}
    assert report["dataset_root"] == str(SAMPLE)  # the default dataset holds the embedded files: the notebook's images

    result = validate_cli(f"embeddings_dir={tmp_path / 'nothing'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"no part-*.parquet under {tmp_path / 'nothing' / 'split=train'}" in result.stderr
    result = validate_cli(f"embeddings_dir={embedded}", "metric=manhattan", f"output_dir={tmp_path / 'w'}")
    assert result.returncode == 2 and "error: metric='manhattan': expected one of cosine, euclidean" in result.stderr
    write_split(tmp_path / "mixed", "train", ["a", "b"] * 10)
    write_split(tmp_path / "mixed", "valid", ["a", "b"] * 10, embedding_dim=16)
    result = validate_cli(f"embeddings_dir={tmp_path / 'mixed'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: cannot compare train with valid: they were embedded differently (embedding_dim: 8" in result.stderr


@pytest.mark.job
def test_outputs_go_beside_the_embeddings_never_inside(embedded, tmp_path):
    """The default output_dir (null) is the sibling `<embeddings_dir>-validation`; inside the dataset is refused
    (a `**/*.parquet` reader would take predictions.parquet for embeddings)."""
    before = sorted(p.relative_to(embedded) for p in embedded.rglob("*"))
    report = run_validate(embeddings_dir=f"{embedded}/")  # a trailing slash names the same sibling
    sibling = embedded.with_name(embedded.name + "-validation")
    assert Path(report["files"]["report"]) == sibling / "report.json"
    assert sorted(p.name for p in sibling.iterdir()) == ["per_class.csv", "per_class.png", "predictions.parquet",
                                                         "report.json"]
    assert sorted(p.relative_to(embedded) for p in embedded.rglob("*")) == before  # nothing written inside
    for inside in (embedded / "validation", embedded / "split=valid" / "v", embedded):
        with pytest.raises(UserError, match=f"output_dir={inside}: lies inside embeddings_dir"):
            run_validate(embeddings_dir=embedded, output_dir=inside)


def test_the_old_layout_is_one_line_naming_the_conversion(tmp_path):
    old = tmp_path / "old"
    write_split(old, "train", ["a", "b"] * 5)
    write_split(old, "valid", ["a", "b"] * 5)
    store.split_dir(old, "train").rename(old / "train")  # as pipelines 0.1 wrote it
    store.split_dir(old, "valid").rename(old / "valid")
    result = validate_cli(f"embeddings_dir={old}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {old} is in the layout before version 0.2 (train/, valid/); convert it in place with "
        f"`python -m pipelines.upgrade {old}` (renames only), then rerun")


def test_exclude_duplicates_drops_queries_with_a_near_copy_in_train(tmp_path):
    out = tmp_path / "emb"
    labels = ["a", "b", "c"] * 12
    write_split(out, "train", labels)
    train = store.read_split(out, "train")
    metadata = train.metadata
    rng = np.random.default_rng(7)
    emb = rng.normal(size=(12, 8)).astype(np.float32)
    emb[:3] = train.embeddings[[0, 5, 9]] * 2 + rng.normal(scale=1e-3, size=(3, 8))  # rescaled near-copies
    paths = [f"valid/{labels[i]}/{i}.png" for i in range(12)]
    store.write_part(store.split_dir(out, "valid"), store.to_table(paths, labels[:12], emb, metadata),
                     prefix="test")
    kept = run_validate(embeddings_dir=out, output_dir=tmp_path / "v", exclude_duplicates=True)
    assert kept["duplicates_excluded"]["dropped"] == 3 and kept["duplicates_excluded"]["of"] == 12
    assert kept["num_query"] == 9 and sorted(kept["duplicates_excluded"]["examples"]) == sorted(paths[:3])
    assert set(pd.read_parquet(tmp_path / "v" / "predictions.parquet")["path"]) == set(paths[3:])
    everything = run_validate(embeddings_dir=out, output_dir=tmp_path / "w")
    assert everything["num_query"] == 12 and everything["duplicates_excluded"] is None
    with pytest.raises(UserError, match=r"duplicate_threshold=1.5: expected a cosine"):
        run_validate(embeddings_dir=out, output_dir=tmp_path / "x", exclude_duplicates=True,
                     duplicate_threshold=1.5)
