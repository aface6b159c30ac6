"""`dataset=files`: shards named by `data_files` patterns per split, in a format found from their extension
(`.tar`/`.tar.gz`/`.tgz`: WebDataset; `.parquet`: a column of images) or given, on any storage fsspec reaches."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.errors import UserError
from pipelines.sources import Failed, Record, Unit
from pipelines.sources.parquet import ParquetFormat
from pipelines.sources.storage import Storage, relative_names
from pipelines.sources.webdataset import IMAGE_EXTENSIONS, WebDatasetFormat

log = logging.getLogger(__name__)

FORMATS = ("auto", "webdataset", "parquet")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass
class Listing:
    """A split's units, the files that yield none (`failed`), and the files not read (`ignored`, with why)."""

    units: list[Unit]
    failed: list[Failed] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def notes(self) -> dict[str, list[str]]:
        return {"unreadable_files": [f"{f.id}: {f.error}" for f in self.failed], "ignored_files": self.ignored}


@dataclass(frozen=True)
class FileSource:
    """The shards of each split (`data_files`: split -> patterns), how to reach them and how to read them."""

    data_files: tuple[tuple[str, tuple[str, ...]], ...]
    storage: Storage
    format: str = "auto"
    webdataset: WebDatasetFormat = WebDatasetFormat()
    parquet: ParquetFormat = ParquetFormat()

    @classmethod
    def build(cls, *, data_files: Mapping[str, str | Sequence[str] | None], storage_options: dict[str, Any] | None,
              format: str, image_extensions: Sequence[str], image_column: str, label: str | None,
              keep_columns: Sequence[str], retries: int) -> FileSource:
        """From the `dataset=files` settings; a bad value is a UserError naming its key."""
        if format not in FORMATS:
            raise UserError(f"dataset.format={format!r}: expected one of {', '.join(FORMATS)}")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise UserError(f"dataset.retries={retries!r}: expected a whole number of at least 0")
        given = {split: ((p,) if isinstance(p, str) else tuple(p)) for split, p in data_files.items() if p}
        if not given:
            raise UserError("dataset.data_files: no split given; e.g. "
                            "'dataset.data_files.train=/data/{00000..00009}.tar'")
        keep = tuple(keep_columns or ())
        wds_label = None if label in (None, "none") else ("cls" if label == "auto" else label)
        return cls(tuple(sorted(given.items())), Storage.of(storage_options, retries=retries), format,
                   WebDatasetFormat(tuple(e.lower().lstrip(".") for e in image_extensions), wds_label, keep),
                   ParquetFormat(image_column, None if label in (None, "none") else label, keep))

    @property
    def splits(self) -> list[str]:
        return [split for split, _ in self.data_files]

    @property
    def keep_columns(self) -> tuple[str, ...]:
        return self.webdataset.keep_columns

    def patterns(self, split: str) -> tuple[str, ...]:
        found = dict(self.data_files).get(split)
        if found is None:
            raise UserError(f"splits: {split!r} has no dataset.data_files.{split} (given: {', '.join(self.splits)})")
        return found

    def list(self, split: str) -> Listing:
        """The split's units: every shard's (tar) or row group's (Parquet), in file order."""
        patterns = self.patterns(split)
        files = self.storage.expand(patterns, key=f"dataset.data_files.{split}")
        names = relative_names(files, patterns)
        tars = [f for f in files if f.endswith(TAR_SUFFIXES)]
        parquets = [f for f in files if f.endswith(".parquet")]
        kind = self.format if self.format != "auto" else ("webdataset" if tars else "parquet")
        chosen = files if self.format != "auto" else (tars if kind == "webdataset" else parquets)
        ignored = [names[f] for f in files if f not in chosen]
        if ignored:  # img2dataset writes a .parquet and a _stats.json of metadata beside each tar
            log.info("%s: %d file(s) that are not %s shards not read (e.g. %s)", split, len(ignored), kind,
                     ignored[0])
        if not chosen:
            raise UserError(f"dataset.data_files.{split}: no .tar or .parquet file among {len(files)} matched "
                            f"(e.g. {names[files[0]]}); set dataset.format=webdataset or parquet to read them as such")
        if kind == "webdataset":
            return Listing(self.webdataset.units(chosen, names), [], ignored)
        listed = self.parquet.units(chosen, names, self.storage)
        return Listing([u for u in listed if isinstance(u, Unit)], [u for u in listed if isinstance(u, Failed)],
                       ignored)

    def read(self, unit: Unit) -> Iterator[Record]:
        """The unit's records in order (SourceDamage where it breaks)."""
        fmt = self.parquet if unit.row_group is not None else self.webdataset
        return fmt.read(unit, self.storage)

    def read_row(self, path: str) -> Record:
        """The record a stored row's `path` names, read again from its shard (a tar up to the sample, a Parquet
        file's row group holding the row); LookupError when no shard of the source holds it."""
        for split in self.splits:
            patterns = self.patterns(split)
            files = self.storage.expand(patterns, key=f"dataset.data_files.{split}")
            for url, name in relative_names(files, patterns).items():
                if path.startswith(name + "/"):
                    return self._row_in(url, name, path)
        raise LookupError(f"{path}: no shard of the source holds it")

    def _row_in(self, url: str, name: str, path: str) -> Record:
        if url.endswith(".parquet"):
            index = path[len(name) + 1:]
            if not index.isdigit():
                raise LookupError(f"{path}: not a row of {name}")
            for unit in self.parquet.units([url], {url: name}, self.storage):
                if isinstance(unit, Unit) and unit.first_row <= int(index) < unit.first_row + (unit.rows or 0):
                    return next(r for r in self.parquet.read(unit, self.storage) if r.path == path)
            raise LookupError(f"{path}: {name} has no such row")
        unit = self.webdataset.units([url], {url: name})[0]
        for record in self.webdataset.read(unit, self.storage):
            if record.path == path:
                return record
        raise LookupError(f"{path}: {name} has no such sample")

    @classmethod
    def recorded(cls, described: dict[str, Any], *, storage_options: dict[str, Any] | None = None) -> FileSource:
        """The source an embed output's manifest describes (`describe`), with the storage options given now (the
        manifest never holds them)."""
        return cls.build(data_files=described["data_files"], storage_options=storage_options,
                         format=described.get("format", "auto"),
                         image_extensions=described.get("image_extensions", list(IMAGE_EXTENSIONS)),
                         image_column=described.get("image_column", "auto"), label=described.get("label", "auto"),
                         keep_columns=described.get("keep_columns", []), retries=3)

    def describe(self) -> dict[str, Any]:
        """What the manifest records of the source (no storage options: they may hold credentials)."""
        return {"format": self.format, "data_files": {split: list(p) for split, p in self.data_files},
                "keep_columns": list(self.keep_columns), "image_extensions": list(self.webdataset.image_extensions),
                "image_column": self.parquet.image_column, "label": self.parquet.label or "none"}
