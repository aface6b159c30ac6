"""The local runner: a DataLoader decodes on CPU workers, the encoder runs on the device, a thread writes parts."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipelines import store
from pipelines.data import (
    Batch,
    EncodedImageDataset,
    ImageFolderDataset,
    ImageRecord,
    collate,
    collate_encoded,
    worker_init,
)
from pipelines.siglip import Encoder, Preprocess

log = logging.getLogger(__name__)


@dataclass
class SplitStats:
    """What one split's run did; times in seconds (read = waiting on the loader, first_batch = its start-up)."""

    split: str
    listed: int = 0
    already_done: int = 0
    embedded: int = 0
    errors: int = 0
    read_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0
    wall_s: float = 0.0
    first_batch_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 2)}


def default_workers() -> int:
    """One decode worker per core, keeping one core for the main process."""
    return max(1, min(len(os.sched_getaffinity(0)) - 1, 32))


def make_loader(
    *,
    root: Path,
    records: list[ImageRecord],
    preprocess: Preprocess,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    device_decode: bool = False,
) -> torch.utils.data.DataLoader:
    """The job's DataLoader: `Batch`es of uint8 [B, 3, H, W] (pinned for CUDA), or `EncodedBatch`es.

    With `device_decode` the workers only read files (and decode what is not JPEG); `EncodedBatch.decoded`
    decodes the JPEGs on `device` in the main process.
    """
    dataset = (EncodedImageDataset if device_decode else ImageFolderDataset)(root, records, preprocess)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_encoded if device_decode else collate,
        pin_memory=device.type == "cuda" and not device_decode,
        worker_init_fn=worker_init if num_workers else None,
        # Each worker keeps two batches ready: enough to hide decode jitter, and with 16 workers x 256 images
        # x 442 KB that is already 3.6 GB of /dev/shm.
        prefetch_factor=2 if num_workers else None,
    )


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
    device_decode: bool = False,
) -> SplitStats:
    """Embed the records not yet in `output_dir/split`; errors go to its errors file.

    `device_decode`: decode JPEGs on the encoder's device in batches (nvjpeg on CUDA) instead of in the workers.
    """
    split_dir, todo, stats = start_split(output_dir, split, records, prefix)
    if not todo:
        return stats
    loader = make_loader(root=root, records=todo, preprocess=encoder.preprocess, batch_size=batch_size,
                         num_workers=num_workers, device=encoder.device, device_decode=device_decode)
    return write_split(
        split_dir, stats, len(todo), metadata=encoder.metadata(), rows_per_part=rows_per_part, prefix=prefix,
        progress=progress, fill=lambda writer, bar: _loop(loader, encoder, todo, writer, split_dir, stats, bar),
    )


def start_split(
    output_dir: Path, split: str, records: list[ImageRecord], prefix: str
) -> tuple[Path, list[ImageRecord], SplitStats]:
    """What a runner has left to do in `output_dir/split`: (split folder, records not yet done, stats so far).

    Clears this prefix's temporary files a killed run left; embedded and recorded-as-error paths are done.
    """
    split_dir = Path(output_dir) / split
    store.remove_stale_tmp(split_dir, prefix)
    done = store.done_paths(split_dir)
    todo = [r for r in records if r.path not in done]
    return split_dir, todo, SplitStats(split=split, listed=len(records), already_done=len(records) - len(todo))


def write_split(
    split_dir: Path, stats: SplitStats, total: int, *, metadata: dict[str, Any], rows_per_part: int, prefix: str,
    progress: bool, fill: Callable[[PartWriter, tqdm], None],
) -> SplitStats:
    """Run `fill(writer, bar)`, which adds `total` images' rows, then flush the parts; times go into `stats`."""
    writer = PartWriter(split_dir, metadata=metadata, rows_per_part=rows_per_part, prefix=prefix)
    bar = tqdm(total=total, desc=f"embed {stats.split}", unit="img", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        fill(writer, bar)
    finally:
        bar.close()
        writer.close()
    stats.write_s = writer.write_s
    stats.wall_s = time.perf_counter() - start
    return stats


def record_errors(split_dir: Path, failures: Iterable[tuple[str, str, str]], stats: SplitStats) -> None:
    """Log and append (path, label, reason) failures to the split's errors file; count them in `stats`."""
    errors = []
    for path, label, reason in failures:
        log.warning("skipped %s: %s", path, reason)
        errors.append({"path": path, "label": label, "error": reason})
    store.append_errors(split_dir, errors)
    stats.errors += len(errors)


def _loop(loader, encoder: Encoder, todo: list[ImageRecord], writer: PartWriter, split_dir: Path,
          stats: SplitStats, bar: tqdm) -> None:
    # One batch stays in flight: batch i+1 is copied (on a side stream) and queued on the device before
    # batch i's result is read back, so the device never waits on the host.
    copy_stream = torch.cuda.Stream(encoder.device) if encoder.device.type == "cuda" else None
    pending: tuple[Batch, torch.Tensor, Any] | None = None
    start = tick = time.perf_counter()
    for loaded in loader:
        stats.read_s += time.perf_counter() - tick
        if not stats.first_batch_s:
            stats.first_batch_s = time.perf_counter() - start
        tick = time.perf_counter()
        batch = loaded.decoded(encoder.preprocess, encoder.device)
        _record_failures(batch, todo, split_dir, stats)
        launched = _launch(encoder, batch, copy_stream) if batch.indices else None
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


def _launch(encoder: Encoder, batch: Batch, copy_stream: Any) -> tuple[Batch, torch.Tensor, Any]:
    out = encoder.embed_uint8(_to_device(batch.pixels, encoder.device, copy_stream))
    if out.device.type == "cuda":
        out = out.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return batch, out, event
    return batch, out, None


def _to_device(pixels: torch.Tensor, device: torch.device, copy_stream: Any) -> torch.Tensor:
    """Pinned uint8 [B, 3, H, W] -> `device`, copied on `copy_stream` so it overlaps the batch computing now."""
    if copy_stream is None or pixels.device.type == device.type:
        return pixels
    with torch.cuda.stream(copy_stream):
        moved = pixels.to(device, non_blocking=True)
    compute = torch.cuda.current_stream(device)
    compute.wait_stream(copy_stream)
    moved.record_stream(compute)  # the allocator must not reuse it before the compute stream is done with it
    return moved


def _finish(pending: tuple[Batch, torch.Tensor, Any], todo: list[ImageRecord], writer: PartWriter,
            stats: SplitStats) -> None:
    batch, out, event = pending
    if event is not None:
        event.synchronize()
    rows = [todo[i] for i in batch.indices]
    writer.add([r.path for r in rows], [r.label for r in rows], out.numpy())
    stats.embedded += len(rows)


def _record_failures(batch: Batch, todo: list[ImageRecord], split_dir: Path, stats: SplitStats) -> None:
    failures = ((todo[index].path, todo[index].label, reason) for index, reason in batch.failed)
    record_errors(split_dir, failures, stats)
