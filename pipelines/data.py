"""Files -> decoded, resized uint8 tensors: listing, sharding, decoding, a Dataset and its collate.

Two ways to read: `ImageFolderDataset` decodes and resizes in the DataLoader's workers (the default);
`EncodedImageDataset` leaves JPEGs encoded for `EncodedBatch.decoded`, which decodes a whole batch on the
encoder's device (nvjpeg on CUDA) for hosts with few cores.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time
import warnings
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from pipelines.errors import UserError
from pipelines.siglip import Preprocess

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
T = TypeVar("T")


# PIL's decompression-bomb threshold (about 89.5 megapixels): the default pixel limit of `decode`.
DEFAULT_MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89478485
_PIL_LIMIT_LOCK = threading.Lock()
# ISO base media files (AVIF, HEIC) carry "ftyp" at offset 4; torchvision may read those where PIL cannot.
_ISO_BMFF_AT = (4, b"ftyp")
# PIL decodes EPS by running Ghostscript on the file: a PostScript program from the dataset would run. Not opened.
_PIL_REFUSED = frozenset({"EPS"})


@dataclass(frozen=True)
class ImageRecord:
    """One image file: `path` relative to the dataset root (POSIX separators), `label` its class folder."""

    path: str
    label: str


class DecodeError(UserError):
    """The bytes are not an image that can be decoded (the message is the reason, one line)."""


@dataclass
class Listing:
    """What a split folder holds: the image records, and what is not a class's image (paths relative to root).

    `stray_files`: files lying directly in the split folder (no class); `empty_classes`: class folders
    without a file; `skipped_dirs`: directories reached a second time (a symlink loop, or two links to one
    folder), not walked again; `invalid_names`: files or folders whose names are not valid UTF-8, which
    Parquet and JSON cannot hold (their paths shown with `\\xNN` escapes), not walked or read.
    """

    records: list[ImageRecord]
    stray_files: list[str]
    empty_classes: list[str]
    skipped_dirs: list[str]
    invalid_names: list[ImageRecord] = field(default_factory=list)

    def shard(self, *, index: int, count: int) -> Listing:
        """This shard's records and invalid names (`take_shard`); the notes as they are."""
        return replace(self, records=take_shard(self.records, index=index, count=count),
                       invalid_names=take_shard(self.invalid_names, index=index, count=count))

    def notes(self) -> dict[str, list[str]]:
        """What the listing found besides the records, for the summary (invalid names as their paths)."""
        return {"stray_files": list(self.stray_files), "empty_classes": list(self.empty_classes),
                "skipped_dirs": list(self.skipped_dirs), "invalid_names": [r.path for r in self.invalid_names]}


def scan_split(root: str | Path, split: str) -> Listing:
    """All files under `root/split/<class>/` (sorted by path), each real directory walked once.

    Symlinks are followed (the subset builder links files), but a directory already walked, by its device
    and inode, is skipped: `self -> .` or `up -> ..` end instead of looping. Hidden files and folders are
    skipped; stray files, empty classes and skipped directories are returned and logged as warnings.
    """
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"dataset split folder {split_dir} does not exist")
    seen = {_dir_key(split_dir)}
    listing = Listing([], [], [], [])
    for entry in _entries(split_dir, root, None, listing):
        rel = Path(entry.path).relative_to(root).as_posix()
        if not _is_dir(entry):
            listing.stray_files.append(rel)
            continue
        before = len(listing.records)
        if _walk_class(Path(entry.path), root, entry.name, seen, listing) and len(listing.records) == before:
            listing.empty_classes.append(rel)
    listing.records.sort(key=lambda r: r.path)
    listing.invalid_names.sort(key=lambda r: r.path)
    for what, paths in (("file(s) outside any class folder, not embedded", listing.stray_files),
                        ("empty class folder(s)", listing.empty_classes),
                        ("folder(s) reached twice (symlink loop or duplicate link), walked once",
                         listing.skipped_dirs),
                        ("name(s) not valid UTF-8, not embedded (rename them)",
                         [r.path for r in listing.invalid_names])):
        if paths:
            log.warning("%s: %d %s: %s", split_dir, len(paths), what, ", ".join(paths[:10])
                        + (f" (and {len(paths) - 10} more)" if len(paths) > 10 else ""))
    return listing


def list_split(root: str | Path, split: str) -> list[ImageRecord]:
    """The image records of `scan_split(root, split)`."""
    return scan_split(root, split).records


def _walk_class(class_dir: Path, root: Path, label: str, seen: set[tuple[int, int]], listing: Listing) -> bool:
    """Add the files under `class_dir` to `listing`; False when the class folder itself was seen before."""
    stack = [class_dir]
    walked_class = False
    while stack:
        folder = stack.pop()
        key = _dir_key(folder)
        if key in seen:
            listing.skipped_dirs.append(folder.relative_to(root).as_posix())
            continue
        seen.add(key)
        walked_class = walked_class or folder == class_dir
        subdirs = []
        for entry in _entries(folder, root, label, listing):
            if _is_dir(entry):
                subdirs.append(Path(entry.path))
            else:  # files, file links (followed when read), broken links (an error record when read)
                listing.records.append(ImageRecord(Path(entry.path).relative_to(root).as_posix(), label))
        stack.extend(reversed(subdirs))
    return walked_class


def _entries(folder: Path, root: Path, label: str | None, listing: Listing) -> list[os.DirEntry]:
    """The visible entries of `folder`, sorted; a name that is not valid UTF-8 goes to `listing.invalid_names`
    (with `label`, or its own name for a class folder: `label` None)."""
    with os.scandir(folder) as it:
        visible = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    valid = []
    for entry in visible:
        try:
            entry.name.encode("utf-8")
            valid.append(entry)
        except UnicodeEncodeError:  # undecodable bytes arrive as surrogates (os.fsdecode)
            rel = Path(entry.path).relative_to(root).as_posix()
            listing.invalid_names.append(ImageRecord(_printable(rel), _printable(label or entry.name)))
    return valid


def _printable(name: str) -> str:
    """A file system name with undecodable bytes -> valid UTF-8 text, each such byte written as `\\xNN`."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def _dir_key(folder: Path) -> tuple[int, int]:
    st = folder.stat()
    return st.st_dev, st.st_ino


def shard_of(path: str, count: int) -> int:
    """The shard a path belongs to: stable across machines, runs and listing order."""
    return zlib.crc32(path.encode("utf-8")) % count


def take_shard(records: list[ImageRecord], *, index: int, count: int) -> list[ImageRecord]:
    """The records of shard `index` of `count` (0-based)."""
    if count < 1 or not 0 <= index < count:
        raise UserError(f"shard.index={index}, shard.count={count}: need 0 <= index < count")
    if count == 1:
        return list(records)
    return [r for r in records if shard_of(r.path, count) == index]


def decode(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Encoded image bytes -> uint8 [3, H, W] RGB (the first frame of an animation).

    The header is read first (PIL's lazy open: format and size, no pixels), so an image above `max_pixels`
    (None: no limit) is refused before any memory is spent on it. JPEG is decoded by torchvision
    (libjpeg-turbo: fast, and what the preprocessing was validated with), falling back to PIL for the JPEGs it
    refuses; every other format by PIL, which reports a truncated or corrupt file as an error where
    torchvision's PNG decoder can crash the process (docs/robustness.md). Images with more than 8 bits per
    sample are scaled to 8 bits as a viewer shows them (`to_rgb8`), not clipped. Any failure is a
    `DecodeError` whose message is the reason.
    """
    if not data:
        raise DecodeError("empty file")
    try:
        return _decode(data, max_pixels)
    except DecodeError:
        raise
    except MemoryError as exc:
        raise DecodeError("out of memory while decoding") from exc
    except Exception as exc:  # decoders raise many types for bad bytes; the job wants one
        raise DecodeError(f"cannot decode image: {_one_line(exc)}") from exc


def _decode(data: bytes, max_pixels: int | None) -> torch.Tensor:
    size = jpeg_size(data) if data.startswith(JPEG_MAGIC) else None
    if size is not None:  # the common case, without PIL: its header parse costs ~6% of a JPEG's decode
        check_size(*size, max_pixels)
        try:
            return _decode_jpeg_whole(data)
        except RuntimeError:
            pass  # CMYK with an unusual transform, arithmetic coding, truncated, ...: PIL below, or its error
    try:
        pil = open_header(data)
    except UnidentifiedImageError as exc:
        if data[_ISO_BMFF_AT[0]:_ISO_BMFF_AT[0] + 4] == _ISO_BMFF_AT[1]:  # HEIC and the like
            size = bmff_size(data)
            if size is None:
                raise DecodeError("not an image (an ISO BMFF file without an image size)") from exc
            check_size(*size, max_pixels)
            return _decode_torchvision(data, max_pixels)
        raise DecodeError("not an image (no format PIL or torchvision reads)") from exc
    with pil:
        width, height = pil.size
        check_size(width, height, max_pixels)
        if pil.format == "PNG":
            check_png_data(data, width, height)
        if pil.format in ("JPEG", "MPO"):  # MPO: a camera's JPEG with extra frames
            try:
                return _decode_jpeg_whole(data)
            except RuntimeError:
                pass  # CMYK with an unusual transform, arithmetic coding, ...: PIL below, or its error
        return pil_to_tensor(pil)


# libjpeg's warning when the entropy-coded data ends before the last block: it fills the rest of the image with
# gray and reports success, so the warning is the only sign that rows are missing.
_JPEG_DATA_MISSING = b"premature end of"


def _decode_jpeg_whole(data: bytes) -> torch.Tensor:
    """torchvision's JPEG decoder, refusing (DecodeError) an image it completed with gray for missing data.

    libjpeg writes that warning to the process's stderr and nothing else tells of it: stderr is pointed at a pipe
    for the call (a few system calls), and what it caught is passed on to the real stderr."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # a full pipe drops the rest of a message, never blocks the decoder
    saved = os.dup(2)
    try:
        os.dup2(write_end, 2)
        try:
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        finally:
            os.dup2(saved, 2)
            os.close(write_end)
        os.set_blocking(read_end, False)
        try:
            said = os.read(read_end, 65536)
        except BlockingIOError:
            said = b""
    finally:
        os.close(saved)
        os.close(read_end)
    if _JPEG_DATA_MISSING in said.lower():
        raise DecodeError(f"truncated JPEG: {said.decode('utf-8', 'replace').strip().splitlines()[0]} "
                          "(the decoder filled the missing rows with gray)")
    if said:
        os.write(2, said)
    return image


# JPEG start-of-frame markers (baseline, progressive, lossless, ...), which carry the image size; C4, C8 and CC
# are other markers in that range.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment, or None when the markers do not lead to one."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF_MARKERS:
            if pos + 9 > end:
                return None
            height = int.from_bytes(data[pos + 5:pos + 7], "big")
            width = int.from_bytes(data[pos + 7:pos + 9], "big")
            return (width, height) if width and height else None
        if length < 2:
            return None
        pos += 2 + length
    return None


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def check_png_data(data: bytes, width: int, height: int) -> None:
    """Refuse a PNG whose image data holds fewer rows than its header declares (DecodeError).

    PIL decodes such a file without a word, the missing rows black; libpng crashes on some. The IDAT chunks are
    inflated (no more than the header's size) and their length compared with what the header promises.
    """
    pos, ihdr, inflater, got = 8, None, zlib.decompressobj(), 0
    expected = None
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR" and len(body) >= 13:
            ihdr = body
            expected = _png_data_size(width, height, bit_depth=body[8], colour=body[9], interlace=body[12])
        elif kind == b"IDAT" and expected is not None:
            got += len(inflater.decompress(body, max(1, expected + 1 - got)))
            if got >= expected:
                return
        elif kind == b"IEND":
            break
    if ihdr is None or expected is None:
        return  # not a PNG this check understands: the decoder gives its own verdict
    raise DecodeError(f"truncated PNG: its image data holds {got} of the {expected} bytes its {width}x{height} "
                      "header declares (rows missing)")


def _png_data_size(width: int, height: int, *, bit_depth: int, colour: int, interlace: int) -> int | None:
    """Bytes of filtered image data a PNG header declares (one filter byte per row), or None if unknown."""
    channels = _PNG_CHANNELS.get(colour)
    if channels is None:
        return None
    bits = channels * bit_depth
    if not interlace:
        return height * (1 + (width * bits + 7) // 8)
    total = 0
    for x0, y0, dx, dy in _ADAM7:
        pass_w, pass_h = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if pass_w > 0 and pass_h > 0:
            total += pass_h * (1 + (pass_w * bits + 7) // 8)
    return total


def bmff_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first `ispe` property of an ISO BMFF image (HEIC, AVIF), or None."""
    at = data.find(b"ispe")
    if at < 4 or at + 16 > len(data):
        return None
    width, height = int.from_bytes(data[at + 8:at + 12], "big"), int.from_bytes(data[at + 12:at + 16], "big")
    return (width, height) if width and height else None


def open_header(data: bytes) -> Image.Image:
    """PIL's lazy open (format, mode, size; no pixels read), without PIL's own bomb check: `check_size` is ours.

    Formats PIL decodes with an outside program (EPS: Ghostscript) are refused."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return _refuse_unsafe(Image.open(io.BytesIO(data)))
        except Image.DecompressionBombError:
            pass  # above twice PIL's threshold: open again unchecked to learn the size
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return _refuse_unsafe(Image.open(io.BytesIO(data)))
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _refuse_unsafe(pil: Image.Image) -> Image.Image:
    if pil.format in _PIL_REFUSED:
        pil.close()
        raise DecodeError(f"{pil.format} is not decoded (PIL would run an outside program on the file)")
    return pil


def check_size(width: int, height: int, max_pixels: int | None) -> None:
    """Raise `DecodeError('too large: WxH (limit N pixels)')` when width * height exceeds `max_pixels`."""
    if max_pixels is not None and width * height > max_pixels:
        raise DecodeError(f"too large: {width}x{height} (limit {max_pixels} pixels)")


def _decode_torchvision(data: bytes, max_pixels: int | None) -> torch.Tensor:
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        raise DecodeError("not an image (no format PIL or torchvision reads)") from exc
    image = image[0] if image.ndim == 4 else image
    check_size(image.shape[-1], image.shape[-2], max_pixels)
    if image.dtype != torch.uint8:
        image = (image.to(torch.int32) >> 8).to(torch.uint8)  # 16-bit: the high byte, as to_rgb8 does
    return image


def pil_to_tensor(pil: Image.Image) -> torch.Tensor:
    """A PIL image (its first frame) -> uint8 [3, H, W] RGB; `OSError` on a truncated or corrupt file."""
    pil.load()
    array = torch.from_numpy(to_rgb8(pil))
    return array.permute(2, 0, 1)  # [3, H, W] view of the [H, W, 3] array: resize reads it channels-last


def to_rgb8(pil: Image.Image) -> np.ndarray:
    """A loaded PIL image -> uint8 [H, W, 3] RGB, with samples wider than 8 bits scaled, not clipped.

    - 16-bit integer samples (PIL modes I;16*; 16-bit RGB/RGBA PNGs, which PIL reads as their high byte):
      v >> 8, the high byte, so 65535 -> 255 and 32768 -> 128: what libpng's strip-16, PIL's own 16-bit
      colour decoding and torchvision's `to_dtype(..., scale=True)` give.
    - 32-bit integer (mode I): taken as 16-bit data (the common case: 16-bit scans in 32-bit containers):
      clipped to [0, 65535], then v >> 8.
    - 32-bit float (mode F): taken as [0, 1] (the float image convention): round(clip(v, 0, 1) * 255);
      NaN -> 0.
    Grayscale is repeated into the three channels; alpha is dropped (as `convert("RGB")` does).
    """
    mode = pil.mode
    if mode.startswith("I;16") or mode == "I":
        gray = np.asarray(pil).astype(np.int64)
        gray = (np.clip(gray, 0, 65535) >> 8).astype(np.uint8)
    elif mode == "F":
        values = np.nan_to_num(np.asarray(pil, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        gray = np.rint(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
    else:
        return np.array(pil if mode == "RGB" else pil.convert("RGB"), dtype=np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_one_line_text(exc)}"


def _one_line_text(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or "no message"


def read_file(path: Path, load: Callable[[bytes], T]) -> tuple[T | None, str | None]:
    """(`load(path's bytes)`, None), or (None, the reason for the errors file): a file that cannot be read,
    decoded or resized is a record ("DecodeError: too large: ..."), never an exception. Both runners read so."""
    try:
        return load(path.read_bytes()), None
    except Exception as exc:  # noqa: BLE001 - DecodeError, OSError, a resize failure: a record, the worker lives
        return None, failure_reason(exc)


def failure_reason(exc: BaseException) -> str:
    """An errors-file reason: the exception's type and its message on one line."""
    return f"{type(exc).__name__}: {_one_line_text(exc)}"


class ImageFolderDataset(torch.utils.data.Dataset):
    """Reads and resizes one record per item; a failure becomes an error entry, never an exception.

    `tracker`: optional shared int64 array of 3 slots per DataLoader worker, [pid, index being read or -1, when
    it started in ms of CLOCK_MONOTONIC]; set by the runner so that it knows which file a worker that died (or
    hangs) was decoding.
    """

    def __init__(self, root: str | Path, records: list[ImageRecord], preprocess: Preprocess, *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.root = Path(root)
        self.records = records
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.tracker: Any = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        slot = self._slot()
        if slot is not None:
            self.tracker[slot], self.tracker[slot + 2] = os.getpid(), int(time.monotonic() * 1000)
            self.tracker[slot + 1] = i
        try:
            pixels, error = read_file(self.root / self.records[i].path, self.load)
            return {"index": i, "pixels": pixels, "error": error}
        finally:
            if slot is not None:
                self.tracker[slot + 1] = -1

    def load(self, data: bytes) -> torch.Tensor:
        """A file's bytes -> uint8 [3, H, W], decoded and resized."""
        return self.preprocess.resize(decode(data, max_pixels=self.max_pixels))

    def _slot(self) -> int | None:
        if self.tracker is None:
            return None
        info = torch.utils.data.get_worker_info()
        return None if info is None else 3 * info.id


Pixels = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class Batch:
    """Decoded images of one loader batch, and the ones that failed.

    `indices` name the rows (positions in the runner's record list, or the records' paths for a shard source);
    `records` / `failed_records`, when set, are the rows themselves (a shard source's, read in the workers);
    `finished`: the units a shard source's worker read to their end with this batch.
    """

    indices: list[Any]
    pixels: Pixels  # uint8 [B, 3, H, W] (or a preprocessing's dict of [B, ...] tensors); B may be 0
    failed: list[tuple[Any, str]]
    records: list[Any] | None = None
    failed_records: list[Any] | None = None
    finished: list[int] = field(default_factory=list)

    def pin_memory(self) -> Batch:
        pinned = ({k: v.pin_memory() for k, v in self.pixels.items()} if isinstance(self.pixels, dict)
                  else self.pixels.pin_memory())
        return replace(self, pixels=pinned)


def stack_pixels(images: list[Pixels]) -> Pixels:
    """Resized images -> one batch: uint8 [B, 3, H, W] (channels-last in memory), or a dict stacked key by key."""
    if not images:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    if isinstance(images[0], dict):
        return {key: torch.stack([image[key] for image in images]) for key in images[0]}
    # Decoded images are (H, W, 3) in memory: stacked that way it is a plain copy, where a [B, 3, H, W]-contiguous
    # stack transposes every pixel in the worker (10x slower). Normalisation on the device restores the layout.
    return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)


def collate(items: list[dict[str, Any]]) -> Batch:
    """Stack the decoded images (uint8 [B, 3, H, W], channels-last in memory); keep (index, reason) for the rest."""
    good = [item for item in items if item["error"] is None]
    failed = [(item["index"], item["error"]) for item in items if item["error"] is not None]
    return Batch([item["index"] for item in good], stack_pixels([item["pixels"] for item in good]), failed)


def worker_init(_: int) -> None:
    """One thread per worker (the workers are the parallelism, oversubscription collapses speed); Ctrl-C is
    the main process's to handle (it stops the workers), so a worker does not die of it mid-batch."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.excepthook = _quiet_when_main_is_gone


def _quiet_when_main_is_gone(args: threading.ExceptHookArgs) -> None:
    # A worker's fd-sharing thread finds its peer gone when the main process stops (Ctrl-C, SIGTERM): that is
    # the stop itself, not a failure, and its traceback would bury the job's one-line message.
    if not issubclass(args.exc_type, (ConnectionError, EOFError)):
        threading.__excepthook__(args)


class EncodedImageDataset(ImageFolderDataset):
    """Reads one record per item; JPEGs stay encoded (uint8 [n] bytes), other formats are decoded and resized."""

    def load(self, data: bytes) -> torch.Tensor:
        """JPEG bytes -> themselves as uint8 [n]; any other format -> uint8 [3, H, W], decoded and resized."""
        if data.startswith(JPEG_MAGIC):
            size = jpeg_size(data)  # the frame header only: the pixel limit holds on the device too
            if size is not None:  # else the device decoder, then `decode`, give the reason
                check_size(*size, self.max_pixels)
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return super().load(data)


@dataclass
class EncodedBatch:
    """One loader batch of `EncodedImageDataset` items: `images[k]` is JPEG bytes (uint8 [n]) or uint8 [3, H, W]."""

    indices: list[int]
    images: list[torch.Tensor]
    failed: list[tuple[int, str]]

    def decoded(self, preprocess: Preprocess, device: torch.device) -> Batch:
        """Decode the JPEGs on `device` in one batched call and resize there -> a Batch with pixels on `device`.

        A JPEG the device's decoder refuses (CMYK on nvjpeg, say) is decoded by `decode` on the CPU instead;
        one that neither decodes joins `failed`.
        """
        jpegs = [k for k, image in enumerate(self.images) if image.ndim == 1]
        on_device = dict(zip(jpegs, decode_jpegs([self.images[k] for k in jpegs], device=device)))
        indices, images, failed = [], [], list(self.failed)
        for k, (index, image) in enumerate(zip(self.indices, self.images)):
            try:
                if k in on_device:
                    image = on_device[k] if on_device[k] is not None else decode(image.numpy().tobytes())
                images.append(image.to(device, non_blocking=True))
                indices.append(index)
            except DecodeError as exc:
                failed.append((index, f"{type(exc).__name__}: {exc}"))
        return Batch(indices, resize_all(images, preprocess, device=device), failed)


def decoded(loaded: Batch | EncodedBatch, preprocess: Preprocess, device: torch.device) -> Batch:
    """What a loader yields, with pixels: an `EncodedBatch`'s JPEGs decoded on `device`, a `Batch` as it is."""
    return loaded.decoded(preprocess, device) if isinstance(loaded, EncodedBatch) else loaded


def collate_encoded(items: list[dict[str, Any]]) -> EncodedBatch:
    """Keep the encoded and decoded images as they are (their sizes differ); (index, reason) for failures."""
    good = [item for item in items if item["error"] is None]
    failed = [(item["index"], item["error"]) for item in items if item["error"] is not None]
    return EncodedBatch([item["index"] for item in good], [item["pixels"] for item in good], failed)


def decode_jpegs(datas: list[torch.Tensor], *, device: torch.device) -> list[torch.Tensor | None]:
    """JPEG bytes (uint8 [n] each, on CPU) -> uint8 [3, H, W] RGB on `device`; None where that decoder fails."""
    if not datas:
        return []
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass  # one bad file fails the whole batched call: retry image by image
    out: list[torch.Tensor | None] = []
    for data in datas:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out.append(None)
    return out


def resize_all(images: list[torch.Tensor], preprocess: Preprocess, *, device: torch.device) -> torch.Tensor:
    """uint8 [3, h_k, w_k] images (decoded or already resized) -> uint8 [B, 3, H, W]; one resize per size."""
    if not images:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8, device=device)
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for k, image in enumerate(images):
        by_shape[tuple(image.shape)].append(k)
    out: list[Any] = [None] * len(images)
    for positions in by_shape.values():
        resized = preprocess.resize(torch.stack([images[k] for k in positions]))
        for j, k in enumerate(positions):  # a NaFlex preprocessing gives a dict of batched tensors
            out[k] = {key: value[j] for key, value in resized.items()} if isinstance(resized, dict) else resized[j]
    return stack_pixels(out) if isinstance(out[0], dict) else torch.stack(out)
