"""`python -m pipelines.embed`: every image of a dataset's splits -> a SigLIP embedding in Parquet.

torch, transformers and the runners are imported inside the functions that run the job, so that
`--cfg job` and the settings checks answer in a moment.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from pipelines import store
from pipelines.config import CONF_DIR, Interrupted, UserError, clean_errors
from pipelines.hub import check_model

if TYPE_CHECKING:
    from pipelines.data import ImageRecord
    from pipelines.runner import SplitStats

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(auto|cpu|cuda|mps)(:\d+)?$")


def check_settings(
    *, batch_size: Any, rows_per_part: Any, num_workers: Any, shard_index: Any, shard_count: Any, dtype: Any,
    device: Any, **flags: Any,
) -> None:
    """Refuse a bad setting with a UserError naming the key and the value (before anything is loaded or listed).

    `flags`: the boolean settings (compile, overwrite, progress, ...) by name; Hydra hands strings through.
    """
    for key, value in (("batch_size", batch_size), ("rows_per_part", rows_per_part)):
        if not _is_int(value) or value < 1:
            raise UserError(f"{key}={_show(value)}: expected a whole number of at least 1")
    if num_workers != "auto" and (not _is_int(num_workers) or num_workers < 0):
        raise UserError(f"num_workers={_show(num_workers)}: expected auto or a whole number of at least 0")
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise UserError(f"{key}={_show(value)}: expected true or false")
    if not _is_int(shard_count) or shard_count < 1:
        raise UserError(f"shard.count={_show(shard_count)}: expected a whole number of at least 1")
    if not _is_int(shard_index) or not 0 <= shard_index < shard_count:
        raise UserError(f"shard.index={_show(shard_index)}: expected 0 to {shard_count - 1} (shard.count={shard_count})")
    if dtype not in DTYPES:
        raise UserError(f"dtype={_show(dtype)}: expected one of {', '.join(DTYPES)}")
    if not isinstance(device, str) or not _DEVICE.match(device) or device.startswith("auto:"):
        raise UserError(f"device={_show(device)}: expected auto, cpu, cuda, cuda:N or mps")


def _show(value: Any) -> str:
    """A setting's value as typed on the command line: true/false for booleans, quoted strings."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_device(device: str) -> None:
    """Refuse a device this host does not have (UserError): `cuda` without CUDA, `cuda:3` with one GPU."""
    kind, _, index = device.partition(":")
    if kind in ("auto", "cpu"):
        return
    import torch

    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"device={device}: this host has no MPS device; use device=cpu or device=auto")
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"device={device}: this host has no CUDA device (torch.cuda.is_available() is False); "
                        "use device=cpu or device=auto")
    if index and int(index) >= count:
        raise UserError(f"device={device}: this host has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")


def check_output_dir(output_dir: Path) -> None:
    """Refuse an output_dir that cannot be written: a file, a read-only folder, a parent that cannot be made."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output_dir={output_dir}: is a file, not a folder; choose another output_dir")
    probe = output_dir / f".write-test-{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        where = f" ({exc.filename})" if exc.filename and Path(exc.filename) not in (output_dir, probe) else ""
        raise UserError(f"output_dir={output_dir}: cannot write there: {reason}{where}") from exc


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


def run_embed(
    *,
    root: str | Path,
    splits: list[str],
    output_dir: str | Path,
    model: str,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 64,
    num_workers: int | str = "auto",
    rows_per_part: int = 4096,
    shard_index: int = 0,
    shard_count: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    runner: Callable[..., SplitStats] | None = None,
    compile: bool = False,
    max_image_pixels: int | str | None = "auto",
) -> dict[str, Any]:
    """Embed `root/<split>/<class>/*` for each split into `output_dir/split=<split>/`; returns the summary.

    `runner` embeds one split: the local `pipelines.runner.embed_split` (None, the default) or another with the
    same keyword arguments, e.g. `pipelines.ray_runner.embed_split` with its settings bound. `compile`:
    torch.compile the model for `batch_size` (the last, smaller batch is padded, so nothing recompiles).
    `max_image_pixels`: larger images are error records (checked from their header); None = no limit; "auto" =
    the runner's default (PIL's decompression-bomb threshold). Settings, the device and the output folder are checked before the dataset is listed or the model loaded;
    the job holds `output_dir`'s lock for its shard until it returns. An output directory in the layout before
    0.2.0 is refused with the command that converts it (`pipelines.upgrade`).
    """
    check_settings(batch_size=batch_size, rows_per_part=rows_per_part, num_workers=num_workers,
                   shard_index=shard_index, shard_count=shard_count, dtype=dtype, device=device,
                   compile=compile, overwrite=overwrite, progress=progress)
    if max_image_pixels not in ("auto", None) and (not _is_int(max_image_pixels) or max_image_pixels < 1):
        raise UserError(f"max_image_pixels={_show(max_image_pixels)}: expected a whole number of at least 1, "
                        "or null for no limit")
    root, output_dir = Path(root), Path(output_dir)
    if overwrite and shard_count > 1:
        raise UserError("overwrite=true with shard.count > 1 would let shards delete each other's work; "
                        f"remove {output_dir} once, then start the shards")
    check_device(device)
    store.check_location(output_dir, root=root, splits=splits)
    store.check_layout(output_dir)
    if overwrite:
        store.check_overwrite(output_dir, protected=[root])
    check_output_dir(output_dir)
    lock = store.lock_output(output_dir, shard_index=shard_index, shard_count=shard_count)
    try:
        return _run_locked(root=root, splits=splits, output_dir=output_dir, model=model, revision=revision,
                           device=device, dtype=dtype, batch_size=batch_size, num_workers=num_workers,
                           rows_per_part=rows_per_part, shard_index=shard_index, shard_count=shard_count,
                           overwrite=overwrite, progress=progress, runner=runner, compile=compile,
                           limits={} if max_image_pixels == "auto" else {"max_pixels": max_image_pixels})
    finally:
        lock.release()


def _run_locked(*, root: Path, splits: list[str], output_dir: Path, model: str, revision: str | None, device: str,
                dtype: str, batch_size: int, num_workers: int | str, rows_per_part: int, shard_index: int,
                shard_count: int, overwrite: bool, progress: bool, runner: Callable[..., SplitStats] | None,
                compile: bool, limits: dict[str, Any]) -> dict[str, Any]:
    from pipelines.runner import default_workers, embed_split
    from pipelines.siglip import load_encoder

    runner = runner or embed_split
    store.check_layout(output_dir)  # again under the lock: a conversion may have run in between
    if overwrite:
        store.clear_output(output_dir, protected=[root])  # checked again under the lock
    listings = {split: list_files(root, split, shard_index=shard_index, shard_count=shard_count) for split in splits}
    workers = default_workers() if num_workers == "auto" else int(num_workers)
    encoder = load_encoder(model, device=device, dtype=dtype, revision=revision)
    if compile:
        encoder.compile(batch_size=batch_size)
    # The root is recorded for readers (validate, notebooks) that look for the images; it is not an identity key.
    store.prepare_output(output_dir, {**encoder.metadata(), "dataset_root": str(root.resolve())}, overwrite=False)
    prefix = f"shard{shard_index}of{shard_count}"
    before = {split: _part_names(store.split_dir(output_dir, split), prefix) for split in splits}
    try:
        return _embed_splits(listings, encoder=encoder, root=root, output_dir=output_dir, runner=runner,
                             batch_size=batch_size, workers=workers, rows_per_part=rows_per_part, prefix=prefix,
                             progress=progress, shard_index=shard_index, shard_count=shard_count, compile=compile,
                             **limits)
    except KeyboardInterrupt as exc:
        # The runner has flushed what it had embedded (write_split); say how much, then exit 130 / 143.
        raise Interrupted(getattr(exc, "signum", signal.SIGINT), _saved_message(output_dir, before, prefix)) from None
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:
            raise
        # ray.init installs a SIGTERM handler that calls sys.exit(SIGTERM): the same stop as ours.
        raise Interrupted(signal.SIGTERM, _saved_message(output_dir, before, prefix)) from None


def _embed_splits(listings: dict[str, Listed], *, encoder: Any, root: Path, output_dir: Path,
                  runner: Callable[..., SplitStats], workers: int, prefix: str, shard_index: int, shard_count: int,
                  compile: bool, **settings: Any) -> dict[str, Any]:
    """Run the runner over each split, then write and return the summary."""
    start = time.perf_counter()
    results = []
    for split, listed in listings.items():
        recorded = _record_invalid_names(store.split_dir(output_dir, split), listed.invalid_names)
        results.append(runner(encoder=encoder, root=root, split=split, records=listed.records,
                              output_dir=output_dir, num_workers=workers, prefix=prefix, **settings))
        results[-1].errors += recorded
    summary = _summary(results, time.perf_counter() - start, encoder.metadata(), output_dir,
                       dataset_root=str(root.resolve()), splits=list(listings),
                       runner=getattr(runner, "func", runner).__module__, shard_index=shard_index,
                       shard_count=shard_count, num_workers=workers, batch_size=settings["batch_size"],
                       compile=compile)
    summary["listing"] = {split: listed.notes() for split, listed in listings.items()}
    _save_summary(store.summary_path(output_dir, shard_index=shard_index, shard_count=shard_count), summary)
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
@clean_errors("pipelines.siglip:WeightsUnavailableError", FileNotFoundError, PermissionError)
def main(cfg: DictConfig) -> None:
    check_model(cfg.model.name_or_path, cfg.model.revision)  # a model not to be had: now, before torch imports
    summary = run_embed(
        root=cfg.dataset.root,
        splits=list(cfg.splits),
        output_dir=cfg.output_dir,
        model=cfg.model.name_or_path,
        revision=cfg.model.revision,
        device=cfg.device,
        dtype=cfg.dtype,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        rows_per_part=cfg.rows_per_part,
        shard_index=cfg.shard.index,
        shard_count=cfg.shard.count,
        overwrite=cfg.overwrite,
        progress=cfg.progress,
        runner=instantiate(cfg.runner, _convert_="all"),
        compile=cfg.compile,
        max_image_pixels=cfg.get("max_image_pixels", "auto"),
    )
    print(format_summary(summary))
    log.debug("summary %s", json.dumps(summary))


if __name__ == "__main__":
    main()
