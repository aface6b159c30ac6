"""A generated embed output for the explore and dedup benchmarks: `rows` clustered unit vectors of `dim`
(`pipelines.bench.search.Vectors`), written as the embed job's Parquet parts, with planted near-copies.

Row i's path is `<split>/c<cluster>/img<i>.jpg`; one row in 50 is valid, the rest train. A `copies` share of the
rows are near-copies of an earlier row (its vector plus noise of norm `copy_noise`, cosine about 0.999), so a dedup
run has known pairs to find. Reused when the folder already holds the same settings (`_bench.json`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import store
from pipelines.bench.search import Vectors

log = logging.getLogger(__name__)

SETTINGS = "_bench.json"


def metadata(dim: int) -> dict[str, Any]:
    """Footer metadata of a generated output (a model name no checkpoint has: nothing is embedded again)."""
    return {"model": "bench-random", "revision": None, "embedding_dim": dim, "dtype": "float32",
            "image_size": [384, 384], "preprocess": {}, "version": "bench"}


def planted(rows: int, *, copies: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Planted pairs (original, copy): int64 [m] each, copy > original, no row copied twice."""
    rng = np.random.default_rng([seed, 7])
    copy = np.sort(rng.choice(np.arange(1, rows), size=int(rows * copies), replace=False))
    original = (rng.random(len(copy)) * copy).astype(np.int64)
    keep = ~np.isin(original, copy)  # an original is itself no copy: pairs stay two rows
    return original[keep], copy[keep]


def write_store(out: Path, *, rows: int, dim: int, clusters: int, copies: float, copy_noise: float = 0.03,
                seed: int = 0, chunk: int = 65536) -> dict[str, Any]:
    """Write (or reuse) the generated output; its settings with the planted pairs' count and the seconds spent."""
    settings = {"rows": rows, "dim": dim, "clusters": clusters, "copies": copies, "copy_noise": copy_noise,
                "seed": seed, "chunk": chunk}
    marker = out / SETTINGS
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == settings:
        return json.loads(marker.read_text())
    start = time.perf_counter()
    vectors = Vectors(rows=rows, dim=dim, clusters=clusters, spread=1.0, seed=seed, chunk=chunk)
    original, copy = planted(rows, copies=copies, seed=seed)
    source = dict(zip(copy.tolist(), original.tolist(), strict=True))
    rng = np.random.default_rng([seed, 8])
    meta = metadata(dim)
    for i, block in enumerate(vectors()):
        first = i * chunk
        ids = np.arange(first, first + len(block))
        mine = [j for j in ids.tolist() if j in source]
        if mine:
            block[np.asarray(mine) - first] = vectors.take(np.asarray([source[j] for j in mine]))
            block[np.asarray(mine) - first] += copy_noise / np.sqrt(dim) * rng.standard_normal((len(mine), dim),
                                                                                              dtype=np.float32)
        labels = [f"c{j % 1000}" for j in ids.tolist()]
        splits = np.where(ids % 50 == 0, "valid", "train")
        for split in ("train", "valid"):
            sel = np.flatnonzero(splits == split)
            paths = [f"{split}/{labels[s]}/img{ids[s]:08d}.jpg" for s in sel]
            table = store.to_table(paths, [labels[s] for s in sel], block[sel], meta)
            store.write_part(store.split_dir(out, split), table, prefix=f"shard0of1-{i:05d}")
        log.info("wrote %d of %d rows", first + len(block), rows)
    summary = {"settings": settings, "planted_pairs": len(copy), "write_s": round(time.perf_counter() - start, 1)}
    store.write_json(marker, summary)
    return summary
