"""Parquet files with the image in a column: img2dataset's parquet output (`jpg`, binary) and Hugging Face
datasets (an `Image` feature: a struct of `bytes` and `path`; the path is read when the bytes are null).

Each row group is a unit, read alone (memory stays bounded whatever the file's size). A row's path is
`<file name>/<row index in the file>`. The label comes from a column (`label` by default); a `ClassLabel` in the
file's `huggingface` schema metadata turns its integers into the class names (-1, datasets' "no label", is None).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.sources import Failed, Record, SourceDamage, Unit, json_text
from pipelines.sources.storage import Storage

log = logging.getLogger(__name__)

# Binary columns taken for the image when `image_column` is auto, in this order (img2dataset names the column
# after the encode format).
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "bytes")


@dataclass(frozen=True)
class Columns:
    """What one file's schema gives: the image column and whether it is an Image struct, the label column and
    its class names (a ClassLabel's), the kept columns."""

    image: str
    struct: bool
    label: str | None
    names: tuple[str, ...] | None


@dataclass(frozen=True)
class ParquetFormat:
    """`image_column`: a column name, or 'auto' (an HF Image feature, else a binary column named in
    IMAGE_COLUMNS, else the only binary column); `label`: a column, 'auto' (`label` when present) or None."""

    image_column: str = "auto"
    label: str | None = "auto"
    keep_columns: tuple[str, ...] = ()

    def units(self, files: Sequence[str], names: dict[str, str], storage: Storage) -> list[Unit | Failed]:
        """One unit per row group of each file; a file whose footer or columns fail is one `Failed`."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:  # remote footers: one round trip each, overlapped
            per_file = list(pool.map(lambda f: self._file_units(f, names[f], storage), files))
        return [unit for units in per_file for unit in units]

    def _file_units(self, url: str, name: str, storage: Storage) -> list[Unit | Failed]:
        try:
            with storage.open(url) as stream:
                meta = pq.ParquetFile(stream).metadata
                self.columns(meta.schema.to_arrow_schema(), name)
        except SourceDamage as exc:
            return [Failed(name, str(exc))]
        except Exception as exc:  # noqa: BLE001 - not Parquet, truncated, unreachable: the file is one error record
            return [Failed(name, f"not a readable Parquet file: {type(exc).__name__}: {' '.join(str(exc).split())}")]
        units, first = [], 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            units.append(Unit(id=f"{name}/row_group={group}", url=url, name=name, row_group=group, rows=rows,
                              first_row=first))
            first += rows
        return units

    def columns(self, schema: pa.Schema, name: str) -> Columns:
        """The columns to read from a file of this schema; SourceDamage naming the file and its columns."""
        features = _features(schema)
        found = ", ".join(f"{f.name} ({f.type})" for f in schema)
        image = self._image_column(schema, features)
        if image is None:
            wanted = "an image column" if self.image_column == "auto" else f"image column {self.image_column!r}"
            raise SourceDamage(f"{name}: no {wanted} (binary, or an Image struct of bytes and path); columns: {found}")
        struct = pa.types.is_struct(schema.field(image).type)
        label = ("label" if "label" in schema.names else None) if self.label == "auto" else self.label
        missing = [c for c in ([label] if label else []) + list(self.keep_columns) if c not in schema.names]
        if missing:
            raise SourceDamage(f"{name}: no column {', '.join(map(repr, missing))}; columns: {found}")
        names = features.get(label, {}).get("names") if label else None
        return Columns(image, struct, label, tuple(names) if names else None)

    def _image_column(self, schema: pa.Schema, features: dict[str, Any]) -> str | None:
        def usable(field: pa.Field) -> bool:
            kind = field.type
            if pa.types.is_struct(kind):
                return kind.get_field_index("bytes") >= 0
            return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)

        if self.image_column != "auto":
            return self.image_column if self.image_column in schema.names and usable(
                schema.field(self.image_column)) else None
        hf = [n for n, f in features.items() if f.get("_type") == "Image" and n in schema.names]
        binary = [f.name for f in schema if usable(f)]
        named = [n for n in IMAGE_COLUMNS if n in binary]
        for choice in (hf, named, binary if len(binary) == 1 else []):
            if choice:
                return choice[0]
        return None

    def read(self, unit: Unit, storage: Storage) -> Iterator[Record]:
        """The row group's records in order; SourceDamage when the row group cannot be read."""
        try:
            with storage.open(unit.url) as stream:
                file = pq.ParquetFile(stream)
                cols = self.columns(file.schema_arrow, unit.name)
                wanted = list(dict.fromkeys([cols.image] + ([cols.label] if cols.label else []) +
                                            list(self.keep_columns)))
                table = file.read_row_group(unit.row_group, columns=wanted)
        except SourceDamage:
            raise
        except Exception as exc:  # noqa: BLE001 - a corrupt page, a failed read: the row group is one record
            last = unit.first_row + (unit.rows or 0) - 1
            raise SourceDamage(f"row group {unit.row_group} (rows {unit.first_row}-{last}) unreadable: "
                               f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
        yield from self._records(unit, table, cols, storage)

    def _records(self, unit: Unit, table: pa.Table, cols: Columns, storage: Storage) -> Iterator[Record]:
        images = table.column(cols.image).to_pylist()
        labels = table.column(cols.label).to_pylist() if cols.label else [None] * len(images)
        kept = {c: table.column(c).to_pylist() for c in self.keep_columns}
        for j, image in enumerate(images):
            path = f"{unit.name}/{unit.first_row + j}"
            label = _label(labels[j], cols.names)
            extra = {c: json_text(values[j]) for c, values in kept.items()}
            data, error = self._image_bytes(image, cols.struct, unit.url, storage)
            yield Record(path, label, data=data, error=error, extra=extra)

    def _image_bytes(self, image: Any, struct: bool, url: str, storage: Storage) -> tuple[bytes | None, str | None]:
        if struct:
            if image is None:
                return None, "no image (null)"
            if image.get("bytes") is not None:
                return image["bytes"], None
            if not image.get("path"):
                return None, "no image (bytes and path both null)"
            target = storage.join(url, image["path"])
            try:
                with storage.open(target) as f:
                    return f.read(), None
            except Exception as exc:  # noqa: BLE001 - a missing or unreadable file: this row's record
                return None, f"image path {image['path']!r} unreadable: {type(exc).__name__}: {exc}"
        if image is None:
            return None, "no image (null)"
        return image, None


def _features(schema: pa.Schema) -> dict[str, Any]:
    """The `datasets` features recorded in the schema metadata (`huggingface` key), by column; {} if none."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    features = info.get("info", {}).get("features", {}) if isinstance(info, dict) else {}
    return features if isinstance(features, dict) else {}


def _label(value: Any, names: tuple[str, ...] | None) -> str | None:
    if value is None:
        return None
    if names is not None and isinstance(value, int) and not isinstance(value, bool):
        if value == -1:
            return None
        return names[value] if 0 <= value < len(names) else str(value)
    return json_text(value) if not isinstance(value, (int, float)) else str(value)
