"""The Ray runner: Ray Data decodes on CPU tasks, an actor pool runs the encoder, the driver writes parts.

A drop-in for `pipelines.runners.local.run` (the same `Job`, plus the Ray settings that `conf/runner/ray.yaml`
binds). It reuses the core stages unchanged: the same records, `data.read_file`, `decode` and `Preprocess.resize`
in the CPU tasks (in a child process each, `IsolatedDecoder`, so a crashing file is an error record, not a dead
task), `EncoderSpec.load` + `Encoder.embed_uint8` in the actors, and `store.PartWriter` and the errors file on
the driver. All splits go through one pipeline, so the actors start once per job. The driver never loads the
model's weights: it reads the checkpoint's preprocessing and metadata. Every part is written by the driver, so
parts stay atomic and a rerun resumes from `store.done_paths` exactly as after a local run (docs/scale-out.md).
Ray is an optional extra (`.[ray]`), so it is imported inside the functions that use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from pipelines import store
from pipelines.data import ImageRecord, failure_reason, read_file
from pipelines.errors import UserError
from pipelines.isolate import IsolatedDecoder
from pipelines.runners.split import Job, SplitStats, record_errors, start_split
from pipelines.siglip import EncoderSpec, Preprocess
from pipelines.store import PartWriter

log = logging.getLogger(__name__)

# Rows of the listing per decode task: large enough to keep per-task overhead small on big datasets, while
# a small dataset is still cut into several tasks so that every CPU decodes.
MAX_ROWS_PER_TASK = 1024
TASKS_PER_CPU = 4
# Memory a decode task asks Ray for: a worker process with torch loaded (~0.5 GB resident) plus a batch of
# sources and resized copies (sources are usually larger than the model's input).
DECODE_BASE_MEMORY = 512 * 2**20
DECODE_MEMORY_FACTOR = 4
WORKER_NICENESS = 0  # a local Ray's workers: the job's own priority (Ray's default is 15)


def run(
    job: Job,
    splits: Mapping[str, list[ImageRecord]],
    *,
    address: str | None,
    num_actors: int | str,
    num_gpus_per_actor: float | str,
    num_cpus_per_actor: float,
    num_cpus: int | None,
    object_store_memory: int | None,
    log_to_driver: bool,
) -> list[SplitStats]:
    """The Ray runner: embed each split's records not yet in `job.output_dir` on Ray; errors go to its errors file.

    All splits go through one Ray Data pipeline, so the actors load the model once per job, not once per split.
    The decode tasks decode in a child process of their worker (`IsolatedDecoder`), so a file that crashes the
    decoder is an error record ("decoder crashed (signal 11)"), not a dead task. `job.num_workers` caps how many
    decode tasks run at once ('auto': every CPU of the cluster the actors leave free). `address`, `num_cpus`,
    `object_store_memory`, `log_to_driver` go to `connect`; the actors' settings to `resolve_actors`.
    """
    check_workers(job.num_workers)
    preprocess, metadata = job.encoder.preprocess(), job.encoder.metadata()
    if not isinstance(preprocess, Preprocess):
        raise UserError(f"{job.encoder.name_or_path} is a NaFlex checkpoint (each image at its own aspect ratio); "
                        "runner=ray decodes into fixed-size images: embed it with runner=local")
    parts = {split: _start(job, split, records) for split, records in splits.items()}
    todo = {split: part for split, part in parts.items() if part.work}
    if todo:
        connect(address=address, num_cpus=num_cpus, object_store_memory=object_store_memory,
                log_to_driver=log_to_driver)
        gpus, actors = resolve_actors(num_actors=num_actors, num_gpus_per_actor=num_gpus_per_actor,
                                      num_cpus_per_actor=num_cpus_per_actor)
        for split, part in todo.items():
            log.info("%s: %d %s on Ray", split, len(part.work),
                     "shard unit(s)" if isinstance(part.work, UnitWork) else "images")
        log.info("%d encoder actor(s) with %s GPU and %s CPU each", actors, gpus, num_cpus_per_actor)
        dataset = build_dataset({split: part.work for split, part in todo.items()}, job=job, preprocess=preprocess,
                                metadata=metadata, num_actors=actors, num_gpus_per_actor=gpus,
                                num_cpus_per_actor=num_cpus_per_actor)
        _write_splits(dataset, todo, job=job, metadata=metadata)
    for part in parts.values():
        if isinstance(part.work, UnitWork):
            part.stats.listed = part.stats.already_done + part.stats.embedded + part.stats.errors
    return [part.stats for part in parts.values()]


@dataclass
class _Split:
    """One split's place in the job: its folder, its stats so far, and what is left to embed."""

    dir: Path
    stats: SplitStats
    work: list[ImageRecord] | UnitWork


def _start(job: Job, split: str, records: Any) -> _Split:
    """What is left of `split` (`start_split`'s resume state; for a shard source, the units not done)."""
    from pipelines.runners.stream import Units, skip_sets

    if not isinstance(records, Units):
        split_dir, todo, stats = start_split(job.output_dir, split, records, job.prefix)
        return _Split(split_dir, stats, todo)
    split_dir = store.split_dir(job.output_dir, split)
    store.remove_stale_tmp(split_dir, job.prefix)
    done = store.done_paths(split_dir)
    skip, units = skip_sets(records.units, done)
    stats = SplitStats(split=split, already_done=sum(len(paths) for paths in skip.values()))  # this job's share
    return _Split(split_dir, stats, UnitWork(records.source, units, skip))


@dataclass(frozen=True)
class UnitWork:
    """A shard source's units left to read, and per unit name the paths to skip (done before)."""

    source: Any
    units: list
    skip: dict[str, set[str]]

    def __len__(self) -> int:
        return len(self.units)

    @property
    def total(self) -> int | None:
        known = [u.rows for u in self.units]
        return None if None in known else sum(known) - sum(len(self.skip.get(u.name, ())) for u in self.units)


def decode_tasks(num_workers: int | str) -> int | None:
    """The most decode tasks at once: `num_workers`, or None ('auto': as many as the free CPUs allow)."""
    return None if num_workers == "auto" else int(num_workers)


def check_workers(num_workers: int | str) -> None:
    """Refuse `num_workers=0` (UserError): a Ray job decodes in Ray tasks, at least one at a time."""
    if num_workers != "auto" and int(num_workers) < 1:
        raise UserError(f"num_workers={num_workers}: runner=ray decodes in Ray tasks; expected auto or a whole "
                        "number of at least 1 (the most decode tasks at once)")


def connect(*, address: str | None, num_cpus: int | None, object_store_memory: int | None,
            log_to_driver: bool) -> None:
    """Join the cluster at `address` (else $RAY_ADDRESS); without either, start a local Ray for this process.

    A local Ray stops when the process exits (Ray's own exit hook); `num_cpus` and `object_store_memory`
    (bytes) size it, and its workers run at this process's priority; all three are the cluster's own when
    joining. An already connected process is left as it is.
    """
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            # "local": never attach to whatever cluster this machine last started by accident.
            # Ray starts its workers at nice 15 unless told otherwise: on a host doing anything else, the decode
            # tasks and the actors, this job's whole work, would get the CPU last (the local runner's get it at 0).
            ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
                     include_dashboard=False, log_to_driver=log_to_driver,
                     _system_config={"worker_niceness": WORKER_NICENESS})
    # The job draws its own progress bar, as the local runner does.
    DataContext.get_current().enable_progress_bars = False


def resolve_actors(
    *, num_actors: int | str, num_gpus_per_actor: float | str, num_cpus_per_actor: float
) -> tuple[float, int]:
    """(GPUs per actor, actor count); 'auto' = one GPU per actor and one actor per GPU of the cluster.

    A cluster without GPUs gets CPU actors: as many as use half of its CPUs, the other half decoding.
    """
    import ray

    resources = ray.cluster_resources()
    cluster_gpus = resources.get("GPU", 0.0)
    gpus = (1.0 if cluster_gpus > 0 else 0.0) if num_gpus_per_actor == "auto" else float(num_gpus_per_actor)
    if gpus > cluster_gpus:
        raise UserError(f"runner.num_gpus_per_actor={gpus}: the Ray cluster has {cluster_gpus:g} GPU(s)")
    if num_actors != "auto":
        actors = int(num_actors)
        if actors < 1:
            raise UserError(f"runner.num_actors={num_actors}: need at least one encoder actor")
    elif gpus > 0:
        actors = int(cluster_gpus // gpus)
    else:
        actors = max(1, int(resources.get("CPU", 1.0) // 2 // num_cpus_per_actor))
    return gpus, actors


def build_dataset(
    work: Mapping[str, list[ImageRecord] | UnitWork], *, job: Job, preprocess: Preprocess, metadata: dict[str, Any],
    num_actors: int, num_gpus_per_actor: float, num_cpus_per_actor: float,
):
    """The lazy pipeline over every split of `work`: listing blocks -> decode + resize (CPU tasks) -> embed (actors).

    `work`: per split, its records, or its shard units (`UnitWork`; a job has one kind or the other).
    `metadata`: what `job.encoder` records (`EncoderSpec.metadata`); every actor must load exactly that.
    Rows out: split, path, label, error ('' when embedded), embedding float32 [D] (zeros on error), model_s.
    """
    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    pixels = preprocess.height * preprocess.width * 3
    # Also keeps Ray from fusing the decode into the actors (it fuses equal resource requests only), which would
    # serialise decoding behind the model.
    decode_options = {"batch_format": "numpy", "num_cpus": 1, "compute": TaskPoolStrategy(size=decode_tasks(
        job.num_workers)), "memory": DECODE_BASE_MEMORY + DECODE_MEMORY_FACTOR * job.batch_size * pixels}
    if any(isinstance(w, UnitWork) for w in work.values()):  # one block, and so one task, per unit, read whole
        items = [{"split": split, "unit": k} for split, w in work.items() for k in range(len(w.units))]
        listing = ray.data.from_items(items, override_num_blocks=len(items))
        decoded = listing.map_batches(
            read_units, batch_size=1, **decode_options,
            fn_kwargs={"works": dict(work), "preprocess": preprocess, "max_pixels": job.max_pixels,
                       "batch_size": job.batch_size, "columns": job.columns})
    else:
        decoded = _listing(work, job.batch_size).map_batches(
            decode_batch, batch_size=job.batch_size, **decode_options,
            fn_kwargs={"root": str(job.root), "preprocess": preprocess, "max_pixels": job.max_pixels},
        )
    # The actors load the checkpoint the driver describes, on their own device, in the dtype it records.
    spec = replace(job.encoder, device="cuda" if num_gpus_per_actor > 0 else "cpu", dtype=metadata["dtype"])
    return decoded.map_batches(
        EmbedActor, batch_size=job.batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=num_actors),
        num_gpus=num_gpus_per_actor, num_cpus=num_cpus_per_actor,
        fn_constructor_kwargs={"spec": spec, "threads": actor_threads(num_actors, num_cpus_per_actor),
                               "expected": metadata},
    )


def actor_threads(num_actors: int, num_cpus_per_actor: float) -> int:
    """A CPU actor's torch threads: the cluster's CPUs shared out among the actors, at least the ones it reserves.

    As the local runner's model takes every core beside its decode workers: the decode tasks wait for the
    actors most of the time (the model is the slow step on a CPU), so CPUs reserved for them would idle.
    """
    import ray

    return max(1, int(num_cpus_per_actor), int(ray.cluster_resources().get("CPU", 1) // max(1, num_actors)))


def _listing(work: Mapping[str, list[ImageRecord]], batch_size: int):
    """The splits' records as one Ray dataset (split, path, label), cut into blocks of `_rows_per_task` rows."""
    import ray
    import ray.data

    table = pa.table({"split": [split for split, records in work.items() for _ in records],
                      "path": [r.path for records in work.values() for r in records],
                      "label": [r.label for records in work.values() for r in records]})
    step = _rows_per_task(len(table), batch_size, int(ray.cluster_resources().get("CPU", 1)))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, len(table), step)])


def _rows_per_task(rows: int, batch_size: int, cpus: int) -> int:
    return max(batch_size, min(MAX_ROWS_PER_TASK, math.ceil(rows / (TASKS_PER_CPU * max(1, cpus)))))


def decode_batch(batch: dict[str, np.ndarray], *, root: str, preprocess: Preprocess,
                 max_pixels: int | None) -> dict[str, np.ndarray]:
    """{split, path, label} [B] -> the same plus pixels uint8 [B, 3, H, W] (zeros on failure), error [B] ('' if ok).

    Files are read here and decoded + resized by this worker's `IsolatedDecoder` (one child process per
    worker, kept between tasks): the pixels are the local runner's, and so are the error texts.
    """
    paths = [str(p) for p in batch["path"]]
    pixels = np.zeros((len(paths), 3, preprocess.height, preprocess.width), np.uint8)
    errors = [""] * len(paths)
    blobs: dict[int, bytes] = {}
    for i, path in enumerate(paths):
        blob, error = read_file(Path(root) / path, bytes)
        if error is None:
            blobs[i] = blob
        else:
            errors[i] = error
    decoded = _decoder(preprocess, max_pixels).decode_many(list(blobs.values()))
    for i, result in zip(blobs, decoded):
        if isinstance(result, Exception):
            errors[i] = failure_reason(result)
        else:
            pixels[i] = result.numpy()
    return {"split": batch["split"], "path": batch["path"], "label": batch["label"], "pixels": pixels,
            "error": np.array(errors, object)}


def read_units(batch: dict[str, np.ndarray], *, works: Mapping[str, UnitWork], preprocess: Preprocess,
               max_pixels: int | None, batch_size: int, columns: tuple[str, ...]):
    """One unit (`batch["unit"]`, a single index into `works[batch["split"]].units`) -> batches of its records not
    done before: split, path, label, pixels uint8 [B, 3, H, W] (zeros on failure), error ('' if none), extra (the
    kept columns as JSON). Decoded by this worker's `IsolatedDecoder`, as `decode_batch` does; a damaged unit ends
    with one row under the unit's id."""
    from pipelines.sources import Record, SourceDamage

    split = str(batch["split"][0])
    work = works[split]
    unit = work.units[int(batch["unit"][0])]
    skip = work.skip.get(unit.name, set())
    chunk: list[Record] = []
    records = (r for r in work.source.read(unit) if r.path not in skip)
    while True:
        try:
            record = next(records, None)
        except SourceDamage as exc:
            record = Record(unit.id, None, error=f"SourceDamage: {exc}")
            chunk.append(record)
            break
        if record is None:
            break
        chunk.append(record)
        if len(chunk) == batch_size:
            yield {"split": np.full(len(chunk), split, object), **_decode_records(chunk, preprocess, max_pixels,
                                                                                  columns)}
            chunk = []
    if chunk:
        yield {"split": np.full(len(chunk), split, object), **_decode_records(chunk, preprocess, max_pixels, columns)}


def _decode_records(chunk: list, preprocess: Preprocess, max_pixels: int | None,
                    columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    pixels = np.zeros((len(chunk), 3, preprocess.height, preprocess.width), np.uint8)
    errors = [r.error or "" for r in chunk]
    blobs = {i: r.data for i, r in enumerate(chunk) if r.error is None}
    for i, result in zip(blobs, _decoder(preprocess, max_pixels).decode_many(list(blobs.values()))):
        if isinstance(result, Exception):
            errors[i] = failure_reason(result)
        else:
            pixels[i] = result.numpy()
    return {"path": np.array([r.path for r in chunk], object), "label": np.array([r.label for r in chunk], object),
            "pixels": pixels, "error": np.array(errors, object),
            "extra": np.array([json.dumps({c: r.extra.get(c) for c in columns}) for r in chunk], object)}


_DECODERS: dict[str, IsolatedDecoder] = {}
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): a signal for the child when its parent dies


def _decoder(preprocess: Preprocess, max_pixels: int | None) -> IsolatedDecoder:
    """This worker process's decoder child for these settings, started on first use (it dies with us).

    The child is forked from the worker, which has torch and the decoders imported already: a fresh interpreter
    would import them again, seconds of CPU per worker that the decoding needs. The Ray worker's own threads
    (gRPC, its core worker) hold nothing the child touches, as for the DataLoader workers that Ray users fork.
    """
    key = repr((preprocess, max_pixels))
    if key not in _DECODERS:
        if not _DECODERS:
            os.register_at_fork(after_in_child=_die_with_parent)
        _DECODERS[key] = IsolatedDecoder(preprocess, max_pixels=max_pixels, start_method="fork")
    return _DECODERS[key]


def _die_with_parent() -> None:
    # A Ray worker ends without running Python's exit handlers (Ray stops it from C++), so multiprocessing would
    # not stop a forked child; and the child holds both ends of its pipe, so it would never read an EOF either.
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class EmbedActor:
    """One encoder per actor: a decoded batch -> split, path, label, error, embedding float32 [B, D], model_s [B]."""

    def __init__(self, *, spec: EncoderSpec, threads: int, expected: dict[str, Any]) -> None:
        if spec.device == "cpu":
            torch.set_num_threads(threads)  # Ray set 1 thread per reserved CPU; see actor_threads
        self.encoder = spec.load()
        # The driver writes its own metadata into every footer: each node must load exactly that model.
        diffs = store.differences(expected, self.encoder.metadata(), where=("on the driver", "here"))
        if diffs:
            raise store.StoreMismatchError(
                f"the encoder loaded on {socket.gethostname()} differs from the driver's ({'; '.join(diffs)}); "
                "install the same project version and checkpoint on every node"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        start = time.perf_counter()
        embeddings = np.zeros((len(ok), self.encoder.embedding_dim), np.float32)
        if ok.any():
            embeddings[ok] = self.encoder.embed_uint8(torch.from_numpy(batch["pixels"][ok])).cpu().numpy()
        # The batch's model time spread over its rows, so that any regrouping of rows keeps the total.
        model_s = np.full(len(ok), (time.perf_counter() - start) / max(1, len(ok)))
        out = {"split": batch["split"], "path": batch["path"], "label": batch["label"], "error": batch["error"],
               "embedding": embeddings, "model_s": model_s}
        if "extra" in batch:
            out["extra"] = batch["extra"]
        return out


def _write_splits(dataset, splits: Mapping[str, _Split], *, job: Job, metadata: dict[str, Any]) -> None:
    """Run `dataset` to its end, each row into its split's parts or errors file; one progress bar for the job.

    A split's `wall_s` runs from the start until its last row arrived (the splits share one pipeline). On any
    exit, Ctrl-C included, every writer flushes what it holds, as `write_split` does.
    """
    totals = [len(s.work) if isinstance(s.work, list) else s.work.total for s in splits.values()]
    bar = tqdm(total=None if None in totals else sum(totals), desc=f"embed {'+'.join(splits)}", unit="img",
               disable=not job.progress, dynamic_ncols=True)
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        writers = {}
        for split, part in splits.items():
            writers[split] = PartWriter(part.dir, metadata=metadata, rows_per_part=job.rows_per_part,
                                        prefix=job.prefix, columns=job.columns, label_nullable=job.label_nullable)
            stack.callback(_close, writers[split], part.stats)
        _drain(dataset, writers, splits, bar)


def _close(writer: PartWriter, stats: SplitStats) -> None:
    writer.close()
    stats.write_s = writer.write_s


def _drain(dataset, writers: Mapping[str, PartWriter], splits: Mapping[str, _Split], bar: tqdm) -> None:
    # Results arrive in completion order, a batch may hold rows of several splits; parts need no order (readers
    # sort by path).
    start = tick = time.perf_counter()
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        waited = time.perf_counter() - tick
        names = batch["split"]
        for split in np.unique(names):
            rows = names == split
            stats = splits[str(split)].stats
            stats.read_s += waited * rows.sum() / len(names)
            _add({key: column[rows] for key, column in batch.items()}, writers[str(split)], splits[str(split)].dir,
                 stats)
            stats.wall_s = time.perf_counter() - start
        bar.update(len(names))
        tick = time.perf_counter()


def _add(batch: dict[str, np.ndarray], writer: PartWriter, split_dir: Path, stats: SplitStats) -> None:
    """One split's rows of a result batch: embedded ones to its writer, failures to its errors file."""
    failed = batch["error"] != ""
    failures = zip(batch["path"][failed], batch["label"][failed], batch["error"][failed])
    record_errors(split_dir, ((str(p), None if label is None else str(label), str(e))
                              for p, label, e in failures), stats)
    ok = ~failed
    if ok.any():
        extra = [json.loads(e) for e in batch["extra"][ok]] if "extra" in batch else None
        writer.add(batch["path"][ok].tolist(), batch["label"][ok].tolist(), batch["embedding"][ok], extra=extra)
    stats.embedded += int(ok.sum())
    stats.model_s += float(batch["model_s"].sum())
