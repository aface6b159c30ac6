"""pipelines/subset.py on fake Kaggle and plain trees: counts, disjoint splits, seeded, refusals, embed can read it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipelines.config import REPO_ROOT, UserError
from pipelines.data import list_split
from pipelines.subset import build_subset as build_with

# conf/subset.yaml's settings (the one source of their defaults), without the two it leaves to the command line
DEFAULTS = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf" / "subset.yaml")).items()
            if k not in ("defaults", "source", "output")}


def build_subset(**settings):
    """`build_subset` with conf/subset.yaml's defaults for the settings not given."""
    return build_with(**{**DEFAULTS, **settings})


SYNSETS = [f"n0{1440764 + 7 * i}" for i in range(6)]


def fake_kaggle(root: Path, per_class: int = 40) -> Path:
    """Kaggle's layout with placeholder bytes: train/<synset>/<synset>_<i>.JPEG, a val folder, the mapping file."""
    for synset in SYNSETS:
        folder = root / "ILSVRC" / "Data" / "CLS-LOC" / "train" / synset
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{synset}_{i}.JPEG").write_bytes(f"{synset} {i}".encode())
        (folder / ".DS_Store").write_bytes(b"")
    (root / "ILSVRC" / "Data" / "CLS-LOC" / "val").mkdir()
    (root / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"val")
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{s} class number {i}\n" for i, s in enumerate(SYNSETS)))
    return root


def manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_kaggle_tree_gives_disjoint_seeded_splits(tmp_path):
    source = fake_kaggle(tmp_path / "kaggle")
    summary = build_subset(source=source, output=tmp_path / "out", seed=3)
    out = tmp_path / "out"
    assert summary["classes"] == 6 and summary["images"] == {"train": 60, "valid": 120}
    for synset in SYNSETS:
        train = {p.name for p in (out / "train" / synset).iterdir()}
        valid = {p.name for p in (out / "valid" / synset).iterdir()}
        assert len(train) == 10 and len(valid) == 20 and not train & valid
        for link in (out / "train" / synset).iterdir():
            assert link.is_symlink() and link.read_text() == f"{synset} {link.stem.split('_')[1]}"
            assert link.resolve().parent == (source / "ILSVRC/Data/CLS-LOC/train" / synset).resolve()
    rows = manifest(out)
    assert len(rows) == 180 and {r["path"] for r in rows} == {
        p.relative_to(out).as_posix() for p in out.glob("*/*/*.JPEG")}
    assert (out / "LOC_synset_mapping.txt").read_text() == (source / "LOC_synset_mapping.txt").read_text()
    assert json.loads((out / "subset.json").read_text())["seed"] == 3
    # the embed job lists the subset through the links
    listed = list_split(out, "valid")
    assert len(listed) == 120 and {r.label for r in listed} == set(SYNSETS)

    build_subset(source=source, output=tmp_path / "again", seed=3)
    assert manifest(tmp_path / "again") == rows
    build_subset(source=source, output=tmp_path / "other", seed=4)
    assert {r["source"] for r in manifest(tmp_path / "other")} != {r["source"] for r in rows}


def test_a_class_draw_does_not_depend_on_the_other_classes(tmp_path):
    source = fake_kaggle(tmp_path / "kaggle")
    build_subset(source=source, output=tmp_path / "all")
    (source / "ILSVRC/Data/CLS-LOC/train" / SYNSETS[0]).rename(tmp_path / "moved")
    build_subset(source=source, output=tmp_path / "fewer")
    kept = [r for r in manifest(tmp_path / "all") if r["label"] != SYNSETS[0]]
    assert manifest(tmp_path / "fewer") == kept


def test_plain_tree_with_copies_and_other_counts(tmp_path):
    source = tmp_path / "plain"
    for label in ("cat", "dog"):
        (source / label).mkdir(parents=True)
        for i in range(9):
            (source / label / f"{i}.png").write_bytes(f"{label}{i}".encode())
        (source / label / "notes.txt").write_text("not an image")
    summary = build_subset(source=source, output=tmp_path / "out", per_class={"train": 2, "valid": 3, "test": 4},
                           link="copy")
    assert summary["images"] == {"train": 4, "valid": 6, "test": 8} and summary["class_names"] is None
    for label in ("cat", "dog"):
        picked = [p for split in ("train", "valid", "test") for p in (tmp_path / "out" / split / label).iterdir()]
        assert len(picked) == 9 == len({p.name for p in picked})  # every image once: the splits are disjoint
        assert not any(p.is_symlink() for p in picked) and picked[0].read_bytes().startswith(label.encode())


def test_refusals_name_the_problem(tmp_path):
    source = fake_kaggle(tmp_path / "kaggle", per_class=25)
    with pytest.raises(UserError, match=r"6 classes under .*CLS-LOC/train have fewer than the 30 images asked for: "
                                        r"n01440764 \(25\)"):
        build_subset(source=source, output=tmp_path / "out")
    build_subset(source=source, output=tmp_path / "out", per_class={"train": 5, "valid": 5})
    with pytest.raises(UserError, match=r"out already holds train, valid, manifest.csv, subset.json, "
                                        r"LOC_synset_mapping.txt; choose another output, or overwrite=true"):
        build_subset(source=source, output=tmp_path / "out", per_class={"train": 5, "valid": 5})
    build_subset(source=source, output=tmp_path / "out", per_class={"train": 3, "valid": 4}, overwrite=True)
    assert len(manifest(tmp_path / "out")) == 6 * 7 and len(os.listdir(tmp_path / "out" / "train" / SYNSETS[0])) == 3
    assert len(os.listdir(source / "ILSVRC/Data/CLS-LOC/train" / SYNSETS[0])) == 26  # sources untouched
    with pytest.raises(UserError, match="source=.*missing: no such folder"):
        build_subset(source=tmp_path / "missing", output=tmp_path / "x")
    with pytest.raises(UserError, match="link='hardlink': expected one of symlink, copy"):
        build_subset(source=source, output=tmp_path / "x", link="hardlink")


@pytest.mark.job
def test_cli(tmp_path):
    source = fake_kaggle(tmp_path / "kaggle")
    run = [sys.executable, "-m", "pipelines.subset", f"source={source}", f"output={tmp_path / 'out'}"]
    result = subprocess.run(run, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "6 classes" in result.stdout and "train 60 (10/class), valid 120 (20/class)" in result.stdout
    result = subprocess.run(run, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "already holds train" in result.stderr
    result = subprocess.run(run[:4], check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "error: output is required" in result.stderr
