"""WebDataset tar shards: members grouped into samples by key, each sample one record.

A shard is read once from start to end as a stream (`iter_members`, our own reader of POSIX/GNU/pax tar headers,
so that a corrupt header is an error where Python's tarfile ends the archive silently). WebDataset's rule: a
member's key is its path up to the first dot of its file name, the rest its extension (`dir/000012.seg.png` ->
key `dir/000012`, extension `seg.png`); the members of one sample are adjacent. The image is the first member whose
extension comes first in `image_extensions`; the label is the `cls` member (or a field of `json`); the caption is
the `txt` member. A row's path is `<shard name>/<key>` (a key met again later in the same shard:
`<shard name>/<key>@<member index>`).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO

from pipelines.sources import Record, SourceDamage, Unit, json_text
from pipelines.sources.storage import ReadFailedError, Storage

log = logging.getLogger(__name__)

BLOCK = 512
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "avif", "heic", "bmp", "gif", "tif", "tiff", "jxl", "ppm", "pgm")
_REGULAR = (b"0", b"\0", b"7")


@dataclass(frozen=True)
class Member:
    """One tar member: its path, its index in the shard and its bytes (None for what is not a regular file)."""

    name: str
    index: int
    data: bytes | None


class TarDamage(Exception):
    """The tar cannot be read past `offset` (the message says why)."""


def iter_members(stream: IO[bytes]) -> Iterator[Member]:
    """The members of a tar stream in order, read sequentially; `TarDamage` where the archive breaks."""
    offset, index, long_name, pax = 0, 0, None, {}
    while True:
        header = _read_exact(stream, BLOCK)
        if not header or header == bytes(BLOCK):
            return  # end of archive (two zero blocks, or a writer that left them out)
        if len(header) < BLOCK:
            raise TarDamage(f"truncated header at byte {offset}")
        if not _checksum_ok(header):
            raise TarDamage(f"corrupt header at byte {offset} (checksum mismatch)")
        size = int(pax.get("size", _number(header[124:136], offset)))
        kind = header[156:157]
        padded = -(-size // BLOCK) * BLOCK
        offset += BLOCK
        name = long_name or pax.get("path") or _header_name(header)
        if kind in (b"L", b"x", b"g", b"K"):  # long name, pax (per member / global), long link: about the next
            body = _read_exact(stream, padded)
            if len(body) < size:
                raise TarDamage(f"truncated extended header at byte {offset}")
            if kind == b"L":
                long_name = body[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax(body[:size])
            offset += padded
            continue
        data = _read_exact(stream, padded) if padded else b""
        if len(data) < size:
            raise TarDamage(f"truncated in member {name} (byte {offset + len(data)} of a member ending at "
                            f"{offset + size})")
        offset += padded
        yield Member(name, index, data[:size] if kind in _REGULAR else None)
        index, long_name, pax = index + 1, None, {}


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    chunks, left = [], size
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = int(header[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
    except ValueError:
        return False
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return stored == unsigned


def _number(field: bytes, offset: int) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    try:
        return int(field.replace(b"\0", b" ").strip() or b"0", 8)
    except ValueError:
        raise TarDamage(f"corrupt header at byte {offset} (size {field!r})") from None


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax(body: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(body):
        space = body.find(b" ", pos)
        if space < 0:
            break
        length = int(body[pos:space] or b"0")
        if length <= 0:
            break
        key, _, value = body[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension) of a member path: up to / after the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext if dot else ""


@dataclass(frozen=True)
class WebDatasetFormat:
    """How samples become records: image extensions in order of preference, the label's member (`cls`, or
    `json.<field>`; None: no label) and the columns kept (`key`, `caption` from `txt`, other names from `json`)."""

    image_extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    label: str | None = "cls"
    keep_columns: tuple[str, ...] = ()

    def units(self, files: Sequence[str], names: dict[str, str]) -> list[Unit]:
        return [Unit(id=names[f], url=f, name=names[f]) for f in files]

    def read(self, unit: Unit, storage: Storage) -> Iterator[Record]:
        """The unit's records in shard order; SourceDamage after the last good sample when the shard breaks."""
        try:
            with storage.open(unit.url, streaming=True) as raw:
                # Headers come 512 bytes at a time: one buffer's read serves many of them.
                buffered = io.BufferedReader(raw, buffer_size=1 << 20)
                stream = gzip.GzipFile(fileobj=buffered) if unit.url.endswith((".gz", ".tgz")) else buffered
                yield from self._samples(unit, iter_members(stream))
        except TarDamage as exc:
            raise SourceDamage(f"tar damaged: {exc}; the rest of the shard is lost") from exc
        except (ReadFailedError, OSError, EOFError) as exc:
            raise SourceDamage(f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc

    def _samples(self, unit: Unit, members: Iterator[Member]) -> Iterator[Record]:
        seen: set[str] = set()
        group: list[tuple[str, Member]] = []
        key = None
        try:
            for member in members:
                member_key, ext = split_key(member.name)
                if group and member_key != key:
                    yield self._record(unit, key, group, seen)
                    group = []
                key = member_key
                group.append((ext, member))
        except (TarDamage, OSError, EOFError):
            if group:  # the members read before the damage make their sample
                yield self._record(unit, key, group, seen)
            raise
        if group:
            yield self._record(unit, key, group, seen)

    def _record(self, unit: Unit, key: str, group: list[tuple[str, Member]], seen: set[str]) -> Record:
        path = f"{unit.id}/{key}" if key not in seen else f"{unit.id}/{key}@{group[0][1].index}"
        seen.add(key)
        members = {ext.lower(): m for ext, m in reversed(group)}  # the first of an extension wins
        label, extra, problem = self._label_and_columns(key, members)
        image = next((members[e] for e in self.image_extensions if e in members and members[e].data is not None),
                     None)
        if problem is None and image is None:
            found = ", ".join(ext or "(no extension)" for ext, _ in group)
            problem = f"no image member (members: {found}; image extensions: {', '.join(self.image_extensions)})"
        if problem is not None:
            return Record(path, label, error=problem, extra=extra)
        return Record(path, label, data=image.data, extra=extra)

    def _label_and_columns(self, key: str, members: dict[str, Member]) -> tuple[str | None, dict, str | None]:
        meta, problem = None, None
        if "json" in members and members["json"].data is not None:
            try:
                meta = json.loads(members["json"].data)
            except (ValueError, UnicodeDecodeError) as exc:
                problem = f"json member is not valid JSON ({exc})"
        meta = meta if isinstance(meta, dict) else {}
        label = None
        if self.label and self.label.startswith("json."):
            label = json_text(meta.get(self.label[5:]))
        elif self.label and self.label in members and members[self.label].data is not None:
            label = members[self.label].data.decode("utf-8", "replace").strip() or None
        extra = {}
        for column in self.keep_columns:
            if column == "key":
                extra[column] = key
            elif column == "caption" and "txt" in members and members["txt"].data is not None:
                extra[column] = members["txt"].data.decode("utf-8", "replace")
            else:
                extra[column] = json_text(meta.get(column))
        return label, extra, problem
