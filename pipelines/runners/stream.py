"""Shard sources on the local runner: each DataLoader worker claims whole units (a tar shard, a Parquet row group)
one after another and reads each from start to end, decoding as it goes; the encoder runs in the main process.

Resume: the rows already stored (or recorded as errors) are skipped as their unit is read, a unit stored whole
(its row count known, Parquet) or recorded whole is not read at all. A decode worker that dies or hangs costs
only the record it was decoding (checked by decoding that record alone in a forked child, as `local` does for
files); the loader then restarts on the units not finished, skipping every row already handled.
"""

from __future__ import annotations

import bisect
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines import data as data_stage
from pipelines import store
from pipelines.data import Batch, failure_reason, stack_pixels, worker_init
from pipelines.isolate import Crashed, Isolated
from pipelines.runners.split import Job, SplitStats, record_errors, write_split
from pipelines.siglip import Encoder
from pipelines.sources import Record, SourceDamage, Unit
from pipelines.sources.files import FileSource

log = logging.getLogger(__name__)

# A tracker slot's position packs (unit index, record ordinal) into one int64.
_ORDINAL_BITS = 32


@dataclass(frozen=True)
class Units:
    """A split's work from a shard source: the units to read (this shard's) and the source that reads them."""

    source: FileSource
    units: list[Unit]


class UnitDataset(torch.utils.data.IterableDataset):
    """Yields one item per record of the units it is given: {"index": path, "record", "pixels", "error"}, and
    {"finished": unit index} after each unit. Workers claim units through a shared counter (one at a time, so a
    slow shard holds up no other), and skip the paths in `skip` (per unit name)."""

    def __init__(self, source: FileSource, units: list[Unit], skip: dict[str, set[str]],
                 load: Callable[[bytes], Any], workers: int) -> None:
        self.source, self.units, self.skip, self.load = source, units, skip, load
        context = mp.get_context("fork")
        self.next_unit = context.Value("q", 0)
        # Per worker: [pid, packed (unit, ordinal) being decoded or -1, start in ms of CLOCK_MONOTONIC].
        self.tracker = context.RawArray("q", [-1] * (3 * max(1, workers)))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        slot = 3 * info.id if info is not None else None
        while True:
            with self.next_unit.get_lock():
                u = self.next_unit.value
                self.next_unit.value += 1
            if u >= len(self.units):
                return
            yield from self._unit(u, slot)
            yield {"finished": u}

    def _unit(self, u: int, slot: int | None) -> Iterator[dict[str, Any]]:
        unit = self.units[u]
        skip = self.skip.get(unit.name, set())
        try:
            for ordinal, record in enumerate(self.source.read(unit)):
                if record.path not in skip:
                    yield self.item(u, ordinal, record, slot)
        except SourceDamage as exc:
            reason = f"SourceDamage: {exc}"
            yield {"index": unit.id, "record": Record(unit.id, None, error=reason), "pixels": None, "error": reason}

    def item(self, u: int, ordinal: int, record: Record, slot: int | None) -> dict[str, Any]:
        """One record's item: its pixels decoded and resized, or the reason it has none."""
        if record.error is not None:
            return {"index": record.path, "record": record, "pixels": None, "error": record.error}
        if slot is not None:
            self.tracker[slot], self.tracker[slot + 2] = os.getpid(), int(time.monotonic() * 1000)
            self.tracker[slot + 1] = (u << _ORDINAL_BITS) | ordinal
        try:
            pixels, error = self.load(record.data), None
        except Exception as exc:  # noqa: BLE001 - DecodeError, a resize failure: a record, the worker lives
            pixels, error = None, failure_reason(exc)
        finally:
            if slot is not None:
                self.tracker[slot + 1] = -1
        return {"index": record.path, "record": record.without_data(), "pixels": pixels, "error": error}

    def record_at(self, position: int) -> Record:
        """The record a tracker position names, read again from its unit (a sequential read up to it)."""
        u, ordinal = position >> _ORDINAL_BITS, position & ((1 << _ORDINAL_BITS) - 1)
        for k, record in enumerate(self.source.read(self.units[u])):
            if k == ordinal:
                return record
        raise LookupError(f"record {ordinal} of {self.units[u].id} not found again")


def collate_stream(items: list[dict[str, Any]]) -> Batch:
    """Stack the decoded images; keep the records, the failures (path, record, reason) and the finished units."""
    finished = [item["finished"] for item in items if "finished" in item]
    rows = [item for item in items if "finished" not in item]
    good = [item for item in rows if item["error"] is None]
    return Batch([item["index"] for item in good], stack_pixels([item["pixels"] for item in good]),
                 [(item["index"], item["error"]) for item in rows if item["error"] is not None],
                 records=[item["record"] for item in good],
                 failed_records=[item["record"] for item in rows if item["error"] is not None],
                 finished=finished)


def skip_sets(units: list[Unit], done: set[str]) -> tuple[dict[str, set[str]], list[Unit]]:
    """(per unit name: the done paths under it; the units left to read): a unit recorded whole, or all of whose
    rows are done (when its row count is known), is not read again."""
    ordered = sorted(done)
    skip: dict[str, set[str]] = {}
    for name in {unit.name for unit in units}:
        lo, hi = bisect.bisect_left(ordered, name + "/"), bisect.bisect_left(ordered, name + "0")
        skip[name] = set(ordered[lo:hi])
    left = []
    for unit in units:
        if unit.id in done or unit.name in done:
            continue
        if unit.rows is not None:
            rows = {f"{unit.name}/{unit.first_row + k}" for k in range(unit.rows)}
            if rows <= skip[unit.name]:
                continue
        left.append(unit)
    return skip, left


def embed_units(encoder: Encoder, job: Job, *, split: str, work: Units, workers: int,
                drain: Callable[..., None]) -> SplitStats:
    """Embed the records of `work`'s units not yet in `job.output_dir`'s split; errors go to its errors file.

    `drain(loader, encoder, writer, split_dir, stats, bar)` is the local runner's batch loop (`WorkerDied`, with
    what it handled, when a worker dies)."""
    split_dir = store.split_dir(job.output_dir, split)
    store.remove_stale_tmp(split_dir, job.prefix)
    done = store.done_paths(split_dir)
    skip, todo = skip_sets(work.units, done)
    # This job's share only: other shards' rows in the same folder are not "done before" here.
    stats = SplitStats(split=split, already_done=sum(len(paths) for paths in skip.values()))
    known = [u.rows for u in todo]
    total = None if None in known else sum(known) - sum(len(skip[u.name]) for u in todo)
    load = _loader_fn(encoder, job)

    def fill(writer, bar) -> None:
        _embed_all(encoder, work.source, todo, skip, load, job, workers, writer, split_dir, stats, bar, drain)

    write_split(split_dir, stats, total, metadata=encoder.metadata(), rows_per_part=job.rows_per_part,
                prefix=job.prefix, progress=job.progress, fill=fill, columns=job.columns, label_nullable=True)
    stats.listed = stats.already_done + stats.embedded + stats.errors
    return stats


def _loader_fn(encoder: Encoder, job: Job) -> Callable[[bytes], Any]:
    preprocess, max_pixels = encoder.preprocess, job.max_pixels

    def load(data: bytes) -> Any:
        # `data.decode` looked up at each call, as the folder datasets' `load` does: one decoder for every source.
        return preprocess.resize(data_stage.decode(data, max_pixels=max_pixels))

    return load


def _embed_all(encoder, source, todo, skip, load, job, workers, writer, split_dir: Path, stats: SplitStats, bar,
               drain) -> None:
    from pipelines.runners.local import HANG_TIMEOUT_S, WorkerDied, count_unexplained

    unexplained = 0
    while todo:
        dataset = UnitDataset(source, todo, skip, load, workers)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=job.batch_size, num_workers=max(1, workers), collate_fn=collate_stream,
            worker_init_fn=worker_init, prefetch_factor=2, pin_memory=encoder.device.type == "cuda")
        try:
            drain(loader, encoder, writer, split_dir, stats, bar)
            return
        except WorkerDied as exc:
            died = exc
        log.warning("%s; looking for the record that caused it", died)
        culprits = _culprits(dataset, died.pids, HANG_TIMEOUT_S)
        record_errors(split_dir, ((r.path, r.label, reason) for r, reason in culprits), stats)
        bar.update(len(culprits))
        unexplained = count_unexplained(unexplained, found=bool(culprits), died=died, what="record")
        finished = {todo[u].id for _, u in (h for h in died.handled if isinstance(h, tuple))}
        paths = {h for h in died.handled if isinstance(h, str)} | {r.path for r, _ in culprits}
        for unit in todo:
            skip.setdefault(unit.name, set()).update(p for p in paths if p.startswith(unit.name + "/"))
        todo = [u for u in todo if u.id not in finished]


def _culprits(dataset: UnitDataset, pids: set[int], timeout_s: float) -> list[tuple[Record, str]]:
    """The records the dead workers were decoding that crash (or hang) a decoder alone: (record, reason)."""
    tracker = list(dataset.tracker)
    positions = [tracker[w + 1] for w in range(0, len(tracker), 3)
                 if tracker[w + 1] >= 0 and (not pids or tracker[w] in pids)]
    found = []
    for position in positions:
        record = dataset.record_at(position)
        with Isolated(_LoadAlone(dataset.load, record.data), start_method="fork", timeout_s=timeout_s) as child:
            outcome = child.map([0])[0]
        if isinstance(outcome, Crashed):
            found.append((record.without_data(), f"DecodeError: {outcome.reason}"))
    return found


@dataclass(frozen=True)
class _LoadAlone:
    load: Callable[[bytes], Any]
    data: bytes

    def __call__(self, _: int) -> bool:
        try:
            self.load(self.data)
        except Exception:  # noqa: BLE001 - an ordinary failure is not a crash
            pass
        return True
