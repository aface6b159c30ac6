"""`python -m pipelines.subset`: a seeded few-shot subset, `train/<class>/` and `valid/<class>/`, of a class tree.

The source is a Kaggle ImageNet download (`ILSVRC/Data/CLS-LOC/train/<synset>/*.JPEG`, `LOC_synset_mapping.txt`)
or any `<root>/<class>/` tree. Each class's files are shuffled with a generator seeded by (seed, class name), so
a class's draw depends on nothing else, and split off in order: the splits are disjoint. The output holds
symlinks (or copies), `manifest.csv` (split, label, path, source), `subset.json` (the settings and counts) and,
when the source has one, `LOC_synset_mapping.txt`, where `pipelines.validate` finds the class names.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipelines import store
from pipelines.config import CONF_DIR, UserError, clean_errors

log = logging.getLogger(__name__)

KAGGLE_TRAIN = Path("ILSVRC", "Data", "CLS-LOC", "train")
CLASS_NAMES_FILE = "LOC_synset_mapping.txt"
MANIFEST, SETTINGS = "manifest.csv", "subset.json"
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
LINKS = ("symlink", "copy")


def class_root(source: Path) -> Path:
    """The folder holding one folder per class: Kaggle's `ILSVRC/Data/CLS-LOC/train` when present, else `source`."""
    if not source.is_dir():
        raise UserError(f"source={source}: no such folder")
    kaggle = source / KAGGLE_TRAIN
    return kaggle if kaggle.is_dir() else source


def list_classes(root: Path) -> dict[str, list[Path]]:
    """{class folder name: its image files, sorted by name}; hidden entries and other files are skipped."""
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        classes[folder.name] = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                                      and f.suffix.lower() in IMAGE_SUFFIXES)
    if not classes:
        raise UserError(f"{root} holds no class folders (expected <class>/<image> or {KAGGLE_TRAIN}/<synset>/)")
    return classes


def draw(label: str, files: list[Path], per_class: dict[str, int], *, seed: int) -> dict[str, list[Path]]:
    """Disjoint picks of `per_class[split]` files for each split, seeded by (seed, label); sorted within a split."""
    rng = np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])
    order = rng.permutation(len(files))
    picks, start = {}, 0
    for split, n in per_class.items():
        picks[split] = sorted(files[i] for i in order[start:start + n])
        start += n
    return picks


def build_subset(
    *,
    source: str | Path,
    output: str | Path,
    per_class: dict[str, int],
    seed: int,
    link: str,
    overwrite: bool,
) -> dict[str, Any]:
    """Build `output/<split>/<class>/` for each split of `per_class` (split -> images per class); the summary.

    The settings' defaults are conf/subset.yaml's.
    """
    per_class = dict(per_class)
    source, output = Path(source).resolve(), Path(output)
    _check_settings(per_class, link)
    root = class_root(source)
    classes = list_classes(root)
    need = sum(per_class.values())
    short = {label: len(files) for label, files in classes.items() if len(files) < need}
    if short:
        shown = ", ".join(f"{label} ({n})" for label, n in sorted(short.items())[:5])
        raise UserError(f"{len(short)} classes under {root} have fewer than the {need} images asked for: {shown}")
    _prepare_output(output, per_class, overwrite=overwrite)
    rows = []
    for label, files in classes.items():
        for split, picked in draw(label, files, per_class, seed=seed).items():
            rows += [_place(src, output / split / label / src.name, output, split, label, link) for src in picked]
    names = source / CLASS_NAMES_FILE
    if names.is_file():
        shutil.copyfile(names, output / CLASS_NAMES_FILE)
    summary = {"source": str(source), "class_root": str(root), "output": str(output.resolve()), "seed": seed,
               "per_class": per_class, "link": link, "classes": len(classes),
               "images": {split: n * len(classes) for split, n in per_class.items()},
               "class_names": str(output / CLASS_NAMES_FILE) if names.is_file() else None}
    _write_manifest(output / MANIFEST, rows)
    store.write_json(output / SETTINGS, summary)  # written last: its presence marks a complete subset
    return summary


def _check_settings(per_class: dict[str, int], link: str) -> None:
    if link not in LINKS:
        raise UserError(f"link={link!r}: expected one of {', '.join(LINKS)}")
    bad = {split: n for split, n in per_class.items() if int(n) < 1}
    if bad or not per_class:
        raise UserError(f"per_class={per_class}: expected a positive number of images for each split")


def _prepare_output(output: Path, per_class: dict[str, int], *, overwrite: bool) -> None:
    """Refuse to mix with an earlier subset unless `overwrite`, which removes only what a subset writes."""
    ours = [output / split for split in per_class] + [output / name for name in (MANIFEST, SETTINGS, CLASS_NAMES_FILE)]
    present = [p for p in ours if p.exists() or p.is_symlink()]
    if present and not overwrite:
        raise UserError(f"{output} already holds {', '.join(p.name for p in present)}; "
                        "choose another output, or overwrite=true to rebuild it")
    for path in present:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # removes the links, never what they point to
        else:
            path.unlink()
    output.mkdir(parents=True, exist_ok=True)


def _place(src: Path, dst: Path, output: Path, split: str, label: str, link: str) -> dict[str, str]:
    """Symlink (absolute target) or copy one file; its manifest row."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link == "symlink":
        os.symlink(src, dst)
    else:
        shutil.copy2(src, dst)
    return {"split": split, "label": label, "path": dst.relative_to(output).as_posix(), "source": str(src)}


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["split", "label", "path", "source"])
        writer.writeheader()
        writer.writerows(rows)


@hydra.main(config_path=CONF_DIR, config_name="subset", version_base="1.3")
@clean_errors(OSError)
def main(cfg: DictConfig) -> None:
    summary = build_subset(**OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    counts = ", ".join(f"{split} {n} ({summary['per_class'][split]}/class)" for split, n in summary["images"].items())
    print(f"{summary['classes']} classes from {summary['class_root']}: {counts} -> {summary['output']} "
          f"({summary['link']}s, seed {summary['seed']}); manifest {Path(summary['output']) / MANIFEST}")
    if summary["class_names"]:
        print(f"class names: {summary['class_names']}")


if __name__ == "__main__":
    main()
