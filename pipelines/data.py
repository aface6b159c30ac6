"""Files -> decoded, resized uint8 tensors: listing, sharding, decoding, a Dataset and its collate."""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from pipelines.siglip import Preprocess


@dataclass(frozen=True)
class ImageRecord:
    """One image file: `path` relative to the dataset root (POSIX separators), `label` its class folder."""

    path: str
    label: str


class DecodeError(ValueError):
    """The bytes are not an image that torchvision or PIL can decode."""


def list_split(root: str | Path, split: str) -> list[ImageRecord]:
    """All files under `root/split/<class>/`, sorted by path; hidden files and folders skipped."""
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"dataset split folder {split_dir} does not exist")
    records = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.startswith("."):
                    rel = Path(dirpath, name).relative_to(root).as_posix()
                    records.append(ImageRecord(path=rel, label=class_dir.name))
    records.sort(key=lambda r: r.path)
    return records


def shard_of(path: str, count: int) -> int:
    """The shard a path belongs to: stable across machines, runs and listing order."""
    return zlib.crc32(path.encode("utf-8")) % count


def take_shard(records: list[ImageRecord], *, index: int, count: int) -> list[ImageRecord]:
    """The records of shard `index` of `count` (0-based)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard.index={index}, shard.count={count}: need 0 <= index < count")
    if count == 1:
        return list(records)
    return [r for r in records if shard_of(r.path, count) == index]


def decode(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> uint8 [3, H, W] RGB; torchvision first, PIL for the formats it lacks."""
    if not data:
        raise DecodeError("empty file")
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        if image.dtype == torch.uint8:
            return image[0] if image.ndim == 4 else image  # first frame of an animation
    except RuntimeError:
        pass  # BMP, TIFF, 16-bit PNG and the like: PIL below, or its error
    try:
        with Image.open(io.BytesIO(data)) as pil:
            array = torch.from_numpy(_pil_rgb(pil))
    except UnidentifiedImageError as exc:
        raise DecodeError("not an image in a format torchvision or PIL can read") from exc
    except Exception as exc:  # PIL raises many types for bad bytes
        raise DecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    return array.permute(2, 0, 1).contiguous()


def _pil_rgb(pil: Image.Image):
    import numpy as np

    return np.array(pil.convert("RGB"), dtype=np.uint8)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Reads and resizes one record per item; a failure becomes an error entry, never an exception."""

    def __init__(self, root: str | Path, records: list[ImageRecord], preprocess: Preprocess) -> None:
        self.root = Path(root)
        self.records = records
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        try:
            data = (self.root / record.path).read_bytes()
            return {"index": i, "pixels": self.preprocess.resize(decode(data)), "error": None}
        except (OSError, DecodeError) as exc:
            return {"index": i, "pixels": None, "error": f"{type(exc).__name__}: {exc}"}


@dataclass
class Batch:
    """Decoded images of one loader batch, and the ones that failed."""

    indices: list[int]
    pixels: torch.Tensor  # uint8 [B, 3, H, W]; B may be 0
    failed: list[tuple[int, str]]

    def pin_memory(self) -> Batch:
        return Batch(self.indices, self.pixels.pin_memory(), self.failed)


def collate(items: list[dict[str, Any]]) -> Batch:
    """Stack the decoded images; keep (index, reason) for the rest."""
    good = [item for item in items if item["error"] is None]
    failed = [(item["index"], item["error"]) for item in items if item["error"] is not None]
    pixels = torch.stack([item["pixels"] for item in good]) if good else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    return Batch([item["index"] for item in good], pixels, failed)


def worker_init(_: int) -> None:
    """One thread per worker: the workers are the parallelism, and oversubscription collapses speed."""
    torch.set_num_threads(1)
