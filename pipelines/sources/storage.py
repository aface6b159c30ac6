"""Where shards live: data_files patterns (paths, globs, brace ranges, lists; local or fsspec URLs) -> files, and
reading them as one sequential stream that survives a failed remote read.

Knows nothing of formats, decoding or models. fsspec is imported where a URL needs it, so local paths cost no
import.
"""

from __future__ import annotations

import glob as globlib
import io
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pipelines.errors import UserError

log = logging.getLogger(__name__)

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_WILDCARD = re.compile(r"[*?\[]")
# Read failures that retrying will not mend: the file is not there, or not ours to read.
_FINAL = (FileNotFoundError, PermissionError, IsADirectoryError)


class ReadFailedError(OSError):
    """A shard could not be read to its end (after retries): the message names it, the byte and the reason."""


def is_url(path: str) -> bool:
    """Whether `path` names a file through a protocol (s3://, http://, hf://, ...) rather than a local path."""
    return bool(_URL.match(path)) and not path.startswith("file://")


def expand_braces(pattern: str) -> list[str]:
    """`a{0..2}b` -> a0b a1b a2b (zero padding kept: `{000..002}`), `a{x,y}` -> ax ay; nested as a shell does."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    numbers = _RANGE.match(body)
    if numbers:
        start, stop = int(numbers.group(1)), int(numbers.group(2))
        width = len(numbers.group(1)) if numbers.group(1).startswith("0") else 0
        step = 1 if stop >= start else -1
        choices = [str(n).zfill(width) for n in range(start, stop + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:  # not an expansion ({} or {x}): kept as written
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def fixed_prefix(pattern: str) -> str:
    """The folder part of `pattern` before its first brace or wildcard, ending with '/' (or '' for none)."""
    cut = min([m.start() for m in (_BRACE.search(pattern), _WILDCARD.search(pattern)) if m] + [len(pattern)])
    head = pattern[:cut]
    return head[: head.rfind("/") + 1]


@dataclass(frozen=True)
class Storage:
    """How to reach files: fsspec's options for URLs (`storage_options`), and how often to retry a failed read."""

    options: tuple[tuple[str, Any], ...] = ()
    retries: int = 3
    backoff_s: float = 0.5

    @classmethod
    def of(cls, storage_options: dict[str, Any] | None, *, retries: int = 3, backoff_s: float = 0.5) -> Storage:
        return cls(tuple(sorted((storage_options or {}).items())), retries, backoff_s)

    def filesystem(self, url: str) -> tuple[Any, str]:
        """(fsspec filesystem, its path) for a URL."""
        import fsspec

        return fsspec.core.url_to_fs(url, **dict(self.options))

    def expand(self, patterns: str | Sequence[str], *, key: str) -> list[str]:
        """Every file `patterns` names, sorted and unique; a local pattern that matches nothing is a UserError
        naming `key`. A remote name without wildcards is taken as written (a missing one is an error record)."""
        files: list[str] = []
        for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
            if not isinstance(pattern, str) or not pattern:
                raise UserError(f"{key}={pattern!r}: expected a path, a glob, a brace pattern or a list of them")
            for one in expand_braces(pattern):
                found = self._match(one)
                if not found:
                    raise UserError(f"{key}: {one} matches no file")
                files += found
        return sorted(set(files))

    def _match(self, pattern: str) -> list[str]:
        if not is_url(pattern):
            local = pattern.removeprefix("file://")
            if os.path.isdir(local):
                return [os.path.join(local, name) for name in sorted(os.listdir(local)) if not name.startswith(".")
                        and os.path.isfile(os.path.join(local, name))]
            if _WILDCARD.search(local):
                return [p for p in globlib.glob(local) if os.path.isfile(p)]
            return [local] if os.path.isfile(local) else []
        if not _WILDCARD.search(pattern):
            return [pattern]
        fs, path = self.filesystem(pattern)
        protocol = pattern.split("://", 1)[0]
        return [f"{protocol}://{p.split('://', 1)[-1]}" for p in fs.glob(path)]

    def open(self, url: str, *, streaming: bool = False) -> RetryingReader:
        """`url` as a binary stream that retries a failed read (`retries` times, with exponential backoff),
        resuming at the byte it had reached. `streaming`: read from start to end only, as one HTTP response
        (servers without range requests serve it too; a retry then reads up to the byte reached again)."""
        if not is_url(url):
            return RetryingReader(url, lambda: open(url, "rb"), retries=0, backoff_s=0)
        plain_http = streaming and url.startswith(("http://", "https://"))

        def opener() -> IO[bytes]:
            fs, path = self.filesystem(url)
            return fs.open(path, "rb", block_size=0) if plain_http else fs.open(path, "rb")

        return RetryingReader(url, opener, retries=self.retries, backoff_s=self.backoff_s)

    def join(self, base_file: str, relative: str) -> str:
        """A path named relative to `base_file`'s folder (an absolute one as it is)."""
        if is_url(relative) or relative.startswith("/"):
            return relative
        return base_file[: base_file.rfind("/") + 1] + relative


def relative_names(files: Sequence[str], patterns: str | Sequence[str]) -> dict[str, str]:
    """Each file's name relative to the patterns' common fixed prefix: the stable, traceable part of a row's path."""
    prefixes = [fixed_prefix(p) for p in ([patterns] if isinstance(patterns, str) else patterns)]
    common = os.path.commonprefix(prefixes)
    common = common[: common.rfind("/") + 1]
    return {f: f[len(common):] if f.startswith(common) else f for f in files}


class RetryingReader(io.RawIOBase):
    """A read-only binary stream over a file that may fail mid-way (a remote read): each failed `read` or `seek`
    is retried on a freshly opened file at the same position, up to `retries` times with exponential backoff;
    then ReadFailedError names the file, the byte and the reason."""

    def __init__(self, name: str, opener: Callable[[], IO[bytes]], *, retries: int, backoff_s: float) -> None:
        super().__init__()
        self.name, self._opener, self.retries, self.backoff_s = name, opener, retries, backoff_s
        self.pos = 0
        self._file: IO[bytes] | None = None
        self._call(lambda f: None)  # open now: a missing file fails here

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def read(self, size: int = -1) -> bytes:
        data = self._call(lambda f: f.read(size))
        self.pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = self._call(lambda f: f.seek(offset, whence))
        return self.pos

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close too
                pass
            self._file = None
        super().close()

    def _call(self, action: Callable[[IO[bytes]], Any]) -> Any:
        for attempt in range(self.retries + 1):
            try:
                if self._file is None:
                    self._file = self._opener()
                    if self.pos:
                        _seek_or_skip(self._file, self.pos)
                return action(self._file)
            except _FINAL:
                raise
            except Exception as exc:  # noqa: BLE001 - network stacks raise many types; all mean "try again"
                self._drop()
                if attempt == self.retries:
                    what = f"after {self.retries} retries" if self.retries else "no retry (a local file)"
                    raise ReadFailedError(f"{self.name}: read failed at byte {self.pos} ({what}): "
                                          f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
                delay = self.backoff_s * 2**attempt
                log.warning("%s: read failed at byte %d (%s); retrying in %.1f s", self.name, self.pos, exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except Exception:  # noqa: BLE001
                pass


def _seek_or_skip(file: IO[bytes], pos: int) -> None:
    """Move a freshly opened file to `pos`: a seek, or for a stream that cannot seek, reading up to it."""
    try:
        file.seek(pos)
        return
    except (ValueError, OSError, NotImplementedError):
        pass
    left = pos
    while left > 0:
        chunk = file.read(min(left, 1 << 20))
        if not chunk:
            raise EOFError(f"the file ended at byte {pos - left} on reopening, before byte {pos}")
        left -= len(chunk)


def local_path(name: str) -> Path | None:
    """The local path of a file name, or None for a URL."""
    return None if is_url(name) else Path(name.removeprefix("file://"))
