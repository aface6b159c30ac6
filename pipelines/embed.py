"""`python -m pipelines.embed`: every image of a dataset's splits -> a SigLIP embedding in Parquet.

torch, transformers and the runners are imported inside the functions that run the job, so that
`--cfg job` and the settings checks answer in a moment.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipelines import store
from pipelines.config import CONF_DIR, Interrupted, clean_errors
from pipelines.hub import check_model
from pipelines.runners.settings import check_device, check_settings

if TYPE_CHECKING:
    from pipelines.data import ImageRecord
    from pipelines.runners.split import Job, Runner, SplitStats

log = logging.getLogger(__name__)

@dataclass
class Listed:
    """One split's files of this shard, and what its listing found besides them (reported, not embedded)."""

    records: list[ImageRecord]
    stray_files: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    skipped_dirs: list[str] = field(default_factory=list)
    invalid_names: list[ImageRecord] = field(default_factory=list)  # recorded as errors, never read

    def notes(self) -> dict[str, list[str]]:
        return {"stray_files": self.stray_files, "empty_classes": self.empty_classes,
                "skipped_dirs": self.skipped_dirs, "invalid_names": [r.path for r in self.invalid_names]}


def list_files(root: Path, split: str, *, shard_index: int, shard_count: int) -> Listed:
    """The split's files of this shard, and what `pipelines.data.scan_split` found besides them."""
    from pipelines import data

    listing = data.scan_split(root, split)
    return Listed(  # the listing has logged its notes
        data.take_shard(listing.records, index=shard_index, count=shard_count),
        list(listing.stray_files), list(listing.empty_classes), list(listing.skipped_dirs),
        data.take_shard(listing.invalid_names, index=shard_index, count=shard_count),
    )


# How the summary table words each listing note.
NOTES = {"stray_files": "file(s) outside any class folder, not embedded",
         "empty_classes": "empty class folder(s)",
         "skipped_dirs": "folder(s) reached twice (symlink loop or duplicate link), walked once",
         "invalid_names": "name(s) not valid UTF-8, recorded as errors (rename them to embed them)"}
INVALID_NAME = "file name is not valid UTF-8 (Parquet and JSON cannot hold it): rename the file to embed it"


# conf/embed.yaml's job settings, passed through by `main`; the file is their one source of defaults.
SETTINGS = ("device", "dtype", "batch_size", "compile", "num_workers", "rows_per_part", "overwrite", "progress",
            "max_image_pixels")


def defaults() -> dict[str, Any]:
    """conf/embed.yaml's job settings (its `shard.index` / `shard.count` as shard_index / shard_count)."""
    cfg = OmegaConf.load(Path(CONF_DIR) / "embed.yaml")
    return {**{key: cfg[key] for key in SETTINGS}, "shard_index": cfg.shard.index, "shard_count": cfg.shard.count}


def run_embed(*, root: str | Path, splits: list[str], output_dir: str | Path, model: str,
              revision: str | None = None, runner: Runner | None = None, **settings: Any) -> dict[str, Any]:
    """Embed `root/<split>/<class>/*` for each split into `output_dir/split=<split>/`; returns the summary.

    `settings`: conf/embed.yaml's job settings (`SETTINGS`, shard_index, shard_count); a missing one takes that
    file's value. `runner`: a `pipelines.runners.split.Runner`, e.g. `pipelines.runners.ray.run` with its
    settings bound; None: conf/runner/local.yaml's. `max_image_pixels`: larger images are error records
    (checked from their header); None = no limit; "auto" = PIL's decompression-bomb threshold. Settings, the
    device and the output folder are checked before the dataset is listed or the model loaded; the job holds
    `output_dir`'s lock for its shard until it returns. An output directory in the layout before 0.2.0 is
    refused with the command that converts it (`pipelines.upgrade`).
    """
    return _embed(root=Path(root), splits=splits, output_dir=Path(output_dir), model=model, revision=revision,
                  runner=runner, **{**defaults(), **settings})


def _embed(*, root: Path, splits: list[str], output_dir: Path, model: str, revision: str | None,
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
    listings = {split: list_files(root, split, shard_index=shard_index, shard_count=shard_count) for split in splits}
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


def _embed_splits(listings: dict[str, Listed], *, job: Job, metadata: dict[str, Any], runner: Runner,
                  shard_index: int, shard_count: int) -> dict[str, Any]:
    """Run the runner over the splits, then write and return the summary."""
    from pipelines.runners.local import default_workers

    start = time.perf_counter()
    recorded = {split: _record_invalid_names(store.split_dir(job.output_dir, split), listed.invalid_names)
                for split, listed in listings.items()}
    results = runner(job, {split: listed.records for split, listed in listings.items()})
    for stats in results:
        stats.errors += recorded[stats.split]
    summary = _summary(results, time.perf_counter() - start, metadata, job.output_dir,
                       dataset_root=str(job.root.resolve()), splits=list(listings),
                       runner=getattr(runner, "func", runner).__module__, shard_index=shard_index,
                       shard_count=shard_count,
                       num_workers=default_workers() if job.num_workers == "auto" else int(job.num_workers),
                       batch_size=job.batch_size, compile=job.compile)
    summary["listing"] = {split: listed.notes() for split, listed in listings.items()}
    _save_summary(store.summary_path(job.output_dir, shard_index=shard_index, shard_count=shard_count), summary)
    return summary


def _record_invalid_names(split_dir: Path, invalid: list[ImageRecord]) -> int:
    """Add the files whose names cannot be stored to the split's errors file (once); returns how many were new."""
    if not invalid:
        return 0
    known = {e["path"] for e in store.read_errors(split_dir)}
    new = [{"path": r.path, "label": r.label, "error": INVALID_NAME} for r in invalid if r.path not in known]
    store.append_errors(split_dir, new)
    return len(new)


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


def _save_summary(path: Path, summary: dict[str, Any]) -> None:
    """Write the summary, except for a run that found nothing left to do: the last real run's summary stays."""
    if summary["images"] == 0 and summary["errors"] == 0 and path.exists():
        log.info("nothing left to do (%d images already done); %s keeps the last run's summary",
                 summary["already_done"], path)
        return
    store.write_json(path, summary)


def _summary(results: list[SplitStats], wall_s: float, metadata: dict[str, Any], output_dir: Path,
             **settings: Any) -> dict[str, Any]:
    embedded = sum(r.embedded for r in results)
    return {
        "output_dir": str(output_dir),
        "model": metadata,
        "settings": settings,
        "images": embedded,
        "errors": sum(r.errors for r in results),
        "already_done": sum(r.already_done for r in results),
        "wall_s": round(wall_s, 3),
        "images_per_s": round(embedded / wall_s, 2) if wall_s > 0 else 0.0,
        "read_s": round(sum(r.read_s for r in results), 3),
        "model_s": round(sum(r.model_s for r in results), 3),
        "write_s": round(sum(r.write_s for r in results), 3),
        "splits": [r.to_dict() for r in results],
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = [f"{'split':<10}{'listed':>8}{'done before':>13}{'embedded':>10}{'errors':>8}{'img/s':>10}"]
    for s in summary["splits"]:
        lines.append(f"{s['split']:<10}{s['listed']:>8}{s['already_done']:>13}{s['embedded']:>10}"
                     f"{s['errors']:>8}{s['images_per_s']:>10.1f}")
    if summary["images"] == 0 and summary["errors"] == 0:
        lines.append(f"nothing left to do: all {summary['already_done']} images were done before -> "
                     f"{summary['output_dir']}")
    else:
        lines.append(
            f"{summary['images']} images embedded, {summary['errors']} errors, {summary['images_per_s']:.1f} img/s "
            f"in {summary['wall_s']:.1f} s (waiting on reads {summary['read_s']:.1f} s, model "
            f"{summary['model_s']:.1f} s, writing {summary['write_s']:.1f} s in background) -> {summary['output_dir']}"
        )
    if summary["errors"]:
        lines.append(f"undecodable files are listed in {store.split_dir(summary['output_dir'], '<split>')}/"
                     f"{store.ERRORS}")
    for split, notes in summary.get("listing", {}).items():
        for what, items in notes.items():
            if items:
                shown = ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")
                lines.append(f"{split}: {len(items)} {NOTES.get(what, what)}: {shown}")
    return "\n".join(lines)


@hydra.main(config_path=CONF_DIR, config_name="embed", version_base="1.3")
@clean_errors(FileNotFoundError, PermissionError)  # and every UserError (WeightsUnavailableError is one)
def main(cfg: DictConfig) -> None:
    check_model(cfg.model.name_or_path, cfg.model.revision)  # a model not to be had: now, before torch imports
    summary = run_embed(
        root=cfg.dataset.root, splits=list(cfg.splits), output_dir=cfg.output_dir, model=cfg.model.name_or_path,
        revision=cfg.model.revision, runner=instantiate(cfg.runner, _convert_="all"), shard_index=cfg.shard.index,
        shard_count=cfg.shard.count, **{key: cfg[key] for key in SETTINGS},
    )
    print(format_summary(summary))
    log.debug("summary %s", json.dumps(summary))


if __name__ == "__main__":
    main()
