"""The local runner: a DataLoader decodes on CPU workers, the encoder runs on the device, a thread writes parts."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipelines import store
from pipelines.data import Batch, ImageFolderDataset, ImageRecord, collate, worker_init
from pipelines.siglip import Encoder

log = logging.getLogger(__name__)


@dataclass
class SplitStats:
    """What one split's run did; times in seconds (read = waiting on the loader)."""

    split: str
    listed: int = 0
    already_done: int = 0
    embedded: int = 0
    errors: int = 0
    read_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0
    wall_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 2)}


def default_workers() -> int:
    """One decode worker per core, keeping one core for the main process."""
    return max(1, min(len(os.sched_getaffinity(0)) - 1, 32))


class PartWriter:
    """Buffers rows and writes parts of `rows_per_part` in a background thread; `close` flushes."""

    def __init__(self, split_dir: Path, *, metadata: dict[str, Any], rows_per_part: int, prefix: str) -> None:
        self.split_dir, self.metadata, self.rows_per_part, self.prefix = split_dir, metadata, rows_per_part, prefix
        self.write_s = 0.0
        self._buffer: list[tuple[list[str], list[str], np.ndarray]] = []
        self._rows = 0
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="parquet-writer", daemon=True)
        self._thread.start()

    def add(self, paths: list[str], labels: list[str], embeddings: np.ndarray) -> None:
        """Queue rows: paths, labels [N] and float32 embeddings [N, D]."""
        if self._error is not None:
            raise RuntimeError("Parquet writer failed") from self._error
        self._buffer.append((paths, labels, embeddings))
        self._rows += len(paths)
        if self._rows >= self.rows_per_part:
            self._flush()

    def close(self) -> None:
        """Write what is buffered, wait for the thread, re-raise its failure."""
        self._flush()
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise RuntimeError("Parquet writer failed") from self._error

    def _flush(self) -> None:
        if self._rows:
            self._queue.put(self._buffer)
            self._buffer, self._rows = [], 0

    def _run(self) -> None:
        while (chunks := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                start = time.perf_counter()
                table = store.to_table(
                    [p for c in chunks for p in c[0]],
                    [label for c in chunks for label in c[1]],
                    np.concatenate([c[2] for c in chunks]),
                    self.metadata,
                )
                store.write_part(self.split_dir, table, prefix=self.prefix)
                self.write_s += time.perf_counter() - start
            except BaseException as exc:  # surfaced by add/close in the main thread
                self._error = exc


def embed_split(
    *,
    encoder: Encoder,
    root: Path,
    split: str,
    records: list[ImageRecord],
    output_dir: Path,
    batch_size: int,
    num_workers: int,
    rows_per_part: int,
    prefix: str,
    progress: bool = True,
) -> SplitStats:
    """Embed the records not yet in `output_dir/split`; errors go to its errors file."""
    split_dir = Path(output_dir) / split
    store.remove_stale_tmp(split_dir, prefix)
    done = store.done_paths(split_dir)
    todo = [r for r in records if r.path not in done]
    stats = SplitStats(split=split, listed=len(records), already_done=len(records) - len(todo))
    if not todo:
        return stats
    loader = torch.utils.data.DataLoader(
        ImageFolderDataset(root, todo, encoder.preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=encoder.device.type == "cuda",
        worker_init_fn=worker_init if num_workers else None,
        prefetch_factor=4 if num_workers else None,
    )
    writer = PartWriter(split_dir, metadata=encoder.metadata(), rows_per_part=rows_per_part, prefix=prefix)
    bar = tqdm(total=len(todo), desc=f"embed {split}", unit="img", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        _loop(loader, encoder, todo, writer, split_dir, stats, bar)
    finally:
        bar.close()
        writer.close()
    stats.write_s = writer.write_s
    stats.wall_s = time.perf_counter() - start
    return stats


def _loop(loader, encoder: Encoder, todo: list[ImageRecord], writer: PartWriter, split_dir: Path,
          stats: SplitStats, bar: tqdm) -> None:
    # One batch stays in flight: batch i+1 is queued on the device before batch i's result is read back.
    pending: tuple[Batch, torch.Tensor, Any] | None = None
    tick = time.perf_counter()
    for batch in loader:
        stats.read_s += time.perf_counter() - tick
        tick = time.perf_counter()
        _record_failures(batch, todo, split_dir, stats)
        launched = _launch(encoder, batch) if batch.indices else None
        if pending is not None:
            _finish(pending, todo, writer, stats)
        pending = launched
        bar.update(len(batch.indices) + len(batch.failed))
        stats.model_s += time.perf_counter() - tick
        tick = time.perf_counter()
    if pending is not None:
        tick = time.perf_counter()
        _finish(pending, todo, writer, stats)
        stats.model_s += time.perf_counter() - tick


def _launch(encoder: Encoder, batch: Batch) -> tuple[Batch, torch.Tensor, Any]:
    out = encoder.embed_uint8(batch.pixels)
    if out.device.type == "cuda":
        out = out.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return batch, out, event
    return batch, out, None


def _finish(pending: tuple[Batch, torch.Tensor, Any], todo: list[ImageRecord], writer: PartWriter,
            stats: SplitStats) -> None:
    batch, out, event = pending
    if event is not None:
        event.synchronize()
    rows = [todo[i] for i in batch.indices]
    writer.add([r.path for r in rows], [r.label for r in rows], out.numpy())
    stats.embedded += len(rows)


def _record_failures(batch: Batch, todo: list[ImageRecord], split_dir: Path, stats: SplitStats) -> None:
    errors = []
    for index, reason in batch.failed:
        record = todo[index]
        log.warning("skipped %s: %s", record.path, reason)
        errors.append({"path": record.path, "label": record.label, "error": reason})
    store.append_errors(split_dir, errors)
    stats.errors += len(errors)
