"""One embed job end to end: check the settings and the output folder, hold its lock, list the splits, run a
runner over them, write the summary. `pipelines.embed` is its command line.

torch, transformers and the runners are imported inside the functions, so that the settings checks answer in a
moment.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipelines import store
from pipelines.config import CONF_DIR
from pipelines.errors import Interrupted, UserError
from pipelines.runners.settings import check_device, check_settings
from pipelines.runners.summary import save_summary, summarize

if TYPE_CHECKING:
    from pipelines.runners.split import Job, Runner
    from pipelines.sources.files import FileSource


def run_job(*, root: Path | None, splits: list[str], output_dir: Path, model: str, revision: str | None,
           runner: Runner | None, device: str, dtype: str, batch_size: int, compile: bool, num_workers: int | str,
           rows_per_part: int, overwrite: bool, progress: bool, max_image_pixels: int | str | None,
           shard_index: int, shard_count: int, source: FileSource | None = None) -> dict[str, Any]:
    """The embed job over class folders under `root`, or over `source`'s shards (root None)."""
    check_settings(batch_size=batch_size, rows_per_part=rows_per_part, num_workers=num_workers,
                   shard_index=shard_index, shard_count=shard_count, dtype=dtype, device=device,
                   max_image_pixels=max_image_pixels, output_dir=output_dir, compile=compile, overwrite=overwrite,
                   progress=progress)
    check_device(device)
    from pipelines.devices import job_devices

    devices = job_devices(device)
    check_devices(devices, device=device, runner=runner)
    if source is not None:
        for split in splits:
            source.patterns(split)  # a split without data_files: one line now
    else:
        store.check_location(output_dir, root=root, splits=splits)
    store.check_layout(output_dir)
    protected = [root] if root is not None else []
    if overwrite:
        store.check_overwrite(output_dir, protected=protected)
    store.check_output_dir(output_dir)
    lock = store.lock_output(output_dir, shard_index=shard_index, shard_count=shard_count)
    try:
        from pipelines.data import DEFAULT_MAX_PIXELS
        from pipelines.runners.split import Job
        from pipelines.siglip import EncoderSpec

        job = Job(encoder=EncoderSpec(model, revision, devices[0], dtype), root=root, output_dir=output_dir,
                  prefix=f"shard{shard_index}of{shard_count}", batch_size=batch_size, num_workers=num_workers,
                  rows_per_part=rows_per_part, progress=progress, compile=compile,
                  max_pixels=DEFAULT_MAX_PIXELS if max_image_pixels == "auto" else max_image_pixels,
                  columns=source.keep_columns if source is not None else (), label_nullable=source is not None,
                  threads=encoder_threads(num_workers, devices=len(devices)))
        return _run_locked(job, splits=splits, runner=runner or _local_runner(), overwrite=overwrite,
                           shard_index=shard_index, shard_count=shard_count, source=source, devices=devices)
    finally:
        lock.release()


def check_devices(devices: list[str], *, device: Any, runner: Runner | None) -> None:
    """Refuse several devices where they cannot work together (UserError naming the setting)."""
    if len(devices) < 2:
        return
    if runner is not None and getattr(runner, "func", runner).__module__ != "pipelines.runners.local":
        raise UserError(f"device={device}: one encoder process per device is the local runner's; runner=ray "
                        "places its actors on the cluster's GPUs itself (runner.num_actors)")


def workers_per_device(num_workers: int | str, devices: int) -> int | str:
    """Decode workers of each device's process: auto = the cores split between the devices; a number as given."""
    if num_workers != "auto" or devices < 2:
        return num_workers
    from pipelines.runners.local import default_workers

    return max(1, (default_workers() + 1) // devices - 1)


def encoder_threads(num_workers: int | str, *, devices: int) -> int:
    """An encoder on the CPU: the cores of its share less its decode workers, at least one."""
    import os

    cores = max(1, len(os.sched_getaffinity(0)) // devices)
    workers = workers_per_device(num_workers, devices)
    busy = cores - 1 if workers == "auto" else int(workers)
    return max(1, cores - busy)


def _local_runner() -> Runner:
    """conf/runner/local.yaml's runner, its settings bound."""
    return instantiate(OmegaConf.load(Path(CONF_DIR) / "runner" / "local.yaml"), _convert_="all")


def _run_locked(job: Job, *, splits: list[str], runner: Runner, overwrite: bool, shard_index: int,
                shard_count: int, source: FileSource | None, devices: list[str]) -> dict[str, Any]:
    root, output_dir = job.root, job.output_dir
    store.check_layout(output_dir)  # again under the lock: a conversion may have run in between
    if overwrite:
        store.clear_output(output_dir, protected=[root] if root is not None else [])  # again under the lock
    # Each listing logs its notes (stray files, empty classes, ...); the summary keeps them.
    listings = _list(root, source, splits, shard_index=shard_index, shard_count=shard_count)
    # The checkpoint's identity from its config files: the weights load where the runner computes.
    metadata = job.encoder.metadata()
    # Where the images are, for readers (validate, explore) that look for them; not an identity key. A shard
    # source's kept columns are: every part of one output has the same columns.
    where = ({"dataset_root": str(root.resolve())} if source is None else
             {"source": source.describe(), "columns": list(source.keep_columns)})
    store.prepare_output(output_dir, {**metadata, **where}, overwrite=False)
    before = {split: _part_names(store.split_dir(output_dir, split), job.prefix) for split in splits}
    try:
        return _embed_splits(listings, job=job, metadata=metadata, runner=runner, shard_index=shard_index,
                             shard_count=shard_count, source=source, devices=devices)
    except KeyboardInterrupt as exc:
        # The runner has flushed what it had embedded (write_split); say how much, then exit 130 / 143.
        raise Interrupted(getattr(exc, "signum", signal.SIGINT),
                          _saved_message(output_dir, before, job.prefix)) from None
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:
            raise
        # ray.init installs a SIGTERM handler that calls sys.exit(SIGTERM): the same stop as ours.
        raise Interrupted(signal.SIGTERM, _saved_message(output_dir, before, job.prefix)) from None


def _list(root: Path | None, source: FileSource | None, splits: list[str], *, shard_index: int,
          shard_count: int) -> dict[str, Any]:
    """Each split's listing, this shard's share: class folders' files, or a shard source's units (by unit)."""
    if source is None:
        from pipelines.data import scan_split

        return {split: scan_split(root, split).shard(index=shard_index, count=shard_count) for split in splits}
    from pipelines.data import shard_of

    listings = {}
    for split in splits:
        listed = source.list(split)
        listed.units = [u for u in listed.units if shard_count == 1 or shard_of(u.id, shard_count) == shard_index]
        listed.failed = [f for f in listed.failed if shard_count == 1 or shard_of(f.id, shard_count) == shard_index]
        listings[split] = listed
    return listings


def _work(listed: Any, source: FileSource | None) -> Any:
    """What the runner is given for a split: the folder's records, or the shard source's units."""
    if source is None:
        return listed.records
    from pipelines.runners.stream import Units

    return Units(source, listed.units)


def _record_listing(output_dir: Path, split: str, listed: Any) -> int:
    """Record what the listing found unreadable (names not UTF-8; files with no unit) once; how many were new."""
    from pipelines.runners.split import record_invalid_names, record_unreadable

    if hasattr(listed, "invalid_names"):
        return record_invalid_names(store.split_dir(output_dir, split), listed.invalid_names)
    return record_unreadable(store.split_dir(output_dir, split), listed.failed)


def _embed_splits(listings: dict[str, Any], *, job: Job, metadata: dict[str, Any], runner: Runner,
                  shard_index: int, shard_count: int, source: FileSource | None,
                  devices: list[str]) -> dict[str, Any]:
    """Run the runner over the splits (once per device when there are several), then write and return the
    summary; a device that failed is reported once the summary is saved."""
    from pipelines.runners.local import default_workers

    start = time.perf_counter()
    recorded = {split: _record_listing(job.output_dir, split, listed) for split, listed in listings.items()}
    work = {split: _work(listed, source) for split, listed in listings.items()}
    per_device = None
    if len(devices) > 1:
        from pipelines.runners.multi import run_on_devices

        results, per_device = run_on_devices(job, work, devices=devices, runner=runner,
                                             workers_each=workers_per_device(job.num_workers, len(devices)))
    else:
        results = runner(job, work)
    for stats in results:
        stats.errors += recorded[stats.split]
        if source is not None:
            stats.damaged_units += recorded[stats.split]
    where = ({"dataset_root": str(job.root.resolve())} if source is None else {"source": source.describe()})
    summary = summarize(results, time.perf_counter() - start, metadata, job.output_dir, **where,
                        splits=list(listings), runner=getattr(runner, "func", runner).__module__,
                        shard_index=shard_index, shard_count=shard_count,
                        num_workers=default_workers() if job.num_workers == "auto" else int(job.num_workers),
                        batch_size=job.batch_size, compile=job.compile)
    summary["listing"] = {split: listed.notes() for split, listed in listings.items()}
    if per_device is not None:
        summary["devices"] = [_device_row(r) for r in per_device]
    save_summary(store.summary_path(job.output_dir, shard_index=shard_index, shard_count=shard_count), summary)
    failed = [r for r in per_device or [] if r.error is not None]
    if failed:
        from pipelines.runners.multi import DeviceFailedError

        saved = summary["images"]
        raise DeviceFailedError(
            "; ".join(f"device {r.device} failed: {r.error}" for r in failed)
            + f"; the other device(s) finished, {saved} rows were saved in all in {job.output_dir}: rerun the same "
            "command to embed what is missing (nothing is embedded twice)")
    return summary


def _device_row(result: Any) -> dict[str, Any]:
    embedded = sum(s.embedded for s in result.stats)
    wall = max((s.wall_s for s in result.stats), default=0.0)
    return {"device": result.device, "images": embedded, "errors": sum(s.errors for s in result.stats),
            "wall_s": round(wall, 3), "images_per_s": round(embedded / wall, 2) if wall > 0 else 0.0,
            "failed": result.error}


def _part_names(split_dir: Path, prefix: str) -> set[str]:
    return {p.name for p in split_dir.glob(f"part-{prefix}-*.parquet")}


def _saved_message(output_dir: Path, before: dict[str, set[str]], prefix: str) -> str:
    """'N rows saved ...': the rows of the parts this run wrote, read from their footers."""
    saved = 0
    for split, names in before.items():
        folder = store.split_dir(output_dir, split)
        saved += store.rows_in(folder, _part_names(folder, prefix) - names)
    return (f"{saved} newly embedded rows saved in {output_dir}; rerun the same command to resume "
            "(nothing is embedded twice)")
