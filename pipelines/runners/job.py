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
from pipelines.errors import Interrupted
from pipelines.runners.settings import check_device, check_settings
from pipelines.runners.summary import save_summary, summarize

if TYPE_CHECKING:
    from pipelines.data import Listing
    from pipelines.runners.split import Job, Runner


def run_job(*, root: Path, splits: list[str], output_dir: Path, model: str, revision: str | None,
           runner: Runner | None, device: str, dtype: str, batch_size: int, compile: bool, num_workers: int | str,
           rows_per_part: int, overwrite: bool, progress: bool, max_image_pixels: int | str | None,
           shard_index: int, shard_count: int) -> dict[str, Any]:
    check_settings(batch_size=batch_size, rows_per_part=rows_per_part, num_workers=num_workers,
                   shard_index=shard_index, shard_count=shard_count, dtype=dtype, device=device,
                   max_image_pixels=max_image_pixels, output_dir=output_dir, compile=compile, overwrite=overwrite,
                   progress=progress)
    check_device(device)
    store.check_location(output_dir, root=root, splits=splits)
    store.check_layout(output_dir)
    if overwrite:
        store.check_overwrite(output_dir, protected=[root])
    store.check_output_dir(output_dir)
    lock = store.lock_output(output_dir, shard_index=shard_index, shard_count=shard_count)
    try:
        from pipelines.data import DEFAULT_MAX_PIXELS
        from pipelines.runners.split import Job
        from pipelines.siglip import EncoderSpec

        job = Job(encoder=EncoderSpec(model, revision, device, dtype), root=root, output_dir=output_dir,
                  prefix=f"shard{shard_index}of{shard_count}", batch_size=batch_size, num_workers=num_workers,
                  rows_per_part=rows_per_part, progress=progress, compile=compile,
                  max_pixels=DEFAULT_MAX_PIXELS if max_image_pixels == "auto" else max_image_pixels)
        return _run_locked(job, splits=splits, runner=runner or _local_runner(), overwrite=overwrite,
                           shard_index=shard_index, shard_count=shard_count)
    finally:
        lock.release()


def _local_runner() -> Runner:
    """conf/runner/local.yaml's runner, its settings bound."""
    return instantiate(OmegaConf.load(Path(CONF_DIR) / "runner" / "local.yaml"), _convert_="all")


def _run_locked(job: Job, *, splits: list[str], runner: Runner, overwrite: bool, shard_index: int,
                shard_count: int) -> dict[str, Any]:
    root, output_dir = job.root, job.output_dir
    store.check_layout(output_dir)  # again under the lock: a conversion may have run in between
    if overwrite:
        store.clear_output(output_dir, protected=[root])  # checked again under the lock
    from pipelines.data import scan_split

    # Each listing logs its notes (stray files, empty classes, ...); the summary keeps them.
    listings = {split: scan_split(root, split).shard(index=shard_index, count=shard_count) for split in splits}
    # The checkpoint's identity from its config files: the weights load where the runner computes.
    metadata = job.encoder.metadata()
    # The root is recorded for readers (validate, notebooks) that look for the images; it is not an identity key.
    store.prepare_output(output_dir, {**metadata, "dataset_root": str(root.resolve())}, overwrite=False)
    before = {split: _part_names(store.split_dir(output_dir, split), job.prefix) for split in splits}
    try:
        return _embed_splits(listings, job=job, metadata=metadata, runner=runner, shard_index=shard_index,
                             shard_count=shard_count)
    except KeyboardInterrupt as exc:
        # The runner has flushed what it had embedded (write_split); say how much, then exit 130 / 143.
        raise Interrupted(getattr(exc, "signum", signal.SIGINT),
                          _saved_message(output_dir, before, job.prefix)) from None
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:
            raise
        # ray.init installs a SIGTERM handler that calls sys.exit(SIGTERM): the same stop as ours.
        raise Interrupted(signal.SIGTERM, _saved_message(output_dir, before, job.prefix)) from None


def _embed_splits(listings: dict[str, Listing], *, job: Job, metadata: dict[str, Any], runner: Runner,
                  shard_index: int, shard_count: int) -> dict[str, Any]:
    """Run the runner over the splits, then write and return the summary."""
    from pipelines.runners.local import default_workers
    from pipelines.runners.split import record_invalid_names

    start = time.perf_counter()
    recorded = {split: record_invalid_names(store.split_dir(job.output_dir, split), listed.invalid_names)
                for split, listed in listings.items()}
    results = runner(job, {split: listed.records for split, listed in listings.items()})
    for stats in results:
        stats.errors += recorded[stats.split]
    summary = summarize(results, time.perf_counter() - start, metadata, job.output_dir,
                       dataset_root=str(job.root.resolve()), splits=list(listings),
                       runner=getattr(runner, "func", runner).__module__, shard_index=shard_index,
                       shard_count=shard_count,
                       num_workers=default_workers() if job.num_workers == "auto" else int(job.num_workers),
                       batch_size=job.batch_size, compile=job.compile)
    summary["listing"] = {split: listed.notes() for split, listed in listings.items()}
    save_summary(store.summary_path(job.output_dir, shard_index=shard_index, shard_count=shard_count), summary)
    return summary


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
