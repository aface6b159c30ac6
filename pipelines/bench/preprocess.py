"""(a) Decode + preprocess on one core: ours vs transformers' `SiglipImageProcessor`, outputs compared."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipelines.data import EncodedImageDataset, ImageRecord, collate_encoded, decode
from pipelines.siglip import Preprocess


@dataclass(frozen=True)
class PreprocessSettings:
    """`images` of the generated JPEGs, each pipeline timed `rounds` times, interleaved; the best counts."""

    images: int
    rounds: int


def bench_preprocess(root: Path, records: list[ImageRecord], preprocess: Preprocess, *, device: torch.device,
                     rounds: int) -> dict[str, Any]:
    """Decode + preprocess on one core, images/s: ours (all of it, and the part the workers do) vs
    `SiglipImageProcessor` fed PIL images (as its users do) and fed our decoded tensors; max abs differences."""
    from transformers import SiglipImageProcessor

    datas = [(root / r.path).read_bytes() for r in records]
    processor = SiglipImageProcessor(**{k: v for k, v in preprocess.to_config().items() if k != "image_processor_type"})
    pipelines: dict[str, Callable[[bytes], torch.Tensor]] = {
        "ours": lambda d: preprocess(decode(d)),
        "ours_worker": lambda d: preprocess.resize(decode(d)),  # decode + resize in a worker; normalise on device
        "processor_pil": lambda d: processor(images=_pil_rgb(d), return_tensors="pt")["pixel_values"][0],
        "processor_tensor": lambda d: processor(images=decode(d), return_tensors="pt")["pixel_values"][0],
    }
    with _threads(1):
        diff = max(float((pipelines["ours"](d) - pipelines[ref](d)).abs().max())
                   for d in datas for ref in ("processor_pil", "processor_tensor"))
        rates = _best_rates(pipelines, datas, rounds)
    reference = max(rates["processor_pil"], rates["processor_tensor"])
    return {
        "images": len(datas),
        "threads": 1,
        "images_per_s": rates,
        "speedup_vs_processor": rates["ours"] / reference,
        "max_abs_diff": diff,
        "device_decode_max_abs_diff": device_decode_diff(root, records, preprocess, device=device),
    }


def _pil_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _best_rates(pipelines: dict[str, Callable[[bytes], Any]], datas: list[bytes], rounds: int) -> dict[str, float]:
    """Images/s of each pipeline: the best of `rounds`, interleaved so a busy moment hits all of them alike."""
    best = dict.fromkeys(pipelines, 0.0)
    for _ in range(rounds):
        for name, fn in pipelines.items():
            start = time.perf_counter()
            for data in datas:
                fn(data)
            best[name] = max(best[name], len(datas) / (time.perf_counter() - start))
    return best


def device_decode_diff(root: Path, records: list[ImageRecord], preprocess: Preprocess, *,
                       device: torch.device) -> float:
    """Max abs diff of the normalised pixels: JPEGs decoded and resized on `device` vs by the workers' CPU path."""
    dataset = EncodedImageDataset(root, records, preprocess)
    batch = collate_encoded([dataset[i] for i in range(len(dataset))]).decoded(preprocess, device)
    cpu = torch.stack([preprocess.resize(decode((root / records[i].path).read_bytes())) for i in batch.indices])
    return float((preprocess.normalize(batch.pixels).cpu() - preprocess.normalize(cpu)).abs().max())


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
