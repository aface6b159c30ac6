"""The embed job's summary: what each split's run did, totals, the listing's notes; written and printed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import store

if TYPE_CHECKING:
    from pipelines.runners.split import SplitStats

log = logging.getLogger(__name__)

# How the summary table words each listing note.
NOTES = {"stray_files": "file(s) outside any class folder, not embedded",
         "empty_classes": "empty class folder(s)",
         "skipped_dirs": "folder(s) reached twice (symlink loop or duplicate link), walked once",
         "invalid_names": "name(s) not valid UTF-8, recorded as errors (rename them to embed them)"}


def save_summary(path: Path, summary: dict[str, Any]) -> None:
    """Write the summary, except for a run that found nothing left to do: the last real run's summary stays."""
    if summary["images"] == 0 and summary["errors"] == 0 and path.exists():
        log.info("nothing left to do (%d images already done); %s keeps the last run's summary",
                 summary["already_done"], path)
        return
    store.write_json(path, summary)


def summarize(results: list[SplitStats], wall_s: float, metadata: dict[str, Any], output_dir: Path,
             **settings: Any) -> dict[str, Any]:
    embedded = sum(r.embedded for r in results)
    return {
        "output_dir": str(output_dir),
        "model": metadata,
        "settings": settings,
        "images": embedded,
        "errors": sum(r.errors for r in results),
        "damaged_units": sum(r.damaged_units for r in results),
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
    for row in summary.get("devices", []):
        lines.append(f"  {row['device']:<10}{row['images']:>8} images {row['errors']:>6} errors "
                     f"{row['images_per_s']:>9.1f} img/s" + (f"  FAILED: {row['failed']}" if row["failed"] else ""))
    if summary.get("damaged_units"):
        lines.append(f"{summary['damaged_units']} shard(s) or row group(s) could not be read to their end (a damaged "
                     "file or a remote read that failed after its retries): the rows before the damage are stored, "
                     "the rest is recorded under the shard's name (SourceDamage)")
    if summary["errors"]:
        lines.append(f"undecodable files are listed in {store.split_dir(summary['output_dir'], '<split>')}/"
                     f"{store.ERRORS}")
    for split, notes in summary.get("listing", {}).items():
        for what, items in notes.items():
            if items:
                shown = ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")
                lines.append(f"{split}: {len(items)} {NOTES.get(what, what)}: {shown}")
    return "\n".join(lines)
