"""The local runner: a DataLoader decodes on CPU workers, the encoder runs on the device, a thread writes parts.

`run` is the runner (`conf/runner/local.yaml`); `embed_split` embeds one split with an encoder already loaded.
A decode worker that dies or hangs costs only its file (`_embed_all`, docs/robustness.md).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipelines.data import (
    DEFAULT_MAX_PIXELS,
    Batch,
    EncodedImageDataset,
    ImageFolderDataset,
    ImageRecord,
    collate,
    collate_encoded,
    decoded,
    worker_init,
)
from pipelines.errors import UserError
from pipelines.isolate import Crashed, Isolated
from pipelines.runners.split import Job, SplitStats, record_errors, start_split, write_split
from pipelines.siglip import Encoder, Preprocess
from pipelines.store import PartWriter

log = logging.getLogger(__name__)


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
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> torch.utils.data.DataLoader:
    """The job's DataLoader: `Batch`es of uint8 [B, 3, H, W] (pinned for CUDA), or `EncodedBatch`es.

    With `device_decode` the workers only read files (and decode what is not JPEG); `EncodedBatch.decoded`
    decodes the JPEGs on `device` in the main process. With workers, the dataset's `tracker` records which
    file each worker is reading (`embed_split` uses it after a worker dies); without, the items are read in
    one forked child process (`InChildDataset`), so that a decoder crash cannot take this process down.
    """
    dataset = (EncodedImageDataset if device_decode else ImageFolderDataset)(root, records, preprocess,
                                                                             max_pixels=max_pixels)
    if num_workers:
        dataset.tracker = mp.get_context("fork").RawArray("q", [-1] * (3 * num_workers))
    else:
        dataset = InChildDataset(dataset)
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


def run(job: Job, splits: Mapping[str, list[ImageRecord]], *, device_decode: bool) -> list[SplitStats]:
    """The local runner: load `job.encoder` here (compiled if `job.compile`), then embed each split in turn.

    `device_decode`: decode JPEGs on the encoder's device in batches (nvjpeg on CUDA) instead of in the workers.
    """
    from pipelines.runners.stream import Units, embed_units

    encoder = job.encoder.load()
    if device_decode and not isinstance(encoder.preprocess, Preprocess):
        raise UserError("runner.device_decode=true decodes into fixed-size images; a NaFlex checkpoint keeps each "
                        "image's aspect ratio: run it with runner.device_decode=false")
    if encoder.device.type == "cpu" and job.threads is not None:
        torch.set_num_threads(job.threads)
    if job.compile:
        encoder.compile(batch_size=job.batch_size)
    workers = default_workers() if job.num_workers == "auto" else int(job.num_workers)
    results = []
    for split, work in splits.items():
        if isinstance(work, Units):  # a shard source: workers read whole units (device_decode: files only)
            results.append(embed_units(encoder, job, split=split, work=work, workers=workers, drain=_drain_units))
        else:
            results.append(embed_split(encoder, job, split=split, records=work, device_decode=device_decode))
    return results


def _drain_units(loader, encoder: Encoder, writer: PartWriter, split_dir: Path, stats: SplitStats,
                 bar: tqdm) -> None:
    """The batch loop over a shard source's loader, whose batches carry their records."""
    _loop(loader, encoder, None, writer, split_dir, stats, bar)


def embed_split(encoder: Encoder, job: Job, *, split: str, records: list[ImageRecord],
                device_decode: bool) -> SplitStats:
    """Embed the records not yet in `job.output_dir`'s split with `encoder` (loaded from `job.encoder`); errors
    go to the split's errors file.

    A decode worker that dies (a signal, an abort) costs only the file that killed it: it is recorded as
    "decoder crashed (signal N)" and the loader restarts on the files not yet done (`_embed_all`).
    """
    split_dir, todo, stats = start_split(job.output_dir, split, records, job.prefix)
    if not todo:
        return stats
    workers = default_workers() if job.num_workers == "auto" else int(job.num_workers)

    def loader_for(records: list[ImageRecord]) -> torch.utils.data.DataLoader:
        return make_loader(root=job.root, records=records, preprocess=encoder.preprocess, batch_size=job.batch_size,
                           num_workers=workers, device=encoder.device, device_decode=device_decode,
                           max_pixels=job.max_pixels)

    return write_split(
        split_dir, stats, len(todo), metadata=encoder.metadata(), rows_per_part=job.rows_per_part,
        prefix=job.prefix, progress=job.progress,
        fill=lambda writer, bar: _embed_all(loader_for, encoder, todo, writer, split_dir, stats, bar),
    )


# Worker deaths in a row without a file to blame (decoding each suspect alone does not crash) before the job
# gives up: a host killing workers (memory) rather than a file killing its decoder.
MAX_UNEXPLAINED_DEATHS = 3
# Seconds one file may take to read and decode before it counts as hanging its decoder: a worker busy with one
# file for longer is killed (then found like a crash), and a suspect decoded alone is given as long.
HANG_TIMEOUT_S = 120.0
# Torch's message for a dead worker names its pid(s): "DataLoader worker (pid 123) is killed by signal: ..."
# or "DataLoader worker (pid(s) 123, 456) exited unexpectedly".
_DEAD_WORKER = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")


class WorkerDied(Exception):
    """A DataLoader worker died; `handled` holds the positions of the records already embedded or recorded."""

    def __init__(self, message: str, pids: set[int], handled: set[int]) -> None:
        super().__init__(message)
        self.pids, self.handled = pids, handled


class DecodeWorkersDiedError(RuntimeError):
    """Decode workers keep dying and no file makes a decoder crash on its own."""


def _embed_all(loader_for: Callable[[list[ImageRecord]], Any], encoder: Encoder, todo: list[ImageRecord],
               writer: PartWriter, split_dir: Path, stats: SplitStats, bar: tqdm) -> None:
    """Run the loop over `todo`; after a worker death, record the file(s) that crash a decoder and go on.

    Suspects are the files the dead workers were reading (the dataset's tracker); each is decoded alone in a
    disposable forked process, exactly as the worker did, and the ones that crash it too are recorded with
    that process's exit ("decoder crashed (signal 11)"). When none does, every file of the batches that were
    in flight is tried the same way. The loader then restarts on the records neither done nor recorded.
    """
    records, unexplained = list(todo), 0
    while records:
        loader = loader_for(records)
        try:
            _loop(loader, encoder, records, writer, split_dir, stats, bar)
            return
        except WorkerDied as exc:
            died = exc
        log.warning("%s; looking for the file that caused it", died)
        culprits = _find_culprits(loader, records, died)
        failures = [(records[k].path, records[k].label, f"DecodeError: {reason}") for k, reason in culprits.items()]
        record_errors(split_dir, failures, stats)
        bar.update(len(failures))
        unexplained = count_unexplained(unexplained, found=bool(culprits), died=died, what="file")
        records = [r for k, r in enumerate(records) if k not in died.handled and k not in culprits]


def count_unexplained(unexplained: int, *, found: bool, died: WorkerDied, what: str) -> int:
    """Worker deaths in a row without a `what` (file, record) to blame; DecodeWorkersDiedError at the limit."""
    unexplained = 0 if found else unexplained + 1
    if unexplained >= MAX_UNEXPLAINED_DEATHS:
        raise DecodeWorkersDiedError(
            f"decode workers died {unexplained} times in a row and no {what} crashes a decoder on its own "
            f"(last: {died}); the host may be killing them (out of memory?): try fewer num_workers")
    return unexplained


def _find_culprits(loader: Any, records: list[ImageRecord], died: WorkerDied) -> dict[int, str]:
    """Positions in `records` of the files that crash a decoder alone -> the reason ('decoder crashed (signal 11)')."""
    dataset = loader.dataset
    tracker = list(dataset.tracker) if dataset.tracker is not None else []
    suspects = [tracker[w + 1] for w in range(0, len(tracker), 3)
                if tracker[w + 1] >= 0 and (not died.pids or tracker[w] in died.pids)]
    culprits = _crashing(dataset, [k for k in suspects if k not in died.handled])
    if culprits:
        return culprits
    # Nothing marked crashes alone: try every file of the batches that may have been in flight.
    in_flight = (len(died.handled) // loader.batch_size + 1 + loader.num_workers * (loader.prefetch_factor or 1))
    limit = min(len(records), in_flight * loader.batch_size)
    return _crashing(dataset, [k for k in range(limit) if k not in died.handled and k not in suspects])


def _crashing(dataset: ImageFolderDataset, positions: list[int]) -> dict[int, str]:
    """Decode each position alone in a forked child (as the worker would); those that crash it -> reason."""
    if not positions:
        return {}
    tracker, dataset.tracker = dataset.tracker, None
    try:
        with Isolated(_ItemAsNumpy(dataset), start_method="fork", timeout_s=HANG_TIMEOUT_S) as child:
            outcomes = child.map(positions)
    finally:
        dataset.tracker = tracker
    return {k: outcome.reason for k, outcome in zip(positions, outcomes) if isinstance(outcome, Crashed)}


class InChildDataset(torch.utils.data.Dataset):
    """A dataset whose items are read in one persistent forked child: for a loader without workers, so that
    a decoder crash costs its file ("decoder crashed (signal 11)") instead of the job."""

    def __init__(self, dataset: ImageFolderDataset) -> None:
        self.dataset = dataset
        self.tracker = None
        self._child = Isolated(_ItemAsNumpy(dataset), start_method="fork")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        items = []
        for i, outcome in zip(indices, self._child.map(list(indices))):
            if isinstance(outcome, Crashed):
                items.append({"index": i, "pixels": None, "error": f"DecodeError: {outcome.reason}"})
            elif not outcome[0]:
                items.append({"index": i, "pixels": None, "error": outcome[1]})
            else:
                item = outcome[1]
                if item["pixels"] is not None:
                    item["pixels"] = _as_torch(item["pixels"])
                items.append(item)
        return items

    def __del__(self) -> None:
        self._child.close()


@dataclass(frozen=True)
class _ItemAsNumpy:
    """dataset[i] with its pixels as numpy (pickled through the pipe, where a tensor would go through /dev/shm)."""

    dataset: ImageFolderDataset

    def __call__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if item["pixels"] is not None:
            pixels = item["pixels"]  # a tensor, or a NaFlex preprocessing's dict of them
            item["pixels"] = {k: v.numpy() for k, v in pixels.items()} if isinstance(pixels, dict) else pixels.numpy()
        return item


def _as_torch(pixels: Any) -> Any:
    """`_ItemAsNumpy`'s pixels back as tensors (a dict key by key)."""
    if isinstance(pixels, dict):
        return {key: torch.from_numpy(value) for key, value in pixels.items()}
    return torch.from_numpy(pixels)


def _loop(loader, encoder: Encoder, records: list[ImageRecord], writer: PartWriter, split_dir: Path,
          stats: SplitStats, bar: tqdm) -> None:
    """Embed what `loader` yields; `WorkerDied` (with the positions handled so far) when a worker dies."""
    # One batch stays in flight: batch i+1 is copied (on a side stream) and queued on the device before
    # batch i's result is read back, so the device never waits on the host.
    copy_stream = torch.cuda.Stream(encoder.device) if encoder.device.type == "cuda" else None
    handled: set[int] = set()
    iterator = iter(loader)
    _no_async_worker_errors()
    with _HangWatch(getattr(loader.dataset, "tracker", None)):
        _drain(iterator, encoder, records, writer, split_dir, stats, bar, copy_stream, handled)


def _drain(iterator, encoder: Encoder, records: list[ImageRecord], writer: PartWriter, split_dir: Path,
           stats: SplitStats, bar: tqdm, copy_stream: Any, handled: set[int]) -> None:
    pending: tuple[Batch, torch.Tensor, Any] | None = None
    start = tick = time.perf_counter()
    while True:
        try:
            loaded = next(iterator)
        except StopIteration:
            break
        except (RuntimeError, EOFError, ConnectionError) as exc:
            pids = _dead_workers(iterator, exc)
            if not pids:
                raise
            if pending is not None:
                _finish(pending, records, writer, stats)
            getattr(iterator, "_shutdown_workers", lambda: None)()  # the others stop now, not at collection
            message = " ".join(str(exc).split()) if isinstance(exc, RuntimeError) else \
                f"DataLoader worker (pid(s) {', '.join(map(str, sorted(pids)))}) died"
            raise WorkerDied(message, pids, handled) from exc
        now = time.perf_counter()
        stats.read_s += now - tick
        if not stats.first_batch_s:  # the same clock reading: the first wait is part of read_s
            stats.first_batch_s = now - start
        tick = time.perf_counter()
        batch = decoded(loaded, encoder.preprocess, encoder.device)  # device_decode's JPEGs: on the device
        _record_failures(batch, records, split_dir, stats)
        launched = _launch(encoder, batch, copy_stream) if batch.indices else None
        if pending is not None:
            _finish(pending, records, writer, stats)
        pending = launched
        handled.update(batch.indices)
        handled.update(index for index, _ in batch.failed)
        handled.update(("finished", u) for u in batch.finished)
        bar.update(len(batch.indices) + len(batch.failed))
        stats.model_s += time.perf_counter() - tick
        tick = time.perf_counter()
    if pending is not None:
        tick = time.perf_counter()
        _finish(pending, records, writer, stats)
        stats.model_s += time.perf_counter() - tick


class _HangWatch:
    """A thread that kills a DataLoader worker busy with one file for more than `HANG_TIMEOUT_S`.

    The loader then reports a dead worker, and the file is found (and tried alone, with the same limit) as a
    crash's is: a hang costs its file, not the job. `tracker` holds per worker [pid, index, start in ms].
    """

    def __init__(self, tracker: Any) -> None:
        self.tracker, self._stop = tracker, threading.Event()
        self._thread = threading.Thread(target=self._run, name="hang-watch", daemon=True)

    def __enter__(self) -> _HangWatch:  # noqa: PYI034 - Self needs Python 3.11
        if self.tracker is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        limit_ms = HANG_TIMEOUT_S * 1000
        killed: set[int] = set()  # once each: the slot stays busy (its file the suspect) until the loader notices
        while not self._stop.wait(min(1.0, HANG_TIMEOUT_S / 4)):
            now_ms = time.monotonic() * 1000  # CLOCK_MONOTONIC: one clock for all processes of the host
            for w in range(0, len(self.tracker), 3):
                pid, index, started = self.tracker[w], self.tracker[w + 1], self.tracker[w + 2]
                if index >= 0 and now_ms - started > limit_ms and pid not in killed:
                    log.warning("a decode worker spent more than %g s on one file; stopping it", HANG_TIMEOUT_S)
                    killed.add(pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


def _dead_workers(iterator: Any, exc: BaseException, *, wait_s: float = 30.0) -> set[int]:
    """The pids of the loader's dead workers if `exc` comes from one dying, else an empty set.

    The loader says so itself ("DataLoader worker (pid 123) ... exited"); but a worker that dies just after
    queueing a batch also fails that batch's transfer (its tensors' file descriptors are fetched from the
    worker): an EOFError or a refused connection, raised while the worker may still be exiting.
    """
    if isinstance(exc, RuntimeError):
        match = _DEAD_WORKER.search(str(exc))
        return {int(p) for p in match.group(1).replace(",", " ").split()} if match else set()
    workers = list(getattr(iterator, "_workers", []))
    deadline = time.monotonic() + wait_s
    while True:
        dead = {w.pid for w in workers if not w.is_alive()}
        if dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.1)


def _no_async_worker_errors() -> None:
    """Let a dead worker surface only from `next(iterator)`, never in the middle of writing rows.

    The DataLoader's SIGCHLD handler raises its "worker killed" error from wherever the main thread is;
    without it the loader still notices the death at its next status check (every few seconds) and raises
    from `next`. Installed once per process by the first loader, so resetting it once is enough.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _launch(encoder: Encoder, batch: Batch, copy_stream: Any) -> tuple[Batch, torch.Tensor, Any]:
    out = encoder.embed_uint8(_to_device(batch.pixels, encoder.device, copy_stream))
    if out.device.type == "cuda":
        out = out.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return batch, out, event
    return batch, out, None


def _to_device(pixels: Any, device: torch.device, copy_stream: Any) -> Any:
    """Pinned uint8 [B, 3, H, W] (or a dict of them) -> `device`, copied on `copy_stream` so it overlaps the batch
    computing now."""
    if isinstance(pixels, dict):
        return {key: _to_device(value, device, copy_stream) for key, value in pixels.items()}
    if copy_stream is None or pixels.device.type == device.type:
        return pixels
    with torch.cuda.stream(copy_stream):
        moved = pixels.to(device, non_blocking=True)
    compute = torch.cuda.current_stream(device)
    compute.wait_stream(copy_stream)
    moved.record_stream(compute)  # the allocator must not reuse it before the compute stream is done with it
    return moved


def _finish(pending: tuple[Batch, torch.Tensor, Any], todo: list[ImageRecord] | None, writer: PartWriter,
            stats: SplitStats) -> None:
    batch, out, event = pending
    if event is not None:
        event.synchronize()
    rows = batch.records if batch.records is not None else [todo[i] for i in batch.indices]
    writer.add([r.path for r in rows], [r.label for r in rows], out.numpy(),
               extra=[getattr(r, "extra", None) or {} for r in rows] if writer.columns else None)
    stats.embedded += len(rows)


def _record_failures(batch: Batch, todo: list[ImageRecord] | None, split_dir: Path, stats: SplitStats) -> None:
    rows = batch.failed_records if batch.failed_records is not None else [todo[i] for i, _ in batch.failed]
    failures = ((row.path, row.label, reason) for row, (_, reason) in zip(rows, batch.failed))
    record_errors(split_dir, failures, stats)
