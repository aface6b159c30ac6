"""What the Triton models in `serving/` do, minus Triton: settings from `config.pbtxt`, decoding, batching.

The `model.py` files are adapters that move tensors between Triton and these functions; this module needs
neither Triton nor its Python backend, so it is unit-tested directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines import names
from pipelines.data import DecodeError, decode
from pipelines.siglip import Preprocess


@dataclass(frozen=True)
class ModelSettings:
    """What a model instance loads: checkpoint, revision, dtype name, torch device, and its CPU threads."""

    name_or_path: str
    revision: str | None
    dtype: str
    device: str
    num_threads: int


def model_settings(model_config: dict[str, Any], *, instance_kind: str, device_id: int) -> ModelSettings:
    """Read a model's `parameters` (as Triton passes `model_config`) and the instance Triton placed it on.

    `device: auto` follows the instance: `cuda:<id>` for a GPU instance, else `cpu`.
    """
    params = {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}
    missing = {names.PARAM_MODEL} - params.keys()
    if missing:
        raise ValueError(f"model {model_config.get('name')!r}: config.pbtxt lacks parameters {sorted(missing)}")
    device = params.get(names.PARAM_DEVICE, "auto")
    if device == "auto":
        device = f"cuda:{device_id}" if instance_kind == "GPU" else "cpu"
    return ModelSettings(
        name_or_path=params[names.PARAM_MODEL],
        revision=params.get(names.PARAM_REVISION) or None,
        dtype=params.get(names.PARAM_DTYPE, "auto"),
        device=device,
        num_threads=resolve_threads(params.get(names.PARAM_THREADS, "auto")),
    )


def resolve_threads(value: str | int) -> int:
    """'auto' -> half the cores this process may use (at least 1): room for the server and the other model."""
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)) // 2)
    threads = int(value)
    if threads < 1:
        raise ValueError(f"{names.PARAM_THREADS}={value!r}: expected 'auto' or a positive integer")
    return threads


def decode_images(blobs: np.ndarray, preprocess: Preprocess) -> torch.Tensor:
    """BYTES [n] or [n, 1] encoded images -> uint8 [n, 3, H, W], decoded and resized as `pipelines.embed` does.

    Raises DecodeError naming the row of the first image that cannot be decoded.
    """
    if blobs.size == 0:
        raise DecodeError(f"{names.IMAGE} holds no image")
    images = []
    for row, blob in enumerate(blobs.reshape(-1)):
        try:
            images.append(preprocess.resize(decode(bytes(blob))))
        except DecodeError as exc:
            raise DecodeError(f"{names.IMAGE}[{row}]: {exc}") from exc
    return torch.stack(images)


def split_rows(embeddings: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """float32 [sum(sizes), D] -> one [size, D] block per request, in order."""
    if sum(sizes) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings for requests of {sizes} rows")
    return np.split(embeddings, np.cumsum(sizes)[:-1])
