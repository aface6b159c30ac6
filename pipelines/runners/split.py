"""What every runner shares: the job's settings, and one split's bookkeeping (resume state, errors, stats)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tqdm import tqdm

from pipelines import store
from pipelines.store import PartWriter

if TYPE_CHECKING:
    from pipelines.data import ImageRecord
    from pipelines.siglip import EncoderSpec
    from pipelines.sources import Failed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """What every runner receives: the job's settings (conf/embed.yaml, checked by `pipelines.runners.settings`).

    `encoder` describes the checkpoint; a runner loads it where it computes (the local runner in this process,
    the Ray runner in its actors). `num_workers`: decode workers, or 'auto' (the runner's choice).
    `max_pixels`: larger images are error records ("too large: WxH"), refused from their header; None: no limit.
    `compile`: torch.compile the model for `batch_size` (the last, smaller batch is padded, nothing recompiles).
    """

    encoder: EncoderSpec
    root: Path
    output_dir: Path
    prefix: str  # part names' shard prefix, e.g. shard0of1
    batch_size: int
    num_workers: int | str
    rows_per_part: int
    progress: bool
    max_pixels: int | None
    compile: bool
    # A shard source's kept columns (stored as text after the embedding) and whether its labels may be missing.
    columns: tuple[str, ...] = ()
    label_nullable: bool = False
    # Threads of an encoder on the CPU: the cores this process may use, less its busy decode workers (None: torch's
    # default). More would oversubscribe the cores, which collapses speed when another program competes.
    threads: int | None = None


DAMAGED = "SourceDamage:"  # the reason's start for a unit not read to its end
INVALID_NAME = "file name is not valid UTF-8 (Parquet and JSON cannot hold it): rename the file to embed it"


class Runner(Protocol):
    """A runner embeds each split's records not yet in `job.output_dir` and returns each split's stats."""

    def __call__(self, job: Job, splits: Mapping[str, list[ImageRecord]]) -> list[SplitStats]: ...


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
    # Shard units (a tar, a row group, a file) not read to their end: recorded whole under their own name.
    damaged_units: int = 0

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 2)}


def start_split(
    output_dir: Path, split: str, records: list[ImageRecord], prefix: str
) -> tuple[Path, list[ImageRecord], SplitStats]:
    """What a runner has left to do in `output_dir/split`: (split folder, records not yet done, stats so far).

    Clears this prefix's temporary files a killed run left; embedded and recorded-as-error paths are done.
    """
    split_dir = store.split_dir(output_dir, split)
    store.remove_stale_tmp(split_dir, prefix)
    done = store.done_paths(split_dir)
    todo = [r for r in records if r.path not in done]
    return split_dir, todo, SplitStats(split=split, listed=len(records), already_done=len(records) - len(todo))


def write_split(
    split_dir: Path, stats: SplitStats, total: int, *, metadata: dict[str, Any], rows_per_part: int, prefix: str,
    progress: bool, fill: Callable[[PartWriter, tqdm], None], columns: tuple[str, ...] = (),
    label_nullable: bool = False,
) -> SplitStats:
    """Run `fill(writer, bar)`, which adds `total` images' rows (None: not known up front), then flush the parts;
    times go into `stats`. `columns`, `label_nullable`: see `Job`."""
    writer = PartWriter(split_dir, metadata=metadata, rows_per_part=rows_per_part, prefix=prefix, columns=columns,
                        label_nullable=label_nullable)
    bar = tqdm(total=total, desc=f"embed {stats.split}", unit="img", disable=not progress, dynamic_ncols=True)
    if PROGRESS_COUNTER is not None:
        bar = _Counted(bar, PROGRESS_COUNTER)
    start = time.perf_counter()
    try:
        fill(writer, bar)
    finally:
        bar.close()
        writer.close()
    stats.write_s = writer.write_s
    stats.wall_s = time.perf_counter() - start
    return stats


# Set in a device's process of a multi-device job (`pipelines.runners.multi`): a shared count of rows done, which
# the job's one progress bar shows.
PROGRESS_COUNTER: Any = None


class _Counted:
    """A progress bar whose updates are also added to a shared counter."""

    def __init__(self, bar: tqdm, counter: Any) -> None:
        self.bar, self.counter = bar, counter

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        with self.counter.get_lock():
            self.counter.value += n

    def close(self) -> None:
        self.bar.close()


def record_errors(split_dir: Path, failures: Iterable[tuple[str, str, str]], stats: SplitStats) -> None:
    """Log and append (path, label, reason) failures to the split's errors file; count them in `stats`."""
    errors = []
    for path, label, reason in failures:
        log.warning("skipped %s: %s", path, reason)
        errors.append({"path": path, "label": label, "error": reason})
    store.append_errors(split_dir, errors)
    stats.errors += len(errors)
    stats.damaged_units += sum(e["error"].startswith(DAMAGED) for e in errors)


def record_invalid_names(split_dir: Path, invalid: list[ImageRecord]) -> int:
    """Add the files whose names cannot be stored to the split's errors file (once); returns how many were new."""
    if not invalid:
        return 0
    known = {e["path"] for e in store.read_errors(split_dir)}
    new = [{"path": r.path, "label": r.label, "error": INVALID_NAME} for r in invalid if r.path not in known]
    store.append_errors(split_dir, new)
    return len(new)


def record_unreadable(split_dir: Path, failed: list[Failed]) -> int:
    """Add a shard source's files that yield no unit (no image column, an unreadable footer) to the split's errors
    file (once, under the file's name); returns how many were new."""
    if not failed:
        return 0
    known = {e["path"] for e in store.read_errors(split_dir)}
    new = [{"path": f.id, "label": None, "error": f"{DAMAGED} {f.error}"} for f in failed if f.id not in known]
    for entry in new:
        log.warning("skipped %s: %s", entry["path"], entry["error"])
    store.append_errors(split_dir, new)
    return len(new)
