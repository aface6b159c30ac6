"""An embedded dataset with its validation and dedup outputs beside it, and an explore app over it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers.images import SAMPLE

from pipelines.dedup import run_dedup
from pipelines.embed import run_embed
from pipelines.explore.app import Limits
from pipelines.explore.server import build_explorer
from pipelines.validate import run_validate

LABELS = ("bag", "pullover", "sandal", "shirt", "sneaker", "trouser")
LIMITS = Limits(max_query_chars=100, max_k=50, max_upload_bytes=200_000, max_upload_pixels=1_000_000)
ANN = {"exact_below": 50000, "hnsw_below": 200000, "ivf_nlist": "auto", "ivf_nprobe": 8,
             "ivf_train_rows": "auto", "ivf_train_iters": 10, "hnsw_m": 16, "hnsw_ef_construction": 80,
             "hnsw_ef_search": 64, "seed": 0}


@pytest.fixture(scope="session")
def explored(tmp_path_factory) -> dict:
    """6 classes x (4 train + 3 valid) of data/sample, plus `train/bag/escape.png`, a symlink to an image outside
    the dataset (the embed job follows it: a row whose file lies elsewhere), embedded with the tiny model;
    validate's and dedup's outputs beside the embeddings; a secret file beside the dataset."""
    base = tmp_path_factory.mktemp("explore")
    root, outside = base / "data", base / "outside"
    for split, n in (("train", 4), ("valid", 3)):
        for label in LABELS:
            (root / split / label).mkdir(parents=True)
            for src in sorted((SAMPLE / split / label).iterdir())[:n]:
                shutil.copy(src, root / split / label / src.name)
    outside.mkdir()
    shutil.copy(min((SAMPLE / "valid" / "coat").iterdir()), outside / "secret.png")
    (root / "train" / "bag" / "escape.png").symlink_to(outside / "secret.png")
    (base / "secret.txt").write_text("not for the web")
    out = base / "emb" / "sample-tiny"
    run_embed(root=root, splits=["train", "valid"], output_dir=out, model="tiny", device="cpu", num_workers=0,
              batch_size=8, progress=False)
    run_validate(embeddings_dir=out, k=3)
    run_dedup(embeddings_dir=out, splits=None, threshold=0.999, chunk_rows=1000, exact_below=50000, cells="auto",
              probe=2, train_rows="auto", iters=10, seed=0, output_dir=None, device="cpu")
    return {"root": root, "out": out, "outside": outside, "base": base}


def make_explorer(out: Path, **overrides):
    settings = {"embeddings_dir": out, "splits": None, "dataset_root_dir": None, "allowed_roots": [],
                "name_or_path": "tiny", "revision": None, "device": "cpu", "dtype": "float32", "text_server": None,
                "index": "exact", "index_dir": None, "ann_options": ANN, "limits": LIMITS}
    return build_explorer(**{**settings, **overrides})


@pytest.fixture(scope="session")
def explorer(explored):
    return make_explorer(explored["out"])
