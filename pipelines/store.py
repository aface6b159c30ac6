"""The Parquet store: schema, atomic parts and their writer thread, errors file, resume state, reader, upgrade.

An output directory is itself a Parquet dataset, hive-partitioned by split: pandas, pyarrow, polars and duckdb
read it whole and get exactly the embedded rows with a `split` column. Bookkeeping has names those readers skip
(`_` or `.` prefix, or not `.parquet`):
    <output_dir>/_embeddings.json                   model metadata; a run with other settings is refused
    <output_dir>/split=<split>/part-*.parquet       path, label, embedding (fixed_size_list<float32>[D])
    <output_dir>/split=<split>/_errors.jsonl        one {"path", "label", "error"} per undecodable file
    <output_dir>/_summary.json, _summary-shard<i>of<n>.json   what each run did
    <output_dir>/.lock*                             the running jobs' locks (one writer per output and shard)
    <output_dir>-validation/                        pipelines.validate's default output, outside the dataset
`split_dir` is the one place that maps a split to its folder. Knows the schema and nothing of models.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import logging
import os
import queue
import re
import shlex
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import UserError

log = logging.getLogger(__name__)

METADATA_KEY = b"pipelines"
MANIFEST = "_embeddings.json"
SUMMARY = "_summary.json"
ERRORS = "_errors.jsonl"
PART_GLOB = "part-*.parquet"
PARTITION = "split"  # the hive partition key: <output_dir>/split=<name>/
VALIDATION_SUFFIX = "-validation"  # pipelines.validate's default output: the sibling <output_dir>-validation/
VALIDATION_FILES = ("report.json", "per_class.csv", "predictions.parquet", "per_class.png")
LOCK_PREFIX = ".lock"
UPGRADE_COMMAND = "python -m pipelines.upgrade"
# The layout before 0.2.0: <split>/part-*.parquet, <split>/errors.jsonl, embeddings.json, summary*.json and
# validation/ inside the output directory. `upgrade_layout` converts it in place.
LEGACY_MANIFEST, LEGACY_ERRORS, LEGACY_VALIDATION = "embeddings.json", "errors.jsonl", "validation"
LEGACY_SUMMARIES = ("summary.json", "summary-*.json")
# Settings that must agree for two runs to share one output directory.
IDENTITY_KEYS = ("model", "revision", "embedding_dim", "dtype", "image_size", "preprocess", "columns")

# Every name this project writes under an output directory, and nothing else: `overwrite=true` deletes an output
# directory only when each entry in it matches. The one place to change when the layout changes.
#   files: patterns of the top-level files; hidden names are locks and temporary files (write, fsync, rename)
#   folders: a folder's name pattern -> the patterns of the files it may hold (no subfolders); first match wins
OWN_FILES = (MANIFEST, SUMMARY, "_summary-*.json", ".*")
OWN_FOLDERS = {
    f"{PARTITION}=*": (PART_GLOB, ERRORS, ".*"),  # a split folder
}


class StoreMismatchError(UserError):
    """The output directory holds embeddings made with other settings."""


class CorruptPartError(UserError):
    """A committed part cannot be read (truncated, overwritten, not Parquet)."""


class OutputBusyError(UserError):
    """Another job holds the lock of this output directory and shard."""


class OldLayoutError(UserError):
    """The output directory is in the layout before 0.2.0; `python -m pipelines.upgrade DIR` converts it."""


class UnsafeOutputError(UserError):
    """`output_dir` overlaps the dataset, or `overwrite` would delete something this project did not write."""


def split_dir(output_dir: str | Path, split: str) -> Path:
    """The folder of one split's parts and errors file: `<output_dir>/split=<split>` (a hive partition).

    '%' and '=' in the name are percent-encoded, which every reader of hive partitions decodes back; a name that
    cannot be a folder under the dataset root is refused (UserError).
    """
    if not isinstance(split, str) or split in ("", ".", "..") or "/" in split or "\0" in split:
        raise UserError(f"split {split!r}: expected the name of a folder under the dataset root")
    return Path(output_dir) / f"{PARTITION}={split.replace('%', '%25').replace('=', '%3D')}"


def summary_path(output_dir: str | Path, *, shard_index: int, shard_count: int) -> Path:
    """`_summary.json`, or `_summary-shard<i>of<n>.json` for one shard of several."""
    name = SUMMARY if shard_count == 1 else f"_summary-shard{shard_index}of{shard_count}.json"
    return Path(output_dir) / name


def sibling_dir(embeddings_dir: str | Path, suffix: str, *, instead: str = "output_dir=") -> Path:
    """The folder `<embeddings_dir><suffix>` beside the embeddings (outside their Parquet dataset, so that
    `**/*.parquet` readers of the embeddings never meet another table): where validate, zeroshot and search put
    what they derive. `instead`: the setting that names another folder, told when the name has no folder name."""
    out = Path(embeddings_dir)
    if out.name in ("", ".", ".."):
        out = out.resolve()  # '.', '..', 'a/..': name the folder itself
    if not out.name:
        raise UserError(f"embeddings_dir={embeddings_dir} has no folder name to put '{suffix}' after; "
                        f"give {instead}")
    return out.with_name(out.name + suffix)


def validation_dir(output_dir: str | Path) -> Path:
    """pipelines.validate's default output: the sibling `<output_dir>-validation`."""
    return sibling_dir(output_dir, VALIDATION_SUFFIX, instead="output_dir= for the validation outputs")


def _legacy_split(folder: Path) -> bool:
    """A split folder of the old layout: parts or an errors file directly under a plain `<split>/` folder."""
    return (any(folder.glob(PART_GLOB)) or (folder / LEGACY_ERRORS).is_file()
            or (folder / ERRORS).is_file())  # an upgrade stopped between renaming the errors file and the folder


def legacy_entries(output_dir: str | Path) -> list[str]:
    """Entries of the layout before 0.2.0 directly under `output_dir` (folders end in '/'); [] when none."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for entry in sorted(out.iterdir()):
        if entry.name.startswith((".", "_", f"{PARTITION}=")):
            continue
        if entry.is_dir() and not entry.is_symlink():
            if _legacy_split(entry) or (entry.name == LEGACY_VALIDATION
                                        and any((entry / f).exists() for f in VALIDATION_FILES)):
                found.append(f"{entry.name}/")
        elif entry.name == LEGACY_MANIFEST or any(fnmatch.fnmatchcase(entry.name, p) for p in LEGACY_SUMMARIES):
            found.append(entry.name)
    return found


def check_layout(output_dir: str | Path) -> None:
    """Refuse an output directory in the layout before 0.2.0 (OldLayoutError: one line saying how to convert)."""
    legacy = legacy_entries(output_dir)
    if legacy:
        shown = ", ".join(legacy[:3]) + (", ..." if len(legacy) > 3 else "")
        raise OldLayoutError(f"{output_dir} is in the layout before version 0.2 ({shown}); convert it in place "
                             f"with `{UPGRADE_COMMAND} {shlex.quote(str(output_dir))}` (renames only), then rerun")


def schema(dim: int, metadata: dict[str, Any] | None = None, *, columns: Sequence[str] = (),
           label_nullable: bool = False) -> pa.Schema:
    """path: string, label: string (null allowed for sources without labels), embedding:
    fixed_size_list<float32>[dim], then the source's kept `columns` (string, nullable); metadata as JSON."""
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=label_nullable),
        pa.field("embedding", pa.list_(pa.field("item", pa.float32(), nullable=False), dim), nullable=False),
        *(pa.field(name, pa.string()) for name in columns),
    ]
    meta = {METADATA_KEY: json.dumps(metadata).encode()} if metadata is not None else None
    return pa.schema(fields, metadata=meta)


def to_table(paths: Sequence[str], labels: Sequence[str | None], embeddings: np.ndarray, metadata: dict[str, Any],
             *, extra: dict[str, Sequence[str | None]] | None = None, label_nullable: bool = False) -> pa.Table:
    """float32 [N, D] embeddings plus their paths, labels and kept columns (`extra`) -> a table in the schema."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    dim = embeddings.shape[1]
    flat = pa.array(embeddings.reshape(-1), type=pa.float32())
    column = pa.FixedSizeListArray.from_arrays(flat, dim)
    extra = extra or {}
    return pa.Table.from_arrays(
        [pa.array(paths, pa.string()), pa.array(labels, pa.string()), column,
         *(pa.array(values, pa.string()) for values in extra.values())],
        schema=schema(dim, metadata, columns=list(extra), label_nullable=label_nullable),
    )


# OS errors a user causes (and can fix) while the store writes: reported as one line naming the folder.
_WRITE_ERRNOS = {errno.ENOSPC: "no space left on device (ENOSPC)", errno.EDQUOT: "disk quota exceeded (EDQUOT)",
                 errno.EROFS: "read-only file system (EROFS)", errno.EACCES: "permission denied (EACCES)",
                 errno.EPERM: "operation not permitted (EPERM)",
                 errno.ENOTDIR: "a file stands where a folder is needed (ENOTDIR)",
                 errno.EEXIST: "a file stands where a folder is needed (EEXIST)",
                 errno.EISDIR: "a folder stands where a file is needed (EISDIR)"}
RESUMES = "then rerun: the parts already written are kept and the job resumes"


class StoreWriteError(UserError):
    """The output folder cannot take more data: disk full, quota, read-only, permissions."""


@contextlib.contextmanager
def writing(folder: Path, *, cleanup: Path | None = None, then: str = RESUMES) -> Iterator[None]:
    """Turn a user-fixable OS error while writing into `folder` into StoreWriteError (its message ends with
    `then`, what to do after the fix); `cleanup` is removed then."""
    try:
        yield
    except OSError as exc:
        if cleanup is not None:
            with contextlib.suppress(OSError):
                cleanup.unlink(missing_ok=True)
        reason = _WRITE_ERRNOS.get(exc.errno or 0)
        if reason is None:
            raise
        raise StoreWriteError(f"{reason} writing to {folder}: make room or fix it (or choose another output_dir), "
                              f"{then}") from exc


def write_part(split_dir: Path, table: pa.Table, *, prefix: str) -> Path:
    """Write one part atomically: a temporary file in the same folder, fsync, then rename."""
    final = split_dir / f"part-{prefix}-{uuid.uuid4().hex[:12]}.parquet"
    tmp = split_dir / f".{final.name}.tmp"
    with writing(split_dir, cleanup=tmp):
        split_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            use_dictionary=["label"],
            column_encoding={"path": "PLAIN", "embedding": "BYTE_STREAM_SPLIT"},
        )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    return final


class PartWriter:
    """Buffers rows and writes parts of `rows_per_part` in a background thread; `close` flushes."""

    def __init__(self, split_dir: Path, *, metadata: dict[str, Any], rows_per_part: int, prefix: str,
                 columns: Sequence[str] = (), label_nullable: bool = False) -> None:
        self.split_dir, self.metadata, self.rows_per_part, self.prefix = split_dir, metadata, rows_per_part, prefix
        self.columns, self.label_nullable = tuple(columns), label_nullable
        self.write_s = 0.0
        self._buffer: list[tuple[list[str], list[str], np.ndarray, list[dict[str, str | None]] | None]] = []
        self._rows = 0
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="parquet-writer", daemon=True)
        self._thread.start()

    def add(self, paths: list[str], labels: list[str | None], embeddings: np.ndarray,
            extra: list[dict[str, str | None]] | None = None) -> None:
        """Queue rows: paths, labels [N], float32 embeddings [N, D] and each row's kept columns (`columns`)."""
        if self._error is not None:
            raise RuntimeError("Parquet writer failed") from self._error
        self._buffer.append((paths, labels, embeddings, extra))
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
                rows = [row for c in chunks for row in (c[3] or [{}] * len(c[0]))]
                table = to_table(
                    [p for c in chunks for p in c[0]],
                    [label for c in chunks for label in c[1]],
                    np.concatenate([c[2] for c in chunks]),
                    self.metadata,
                    extra={name: [row.get(name) for row in rows] for name in self.columns},
                    label_nullable=self.label_nullable,
                )
                write_part(self.split_dir, table, prefix=self.prefix)
                self.write_s += time.perf_counter() - start
            except BaseException as exc:  # noqa: BLE001 - surfaced by add/close in the main thread
                self._error = exc


def append_errors(split_dir: Path, errors: Iterable[dict[str, str]]) -> None:
    """Append error records (path, label, error) to the split's errors file, durably."""
    lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors)
    if not lines:
        return
    with writing(split_dir):
        split_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(split_dir / ERRORS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)


def read_errors(split_dir: Path) -> list[dict[str, str]]:
    """The split's error records, one per path (a line torn by a crash is ignored and retried)."""
    path = Path(split_dir) / ERRORS
    if not path.exists():
        return []
    seen: dict[str, dict[str, str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        seen.setdefault(record["path"], record)
    return list(seen.values())


def parts(split_dir: Path) -> list[Path]:
    """Committed parts of a split, sorted by name."""
    return sorted(Path(split_dir).glob(PART_GLOB))


def done_paths(split_dir: Path) -> set[str]:
    """Paths already embedded or recorded as errors: a resumed run skips these."""
    done = {e["path"] for e in read_errors(split_dir)}
    for part in parts(split_dir):
        done.update(read_part(part, columns=["path"]).column("path").to_pylist())
    return done


def read_part(part: Path, *, columns: list[str] | None = None) -> pa.Table:
    """One committed part; a truncated or foreign file raises CorruptPartError naming it and what to do."""
    try:
        return pq.read_table(part, columns=columns)
    except PermissionError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise _corrupt(part, exc) from exc


def remove_stale_tmp(split_dir: Path, prefix: str) -> None:
    """Delete temporary files a killed run with this prefix left behind."""
    for tmp in Path(split_dir).glob(f".part-{prefix}-*.tmp"):
        tmp.unlink(missing_ok=True)


def prepare_output(output_dir: Path, metadata: dict[str, Any], *, overwrite: bool,
                   protected: Sequence[Path] = ()) -> None:
    """Create or check the output directory's manifest; refuse one written with other settings.

    `overwrite` first empties the directory, only when `check_overwrite` finds nothing but our files in it.
    """
    output_dir = Path(output_dir)
    check_layout(output_dir)
    if overwrite:
        clear_output(output_dir, protected=protected)
    with writing(output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
    manifest = output_dir / MANIFEST
    if manifest.exists():
        try:
            existing = json.loads(manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptPartError(f"{manifest} is not valid JSON ({exc}); it records the settings of the "
                                   "embeddings here: restore it, or start over with overwrite=true") from exc
        check_same(existing, metadata, what=str(output_dir),
                   hint="use another output_dir, or overwrite=true to start over")
        return
    write_json(manifest, metadata)


def foreign_entries(output_dir: Path) -> list[str]:
    """Entries under `output_dir` (relative, POSIX) that match none of OWN_FILES / OWN_FOLDERS."""
    foreign = []
    for entry in sorted(Path(output_dir).iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            allowed = next((files for pattern, files in OWN_FOLDERS.items()
                            if fnmatch.fnmatchcase(entry.name, pattern)), None)
            if allowed is None:
                foreign.append(f"{entry.name}/")
                continue
            foreign += [f"{entry.name}/{inner.name}" for inner in sorted(entry.iterdir())
                        if inner.is_dir() or not any(fnmatch.fnmatchcase(inner.name, p) for p in allowed)]
        elif not any(fnmatch.fnmatchcase(entry.name, p) for p in OWN_FILES):
            foreign.append(entry.name)
    return foreign


def is_inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies under it (both resolved)."""
    return path == folder or folder in path.parents


def check_location(output_dir: Path, *, root: Path, splits: Sequence[str]) -> None:
    """Refuse an output directory whose split folders would overlap the dataset's (UnsafeOutputError)."""
    out, data = Path(output_dir).resolve(), Path(root).resolve()
    if out == data:
        raise UnsafeOutputError(f"output_dir={output_dir} is the dataset root (dataset.root={root}): the parts "
                                "would be written among the images; choose another output_dir")
    for split in splits:
        ours = split_dir(out, split)
        if is_inside(ours, data / split) or is_inside(data / split, ours):
            raise UnsafeOutputError(f"output_dir={output_dir}: its {ours.name}/ folder and the dataset's "
                                    f"{data / split} overlap (the parts would be listed as images); "
                                    "choose an output_dir outside the dataset's split folders")


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


def check_overwrite(output_dir: Path, *, protected: Sequence[Path] = ()) -> None:
    """Refuse `overwrite=true` unless `output_dir` is absent or an output directory this project made.

    Made by us: the manifest is there and every entry matches OWN_FILES / OWN_FOLDERS. Never the filesystem
    root, the home directory or a folder above it, nor a folder holding any of `protected` (the dataset root).
    """
    output_dir = Path(output_dir)
    if not output_dir.exists() and not output_dir.is_symlink():
        return
    out, home = output_dir.resolve(), Path.home().resolve()
    refuse = f"overwrite=true refuses to delete output_dir={output_dir}"
    if out == Path(out.anchor) or is_inside(home, out):
        what = ("the filesystem root" if out == Path(out.anchor) else
                "your home directory" if out == home else "a folder holding your home directory")
        raise UnsafeOutputError(f"{refuse}: it is {what}; choose another output_dir")
    for folder in protected:
        if is_inside(Path(folder).resolve(), out):
            raise UnsafeOutputError(f"{refuse}: it holds the dataset ({folder}); choose another output_dir")
    if not output_dir.is_dir() or output_dir.is_symlink():
        raise UnsafeOutputError(f"{refuse}: it is not a folder this project made; remove it yourself or choose "
                                "another output_dir")
    entries = [e for e in output_dir.iterdir() if not e.name.startswith(LOCK_PREFIX)]
    if entries and not (output_dir / MANIFEST).is_file():
        raise UnsafeOutputError(f"{refuse}: it has no {MANIFEST}, so pipelines.embed did not make it; remove it "
                                "yourself or choose another output_dir")
    foreign = foreign_entries(output_dir)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UnsafeOutputError(f"{refuse}: it holds files this project did not write ({shown}); move them "
                                "out, or choose another output_dir")


def clear_output(output_dir: Path, *, protected: Sequence[Path] = ()) -> None:
    """Empty an output directory this project made (see `check_overwrite`), keeping the running jobs' locks."""
    check_overwrite(output_dir, protected=protected)
    if not Path(output_dir).is_dir():
        return
    with writing(Path(output_dir)):
        for entry in Path(output_dir).iterdir():
            if entry.name.startswith(LOCK_PREFIX):
                continue  # deleting a held lock file would let a second job lock a new one
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def differences(a: dict[str, Any], b: dict[str, Any], *, where: tuple[str, str] = ("there", "now")) -> list[str]:
    """One 'key: a where[0], b where[1]' line per identity setting on which two metadata dicts differ."""
    return [f"{k}: {a.get(k)!r} {where[0]}, {b.get(k)!r} {where[1]}" for k in IDENTITY_KEYS if a.get(k) != b.get(k)]


def check_same(existing: dict[str, Any], new: dict[str, Any], *, what: str, hint: str = "") -> None:
    """Raise StoreMismatchError naming every identity setting that differs (and `hint`, what to do)."""
    diffs = differences(existing, new)
    if diffs:
        raise StoreMismatchError(
            f"{what} holds embeddings made with other settings ({'; '.join(diffs)})" + (f"; {hint}" if hint else "")
        )


@dataclass
class Split:
    """One split read back: paths and labels [N], float32 embeddings [N, D], the footer metadata."""

    paths: list[str]
    labels: list[str]
    embeddings: np.ndarray
    metadata: dict[str, Any]


def _corrupt(part: Path, exc: BaseException) -> CorruptPartError:
    # pyarrow's message repeats the path ("Could not open Parquet input source '...': "): keep the reason only.
    reason = re.sub(r"^Could not open Parquet input source '.*?': ", "", (str(exc) or type(exc).__name__).splitlines()[0])
    return CorruptPartError(f"{part} is not a readable part ({reason}); delete it and rerun the embed job: "
                            "its rows are embedded again")


def check_unique(paths: Sequence[str], *, where: str) -> None:
    """Refuse a split holding a path more than once (CorruptPartError naming the count and an example)."""
    counts = Counter(paths)
    twice = [p for p, n in counts.items() if n > 1]
    if twice:
        extra = sum(counts[p] - 1 for p in twice)
        raise CorruptPartError(f"{where} holds {len(twice)} path(s) more than once ({extra} duplicate rows, e.g. "
                               f"{min(twice)}); two jobs wrote into it at once: embed it again with "
                               "overwrite=true")


def read_metadata(part: Path) -> dict[str, Any]:
    """The project's footer metadata of one part."""
    try:
        meta = pq.read_schema(part).metadata or {}
    except PermissionError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise _corrupt(part, exc) from exc
    if METADATA_KEY not in meta:
        raise StoreMismatchError(f"{part}: no '{METADATA_KEY.decode()}' footer metadata; not written by this project")
    return json.loads(meta[METADATA_KEY])


def read_split(output_dir: str | Path, split: str) -> Split:
    """All rows of a split, sorted by path; refuses parts whose metadata disagree, and the old layout."""
    check_layout(output_dir)
    folder = split_dir(output_dir, split)
    found = parts(folder)
    if not found:
        raise FileNotFoundError(f"no {PART_GLOB} under {folder}")
    metadata = read_metadata(found[0])
    for part in found[1:]:
        check_same(metadata, read_metadata(part), what=str(part))
    tables = [read_part(part) for part in found]
    meta = tables[0].schema.metadata
    table = pa.concat_tables([t.replace_schema_metadata(meta) for t in tables]).sort_by("path")
    check_unique(table.column("path").to_pylist(), where=str(folder))
    return Split(
        paths=table.column("path").to_pylist(),
        labels=table.column("label").to_pylist(),
        embeddings=embedding_matrix(table.column("embedding"), metadata["embedding_dim"]),
        metadata=metadata,
    )


def embedding_matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    """fixed_size_list<float32>[dim] column -> float32 [N, dim] (flatten() respects slice offsets)."""
    if column.num_chunks == 0:
        return np.empty((0, dim), np.float32)
    chunks = [chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim) for chunk in column.chunks]
    return np.concatenate(chunks).astype(np.float32, copy=False)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with writing(path.parent, cleanup=tmp):
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)


# Lock descriptors this process holds. A forked child (a DataLoader worker, a decoder process) closes its copies:
# an flock belongs to the open file, so a child outliving a kill -9 of the job would otherwise keep it held.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


@dataclass
class OutputLock:
    """The held locks of one job on an output directory: released by `release` or when the process dies."""

    path: Path
    fds: list[int]

    def __post_init__(self) -> None:
        _HELD.update(self.fds)

    def release(self) -> None:
        for fd in self.fds:
            _HELD.discard(fd)
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the last descriptor drops the flock
        self.fds = []


def _open_lock(path: Path) -> int:
    with writing(path.parent):
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _try_flock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(path: Path) -> str:
    """The pid a lock file names ('unknown' when it names none)."""
    with contextlib.suppress(OSError, ValueError):
        return str(int(path.read_text().split()[0]))
    return "unknown"


def lock_output(output_dir: Path, *, shard_index: int, shard_count: int) -> OutputLock:
    """Hold `output_dir`'s lock for this shard for the life of the job (fcntl.flock: dies with the process).

    A second job on the same shard, or any job on this directory with another `shard_count` (their shares of
    the files overlap), is refused with OutputBusyError naming the holder's pid. Shards of one count coexist.
    Lock files are hidden (`.lock*`), so Parquet readers skip them.
    """
    output_dir = Path(output_dir)
    with writing(output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
    mutex = _open_lock(output_dir / LOCK_PREFIX)
    fds: list[int] = []
    try:
        fcntl.flock(mutex, fcntl.LOCK_EX)  # held for milliseconds: makes the checks below one step across jobs
        count_fd = _open_lock(output_dir / f"{LOCK_PREFIX}-count{shard_count}")
        fds.append(count_fd)
        fcntl.flock(count_fd, fcntl.LOCK_SH)
        _refuse_other_counts(output_dir, shard_count)
        shard_path = output_dir / f"{LOCK_PREFIX}-shard{shard_index}of{shard_count}"
        shard_fd = _open_lock(shard_path)
        fds.append(shard_fd)
        if not _try_flock(shard_fd, fcntl.LOCK_EX):
            raise OutputBusyError(f"output_dir={output_dir} shard {shard_index} of {shard_count} is being written "
                                  f"by another job (pid {_holder(shard_path)}); wait for it to finish, or stop it")
        os.ftruncate(shard_fd, 0)
        os.pwrite(shard_fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        os.close(mutex)
    return OutputLock(output_dir, fds)


def _refuse_other_counts(output_dir: Path, shard_count: int) -> None:
    """Raise OutputBusyError when a job with another shard count holds this directory (caller holds the mutex)."""
    for other in sorted(output_dir.glob(f"{LOCK_PREFIX}-count*")):
        if other.name == f"{LOCK_PREFIX}-count{shard_count}":
            continue
        fd = os.open(other, os.O_RDWR | os.O_CLOEXEC)
        try:
            if _try_flock(fd, fcntl.LOCK_EX):
                continue  # nobody holds it: a finished job's file
        finally:
            os.close(fd)
        count = other.name.removeprefix(f"{LOCK_PREFIX}-count")
        pids = sorted({_holder(p) for p in output_dir.glob(f"{LOCK_PREFIX}-shard*of{count}") if _is_held(p)})
        raise OutputBusyError(f"output_dir={output_dir} is being written by a job with shard.count={count} "
                              f"(pid {', '.join(pids) or 'unknown'}); shards of one output must share one "
                              f"shard.count: wait for it, or use shard.count={count}")


def _is_held(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        return not _try_flock(fd, fcntl.LOCK_EX)
    finally:
        os.close(fd)


def rows_in(split_dir: Path, names: Iterable[str]) -> int:
    """Rows of the named parts of a split, from their footers (cheap; unreadable parts count 0)."""
    total = 0
    for name in names:
        with contextlib.suppress(pa.ArrowException, OSError):
            total += pq.read_metadata(Path(split_dir) / name).num_rows
    return total


def _upgrade_plan(out: Path) -> list[tuple[Path, Path]]:
    """The renames that bring `out` from the layout before 0.2.0 to this one, in a safe order: inside a split
    folder first, then the folder; the manifest last (until it moves, the folder still reads as the old layout)."""
    plan: list[tuple[Path, Path]] = []
    entries = legacy_entries(out)
    for name in entries:
        entry = out / name.rstrip("/")
        if not name.endswith("/"):
            continue
        if _legacy_split(entry):
            if (entry / LEGACY_ERRORS).is_file():
                plan.append((entry / LEGACY_ERRORS, entry / ERRORS))
            plan.append((entry, split_dir(out, entry.name)))
        else:
            plan.append((entry, validation_dir(out)))  # the old validate output: out of the dataset
    for name in entries:
        if not name.endswith("/") and name != LEGACY_MANIFEST:
            plan.append((out / name, out / f"_{name}"))
    if (out / LEGACY_MANIFEST).is_file():
        plan.append((out / LEGACY_MANIFEST, out / MANIFEST))
    return plan


@contextlib.contextmanager
def _no_job_writing(out: Path) -> Iterator[None]:
    """Hold `out`'s mutex (a job starting now waits at `lock_output`), refusing while any job holds a lock."""
    mutex = _open_lock(out / LOCK_PREFIX)
    try:
        fcntl.flock(mutex, fcntl.LOCK_EX)
        held = [p for p in sorted(out.glob(f"{LOCK_PREFIX}-*")) if p.is_file() and _is_held(p)]
        if held:
            pids = sorted({_holder(p) for p in held if "-shard" in p.name}) or ["unknown"]
            raise OutputBusyError(f"{out} is being written by a job (pid {', '.join(pids)}); wait for it to "
                                  "finish, or stop it, then convert it")
        yield
    finally:
        os.close(mutex)


def upgrade_layout(output_dir: str | Path) -> list[tuple[Path, Path]]:
    """Convert an output directory of the layout before 0.2.0 in place, by renames only; the renames done.

    Safe to rerun after an interruption (each rename is atomic, done ones are not planned again); refused while a
    job holds the directory's lock, and before any rename when a target already exists (UserError).
    """
    out = Path(output_dir)
    if not out.is_dir():
        raise UserError(f"{out}: no such folder")
    with _no_job_writing(out):
        plan = _upgrade_plan(out)
        taken = [dst for _, dst in plan if dst.exists() or dst.is_symlink()]
        if taken:
            raise UserError(f"cannot convert {out}: {taken[0]} exists already (beside "
                            f"{next(src for src, dst in plan if dst == taken[0])}); move one of them away, then rerun")
        with writing(out, then="then rerun the conversion"):
            for src, dst in plan:
                try:
                    os.rename(src, dst)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    raise UserError(f"cannot move {src} to {dst}: another file system (EXDEV); move it yourself, "
                                    "then rerun the conversion") from exc
                log.info("renamed %s -> %s", src, dst)
            for folder in {out.parent, *(d for _, dst in plan for d in (dst, dst.parent) if d.is_dir())}:
                _fsync_dir(folder)
    return plan


def _fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
