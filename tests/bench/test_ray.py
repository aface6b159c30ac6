"""pipelines/bench/ray.py: the generated JPEGs split into train and valid, and one timed command-line run."""

from __future__ import annotations

import pytest

from pipelines import store
from pipelines.bench.jpegs import make_jpegs
from pipelines.bench.ray import run_cli, two_splits
from pipelines.data import list_split


def test_two_splits_links_half_the_classes_into_each_split_and_is_reused(tmp_path):
    jpegs = make_jpegs(tmp_path / "jpegs", count=8, size=(64, 48), quality=80, classes=4)
    root = two_splits(jpegs, tmp_path / "splits")
    train, valid = list_split(root, "train"), list_split(root, "valid")
    assert {r.label for r in train} == {"class000", "class001"} and {r.label for r in valid} == {"class002", "class003"}
    assert len(train) + len(valid) == 8
    first = train[0].path.split("/")[-1]
    assert (root / train[0].path).read_bytes() == (jpegs / "train" / train[0].label / first).read_bytes()
    assert two_splits(jpegs, tmp_path / "splits") == root  # links already there: kept


@pytest.mark.job
def test_run_cli_times_a_whole_job_and_reads_its_summary(tmp_path):
    root = two_splits(make_jpegs(tmp_path / "jpegs", count=8, size=(64, 48), quality=80, classes=2),
                      tmp_path / "splits")
    run = run_cli("local", root, tmp_path / "out", ["model=tiny", "device=cpu", "num_workers=1"])
    assert run["images"] == 8 and len(run["split_wall_s"]) == 2
    assert run["wall_s"] > run["job_wall_s"] > 0 and run["images_per_s"] == 8 / run["wall_s"]
    assert len(store.read_split(tmp_path / "out", "train").paths) == 4
    with pytest.raises(RuntimeError, match="failed"):
        run_cli("local", root, tmp_path / "out2", ["model=tiny", "device=cpu", "batch_size=0"])
