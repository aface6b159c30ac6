"""Files -> decoded, resized uint8 tensors: listing, sharding, decoding, a Dataset and its collate.

Two ways to read: `ImageFolderDataset` decodes and resizes in the DataLoader's workers (the default);
`EncodedImageDataset` leaves JPEGs encoded for `EncodedBatch.decoded`, which decodes a whole batch on the
encoder's device (nvjpeg on CUDA) for hosts with few cores.
"""

from __future__ import annotations

import io
import os
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from pipelines.siglip import Preprocess

JPEG_MAGIC = b"\xff\xd8\xff"


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
        try:
            pixels = self.load((self.root / self.records[i].path).read_bytes())
            return {"index": i, "pixels": pixels, "error": None}
        except (OSError, DecodeError) as exc:
            return {"index": i, "pixels": None, "error": f"{type(exc).__name__}: {exc}"}

    def load(self, data: bytes) -> torch.Tensor:
        """A file's bytes -> uint8 [3, H, W], decoded and resized."""
        return self.preprocess.resize(decode(data))


@dataclass
class Batch:
    """Decoded images of one loader batch, and the ones that failed."""

    indices: list[int]
    pixels: torch.Tensor  # uint8 [B, 3, H, W]; B may be 0
    failed: list[tuple[int, str]]

    def pin_memory(self) -> Batch:
        return Batch(self.indices, self.pixels.pin_memory(), self.failed)

    def decoded(self, preprocess: Preprocess, device: torch.device) -> Batch:
        """Already decoded and resized by the workers: itself (the runner copies the pixels to the device)."""
        return self


def collate(items: list[dict[str, Any]]) -> Batch:
    """Stack the decoded images (uint8 [B, 3, H, W], channels-last in memory); keep (index, reason) for the rest."""
    good = [item for item in items if item["error"] is None]
    failed = [(item["index"], item["error"]) for item in items if item["error"] is not None]
    if not good:
        return Batch([], torch.empty(0, 3, 0, 0, dtype=torch.uint8), failed)
    # Decoded images are (H, W, 3) in memory: stacked that way it is a plain copy, where a [B, 3, H, W]-contiguous
    # stack transposes every pixel in the worker (10x slower). Normalisation on the device restores the layout.
    pixels = torch.stack([item["pixels"].permute(1, 2, 0) for item in good]).permute(0, 3, 1, 2)
    return Batch([item["index"] for item in good], pixels, failed)


def worker_init(_: int) -> None:
    """One thread per worker: the workers are the parallelism, and oversubscription collapses speed."""
    torch.set_num_threads(1)


class EncodedImageDataset(ImageFolderDataset):
    """Reads one record per item; JPEGs stay encoded (uint8 [n] bytes), other formats are decoded and resized."""

    def load(self, data: bytes) -> torch.Tensor:
        """JPEG bytes -> themselves as uint8 [n]; any other format -> uint8 [3, H, W], decoded and resized."""
        if data.startswith(JPEG_MAGIC):
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
    out: list[torch.Tensor | None] = [None] * len(images)
    for positions in by_shape.values():
        resized = preprocess.resize(torch.stack([images[k] for k in positions]))
        for j, k in enumerate(positions):
            out[k] = resized[j]
    return torch.stack(out)
