"""A dataset row's image, for the explore app: the one place that reads image bytes, and its thumbnails.

Only rows of the dataset are served: a path is first looked up among the embedded rows (`RowIndex`, independent of
where the bytes live), then read through `ImageStore.read`. For folder datasets the file is `dataset_root/path`,
refused (`ImageRefused`: the app answers 404) when the path is absolute, holds `..`, a NUL or a backslash, or when
its real path (symlinks resolved) lies outside the dataset root and the `allowed_roots` (a subset of symlinks
points into its source: `subset.json` names it). Thumbnails are decoded with `pipelines.data.decode` (the pixel
limit, from the header, before any pixel), resized and encoded as JPEG: the file's own bytes are never sent.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from pipelines.errors import UserError

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 * 2**20  # larger files are refused without reading them (no image row is that big)
SUBSET_SETTINGS = "subset.json"  # pipelines.subset's record of the folder its symlinks point into


class ImageRefused(UserError):
    """A requested image that is not served: not a row, unsafe, gone, or unreadable (the app: 404 / 400)."""

    def __init__(self, message: str, *, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


def safe_relative(path: str) -> PurePosixPath:
    """A row path as stored (relative, '/'-separated); ImageRefused (400) for anything that could leave the root."""
    if not path or "\x00" in path or "\\" in path:
        raise ImageRefused("path: empty, or holds a NUL or a backslash", status=400)
    rel = PurePosixPath(path)
    if rel.is_absolute() or ".." in rel.parts or path.startswith("~"):
        raise ImageRefused(f"path {path!r}: absolute or leaves the dataset (..)", status=400)
    return rel


def subset_source(dataset_root: Path) -> Path | None:
    """The folder a `pipelines.subset` dataset links into (its subset.json `source`), else None."""
    settings = dataset_root / SUBSET_SETTINGS
    if not settings.is_file():
        return None
    try:
        source = json.loads(settings.read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(source) if source else None


@dataclass
class ImageStore:
    """Reads the image bytes of a row path of a folder dataset (see the module docstring for the checks)."""

    dataset_root: Path
    allowed_roots: Sequence[Path] = ()
    _real_roots: list[Path] = field(init=False)

    def __post_init__(self) -> None:
        roots = [self.dataset_root, *self.allowed_roots]
        self._real_roots = [Path(os.path.realpath(r)) for r in roots]

    def read(self, path: str) -> bytes:
        """The file's bytes; ImageRefused (400 unsafe, 404 outside the roots or missing, 413 too big)."""
        rel = safe_relative(path)
        real = Path(os.path.realpath(self.dataset_root / rel))
        if not any(real == root or root in real.parents for root in self._real_roots):
            log.warning("refused %s: it resolves to %s, outside the dataset", path, real)
            raise ImageRefused(f"path {path!r}: not a file of the dataset")
        try:
            with open(real, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_FILE_BYTES:
                    raise ImageRefused(f"path {path!r}: {size} bytes, more than {MAX_FILE_BYTES}", status=413)
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ImageRefused(f"path {path!r}: the file is gone") from exc
        except PermissionError as exc:
            raise ImageRefused(f"path {path!r}: cannot be read") from exc


@dataclass
class ShardImageStore:
    """Reads the image bytes of a row of a shard source (`dataset=files`: tars, Parquet; local or remote), from
    the shard that holds it (`FileSource.read_row`). The app has checked that the path is a row of the dataset."""

    source: object  # pipelines.sources.files.FileSource

    def read(self, path: str) -> bytes:
        """The row's image bytes; ImageRefused (404) when its shard no longer holds it or holds no image."""
        try:
            record = self.source.read_row(path)
        except LookupError as exc:
            raise ImageRefused(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - a damaged or unreachable shard: this image is not served
            raise ImageRefused(f"path {path!r}: its shard cannot be read ({type(exc).__name__}: {exc})") from exc
        if record.data is None:
            raise ImageRefused(f"path {path!r}: {record.error}")
        if len(record.data) > MAX_FILE_BYTES:
            raise ImageRefused(f"path {path!r}: {len(record.data)} bytes, more than {MAX_FILE_BYTES}", status=413)
        return record.data


def thumbnail(data: bytes, *, size: int, max_pixels: int | None, quality: int = 85) -> bytes:
    """Encoded image bytes -> JPEG bytes whose longer side is at most `size` (never enlarged); DecodeError."""
    from PIL import Image

    from pipelines.data import decode

    pixels = decode(data, max_pixels=max_pixels)  # uint8 [3, H, W], the pixel limit from the header
    image = Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()))
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


class ThumbnailCache:
    """The most recently served thumbnails, by (path, size): a grid of results asks again for the same ones."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple[str, int], value: bytes) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
