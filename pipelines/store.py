"""The Parquet store: schema, atomic part writer, errors file, resume state, reader.

Layout under an output directory:
    <output_dir>/embeddings.json            model metadata; a run with other settings is refused
    <output_dir>/<split>/part-*.parquet     path, label, embedding (fixed_size_list<float32>[D])
    <output_dir>/<split>/errors.jsonl       one {"path", "label", "error"} per undecodable file
    <output_dir>/summary*.json              what each run did
Knows the schema and nothing of models.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

METADATA_KEY = b"pipelines"
MANIFEST = "embeddings.json"
ERRORS = "errors.jsonl"
PART_GLOB = "part-*.parquet"
# Settings that must agree for two runs to share one output directory.
IDENTITY_KEYS = ("model", "revision", "embedding_dim", "dtype", "image_size", "preprocess")


class StoreMismatchError(ValueError):
    """The output directory holds embeddings made with other settings."""


def schema(dim: int, metadata: dict[str, Any] | None = None) -> pa.Schema:
    """path: string, label: string, embedding: fixed_size_list<float32>[dim]; metadata as JSON."""
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.field("item", pa.float32(), nullable=False), dim), nullable=False),
    ]
    meta = {METADATA_KEY: json.dumps(metadata).encode()} if metadata is not None else None
    return pa.schema(fields, metadata=meta)


def to_table(paths: Sequence[str], labels: Sequence[str], embeddings: np.ndarray, metadata: dict[str, Any]) -> pa.Table:
    """float32 [N, D] embeddings plus their paths and labels -> a table with the store's schema."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    dim = embeddings.shape[1]
    flat = pa.array(embeddings.reshape(-1), type=pa.float32())
    column = pa.FixedSizeListArray.from_arrays(flat, dim)
    return pa.Table.from_arrays(
        [pa.array(paths, pa.string()), pa.array(labels, pa.string()), column], schema=schema(dim, metadata)
    )


def write_part(split_dir: Path, table: pa.Table, *, prefix: str) -> Path:
    """Write one part atomically: a temporary file in the same folder, fsync, then rename."""
    split_dir.mkdir(parents=True, exist_ok=True)
    final = split_dir / f"part-{prefix}-{uuid.uuid4().hex[:12]}.parquet"
    tmp = split_dir / f".{final.name}.tmp"
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


def append_errors(split_dir: Path, errors: Iterable[dict[str, str]]) -> None:
    """Append error records (path, label, error) to the split's errors file, durably."""
    lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors)
    if not lines:
        return
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
        done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
    return done


def remove_stale_tmp(split_dir: Path, prefix: str) -> None:
    """Delete temporary files a killed run with this prefix left behind."""
    for tmp in Path(split_dir).glob(f".part-{prefix}-*.tmp"):
        tmp.unlink(missing_ok=True)


def prepare_output(output_dir: Path, metadata: dict[str, Any], *, overwrite: bool) -> None:
    """Create or check the output directory's manifest; refuse one written with other settings."""
    output_dir = Path(output_dir)
    if overwrite and output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = output_dir / MANIFEST
    if manifest.exists():
        existing = json.loads(manifest.read_text())
        check_same(existing, metadata, what=str(output_dir),
                   hint="use another output_dir, or overwrite=true to start over")
        return
    tmp = output_dir / f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(metadata, indent=2))
    os.replace(tmp, manifest)


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


def read_metadata(part: Path) -> dict[str, Any]:
    """The project's footer metadata of one part."""
    meta = pq.read_schema(part).metadata or {}
    if METADATA_KEY not in meta:
        raise StoreMismatchError(f"{part}: no '{METADATA_KEY.decode()}' footer metadata; not written by this project")
    return json.loads(meta[METADATA_KEY])


def read_split(output_dir: str | Path, split: str) -> Split:
    """All rows of a split, sorted by path; refuses parts whose metadata disagree."""
    split_dir = Path(output_dir) / split
    found = parts(split_dir)
    if not found:
        raise FileNotFoundError(f"no {PART_GLOB} under {split_dir}")
    metadata = read_metadata(found[0])
    for part in found[1:]:
        check_same(metadata, read_metadata(part), what=str(part))
    table = pq.read_table(found, schema=pq.read_schema(found[0])).sort_by("path")
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
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
