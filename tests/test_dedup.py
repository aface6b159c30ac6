"""pipelines/dedup.py: planted near-copies are found within and across splits (exact and approximate index), each
pair once, with the leakage counted; the output goes beside the embeddings; bad settings are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipelines import dedup, store
from pipelines.config import REPO_ROOT
from pipelines.errors import UserError

DIM = 24
META = {"model": "tiny", "revision": None, "embedding_dim": DIM, "dtype": "float32", "image_size": [384, 384],
        "preprocess": {}, "version": "test"}


def write(out, split, vectors, names):
    labels = [n.split("/")[1] for n in names]
    store.write_part(store.split_dir(out, split), store.to_table(names, labels, vectors, META), prefix="shard0of1")


@pytest.fixture()
def planted(tmp_path):
    """train 300 random rows + 2 copies of train rows inside train; valid 100 rows of which 4 copy train rows."""
    rng = np.random.default_rng(0)
    train = rng.normal(size=(302, DIM)).astype(np.float32)
    train[300] = train[10] * 3 + rng.normal(scale=0.01, size=DIM)  # scale does not matter: cosine
    train[301] = train[20] + rng.normal(scale=0.01, size=DIM)
    valid = rng.normal(size=(100, DIM)).astype(np.float32)
    for i, j in enumerate((1, 2, 3, 10)):
        valid[i] = train[j] + rng.normal(scale=0.01, size=DIM)
    out = tmp_path / "emb"
    write(out, "train", train, [f"train/c{i % 4}/t{i:04d}.png" for i in range(302)])
    write(out, "valid", valid, [f"valid/c{i % 4}/v{i:04d}.png" for i in range(100)])
    return out, train, valid


def run(out, **kw):
    args = {"embeddings_dir": out, "splits": None, "threshold": 0.95, "chunk_rows": 64, "exact_below": 50000,
            "cells": "auto", "probe": 2, "train_rows": "auto", "iters": 10, "seed": 0, "output_dir": None,
            "device": "cpu"}
    return dedup.run_dedup(**{**args, **kw})


def brute_pairs(train, valid, threshold):
    x = np.concatenate([train, valid]).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    a, b = np.nonzero(np.triu(sims >= threshold, k=1))
    return set(zip(a.tolist(), b.tolist(), strict=True))


CELLS = {"all pairs": {}, "cells": {"exact_below": 0, "cells": 8, "probe": 2},
         "one cell each": {"exact_below": 0, "cells": 4, "probe": 1, "chunk_rows": 7}}


@pytest.mark.parametrize("how", list(CELLS))
def test_planted_copies_are_found_once_with_their_leakage(planted, how):
    out, train, valid = planted
    summary = run(out, **CELLS[how])
    pairs = pd.read_parquet(out.parent / "emb-duplicates" / "pairs.parquet")
    names = [f"train/c{i % 4}/t{i:04d}.png" for i in range(302)] + [f"valid/c{i % 4}/v{i:04d}.png" for i in range(100)]
    got = {tuple(sorted((names.index(a), names.index(b)))) for a, b in zip(pairs.path_a, pairs.path_b, strict=True)}
    want = brute_pairs(train, valid, 0.95)
    # train 10, train 300 and valid 3 are copies of each other (3 pairs); train 20 ~ train 301; valid 0-2 copy
    # train 1-3: 7 pairs over 11 rows, 2 of them within train; valid 0-3 copy train rows 1, 2, 3, 10 and 300
    assert got == want and len(want) == 7
    assert summary["pairs"] == 7 and summary["within_split_pairs"] == 2 and summary["rows_involved"] == 11
    assert summary["leakage"] == {"train": {"valid": 5}, "valid": {"train": 4}}
    assert list(pairs.columns) == ["path_a", "split_a", "label_a", "path_b", "split_b", "label_b", "score"]
    assert (pairs.score >= 0.95).all() and pairs.score.is_monotonic_decreasing
    assert json.loads((out.parent / "emb-duplicates" / "summary.json").read_text())["pairs"] == 7
    assert summary["search"]["method"] == ("all pairs" if how == "all pairs" else "k-means cells")
    assert store.foreign_entries(out) == []
    assert "4 valid rows have a near-copy in train" in dedup.summary_line(summary)


def test_one_split_and_many_copies_of_one_row(planted, tmp_path):
    out, _, _ = planted
    summary = run(out, splits=["valid"], output_dir=tmp_path / "d")
    assert summary["pairs"] == 0 and summary["leakage"] == {} and summary["splits"] == ["valid"]
    rows = np.tile(np.random.default_rng(5).normal(size=(1, DIM)).astype(np.float32), (30, 1))  # 30 copies
    write(tmp_path / "many", "train", rows, [f"train/c0/m{i:02d}.png" for i in range(30)])
    every = run(tmp_path / "many", exact_below=0, cells=2)
    assert every["pairs"] == 30 * 29 // 2 and every["rows_involved"] == 30  # a range search: no cap per row


def test_near_copies_for_validate():
    rng = np.random.default_rng(1)
    support = rng.normal(size=(50, DIM)).astype(np.float32)
    queries = rng.normal(size=(10, DIM)).astype(np.float32)
    queries[[2, 7]] = support[[4, 40]] * 0.5
    assert np.flatnonzero(dedup.near_copies(queries, support, threshold=0.95, chunk_rows=3)).tolist() == [2, 7]
    assert not dedup.near_copies(queries, support[:0], threshold=0.95).any()


@pytest.mark.parametrize(("kw", "message"), [
    ({"threshold": 0}, "threshold=0: expected a cosine similarity in (0, 1]"),
    ({"threshold": "high"}, "threshold='high'"),
    ({"chunk_rows": 0}, "chunk_rows=0: expected a whole number"),
    ({"cells": "many"}, "cells='many'"),
    ({"probe": 1.5}, "probe=1.5"),
    ({"splits": ["test"]}, "split 'test': no parts"),
])
def test_bad_settings_are_one_line(planted, kw, message):
    out, _, _ = planted
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(out, **kw)


@pytest.mark.job
def test_cli_prints_one_summary_line_and_errors_are_one_line(planted):
    out, _, _ = planted
    cmd = [sys.executable, "-m", "pipelines.dedup", f"embeddings_dir={out}", "device=cpu"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("7 near-duplicate pairs (cosine >= 0.95) among 402 rows (2 within a split)")
    bad = subprocess.run([*cmd, "threshold=2"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                         check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: threshold=2: expected a cosine similarity")
