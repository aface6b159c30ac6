"""Sources: where a split's images come from, behind one interface. One module per format:

- `folder`: class folders on a local disk (`root/<split>/<class>/<file>`), listed file by file (`pipelines.data`
  walks them; the local runner reads each file as its own unit);
- `webdataset`: tar shards, samples grouped by key (img2dataset's output, LAION, DataComp);
- `parquet`: Parquet files with the image bytes in a column (img2dataset's parquet output, Hugging Face datasets).

A shard source lists *units* (a tar shard, a Parquet row group) and reads each one sequentially into `Record`s:
the row's `path` (unique, stable, traceable: `<file relative to the patterns' fixed prefix>/<key or row index>`),
its label (None when the source has none), the encoded image bytes or the reason there are none, and the columns
kept (`keep_columns`). Everything after the read (decoding, the pixel limit, preprocessing, the encoder, the
store, resume, error records) is the same for every source. Storage (local paths, s3://, http(s)://, hf://, ...)
is `storage.Storage`'s business; the formats see only streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Record:
    """One image as a source read it: `data` (encoded bytes) or `error` (why there is no image), never both."""

    path: str
    label: str | None
    data: bytes | None = None
    error: str | None = None
    extra: dict[str, str | None] = field(default_factory=dict, compare=False, hash=False)

    def without_data(self) -> Record:
        return Record(self.path, self.label, None, self.error, self.extra)


@dataclass(frozen=True)
class Unit:
    """What one reader takes whole and reads from start to end: a tar shard, or one row group of a Parquet file.

    `id` is the unit's own name (a row's path starts with it; a unit-wide failure is recorded under it); `url`
    the file; `rows` how many records it holds when the format says so up front (Parquet), else None.
    """

    id: str
    url: str
    name: str
    row_group: int | None = None
    rows: int | None = None
    first_row: int = 0


class SourceDamage(Exception):
    """A unit stops being readable part-way (a truncated tar, a corrupt row group, a failed remote read): what was
    read before stands, the rest of the unit is recorded under the unit's id with this message."""


@dataclass(frozen=True)
class Failed:
    """A file that yields no unit at all (no image column, an unreadable footer): recorded under `id`."""

    id: str
    error: str


def json_text(value: Any) -> str | None:
    """A kept column's value as text: strings as they are, None as None, anything else as JSON."""
    import json

    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return json.dumps(value, ensure_ascii=False, default=str)
