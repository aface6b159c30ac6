"""(d) The Parquet writer alone, on random embeddings of the model's width."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import store
from pipelines.bench import SPLIT
from pipelines.store import PartWriter


@dataclass(frozen=True)
class WriterSettings:
    """`rows` random embeddings added `batch_size` at a time, parts of `rows_per_part`."""

    rows: int
    batch_size: int
    rows_per_part: int


def bench_writer(*, out_dir: Path, dim: int, metadata: dict[str, Any], settings: WriterSettings) -> dict[str, Any]:
    """Rows/s and MB/s of `PartWriter` on random float32 [rows, dim] embeddings, from the first add to close."""
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((settings.rows, dim), dtype=np.float32)
    paths = [f"{SPLIT}/class{i % 10:03d}/image-{i:08d}.jpg" for i in range(settings.rows)]
    labels = [p.split("/")[1] for p in paths]
    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    writer = PartWriter(store.split_dir(out_dir, SPLIT), metadata=metadata, rows_per_part=settings.rows_per_part, prefix="bench")
    for i in range(0, settings.rows, settings.batch_size):
        j = i + settings.batch_size
        writer.add(paths[i:j], labels[i:j], embeddings[i:j])
    writer.close()
    wall = time.perf_counter() - start
    return {"rows": settings.rows, "dim": dim, "rows_per_s": settings.rows / wall,
            "mb_per_s": embeddings.nbytes / 1e6 / wall, "parts": len(store.parts(store.split_dir(out_dir, SPLIT))),
            "bytes_on_disk": sum(p.stat().st_size for p in store.parts(store.split_dir(out_dir, SPLIT)))}
