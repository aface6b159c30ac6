"""What the Triton models in `serving/` do, minus Triton: settings from `config.pbtxt`, decoding, batching.

The `model.py` files are adapters that move tensors between Triton and these functions; this module needs
neither Triton nor its Python backend, so it is unit-tested directly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines.data import DecodeError
from pipelines.serve import names
from pipelines.siglip import stack_pixels

# embed_image's default pixel limit, below the embed job's (PIL's 89.5 Mpx): a server takes files from anyone,
# and 25 Mpx (e.g. 6000x4000, a 24 Mpx camera) is 75 MB decoded.
DEFAULT_MAX_PIXELS = 25_000_000


@dataclass(frozen=True)
class ModelSettings:
    """What a model instance loads: checkpoint, revision, dtype name, torch device, its CPU threads, and the
    largest image (pixels) embed_image decodes."""

    name_or_path: str
    revision: str | None
    dtype: str
    device: str
    num_threads: int
    max_pixels: int = DEFAULT_MAX_PIXELS


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
        max_pixels=resolve_max_pixels(params.get(names.PARAM_MAX_PIXELS, str(DEFAULT_MAX_PIXELS))),
    )


def resolve_threads(value: str | int) -> int:
    """'auto' -> half the cores this process may use (at least 1): room for the server and the other model."""
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)) // 2)
    threads = int(value)
    if threads < 1:
        raise ValueError(f"{names.PARAM_THREADS}={value!r}: expected 'auto' or a positive integer")
    return threads


def resolve_max_pixels(value: str | int) -> int:
    """The `max_pixels` parameter -> a positive int; ValueError naming the value otherwise."""
    try:
        pixels = int(value)
    except ValueError:
        pixels = 0
    if pixels < 1:
        raise ValueError(f"{names.PARAM_MAX_PIXELS}={value!r}: expected a positive number of pixels")
    return pixels


Pixels = torch.Tensor | dict[str, torch.Tensor]
DecodeMany = Callable[[list[bytes]], list["Pixels | DecodeError"]]


def decode_requests(requests: Sequence[np.ndarray], decode_many: DecodeMany) -> list[Pixels | DecodeError]:
    """Per request BYTES [n, 1] (or [n]) -> uint8 [n, 3, H, W] (a NaFlex checkpoint: its dict of [n, ...]
    tensors), or a DecodeError naming each bad row and why.

    All rows of all requests go to `decode_many` (e.g. `IsolatedDecoder.decode_many`: decode + resize in a
    child process) in one call; a bad row fails its own request, and no other.
    """
    rows = [[bytes(blob) for blob in blobs.reshape(-1)] for blobs in requests]
    decoded = iter(decode_many([blob for request in rows for blob in request]))
    results: list[Pixels | DecodeError] = []
    for request in rows:
        images = [next(decoded) for _ in request]
        bad = [f"{names.IMAGE}[{row}]: {image}" for row, image in enumerate(images) if isinstance(image, Exception)]
        if not request:
            results.append(DecodeError(f"{names.IMAGE} holds no image"))
        elif bad:
            results.append(DecodeError("; ".join(bad)))
        else:
            results.append(stack_pixels(images))
    return results


def non_finite_rows(pixels: np.ndarray) -> str | None:
    """float32 [n, 3, H, W] -> None when every value is finite, else a message naming the rows with NaN/inf."""
    finite = np.isfinite(pixels.reshape(len(pixels), -1)).all(axis=1)
    if finite.all():
        return None
    rows = np.flatnonzero(~finite)
    named = ", ".join(f"{names.PIXEL_VALUES}[{row}]" for row in rows[:8]) + (" ..." if len(rows) > 8 else "")
    return f"{named}: pixel values must be finite (found NaN or inf)"


def naflex_rows(pixels: np.ndarray, mask: np.ndarray, shapes: np.ndarray) -> str | None:
    """A NaFlex request (float32 [n, N, 3*p*p] patches, int32 [n, N] mask, int64 [n, 2] grids) -> None when every
    row is one the model can take, else a message naming the bad rows and why (NaN/inf first)."""
    non_finite = non_finite_rows(pixels)
    if non_finite is not None:
        return non_finite
    bad = []
    for row, ((rows, cols), marks) in enumerate(zip(shapes.tolist(), mask, strict=True)):
        count = rows * cols
        if rows < 1 or cols < 1 or count > len(marks):
            bad.append(f"{names.SPATIAL_SHAPES}[{row}]=[{rows}, {cols}]: expected at least one patch and at most "
                       f"{len(marks)} (rows x columns)")
        elif not (marks[:count] == 1).all() or (marks[count:] != 0).any():
            bad.append(f"{names.PIXEL_ATTENTION_MASK}[{row}]: expected {count} ones (the {rows}x{cols} patches, "
                       "first) then zeros")
    return "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else "") if bad else None


def embed_batch(inputs: Sequence[Any], embed: Callable[[list[Any]], Any], *, good: Callable[[Any], bool]) -> list[Any]:
    """One dynamic batch, request by request: each input is a request's rows (`good`) or the error refusing it.

    The good inputs go to `embed` in one call; it returns float32 [all their rows, D], or an error object that
    every good request then answers. -> per request its [n, D] block, or its error, in order.
    """
    accepted = [x for x in inputs if good(x)]
    if not accepted:
        return list(inputs)
    embeddings = embed(accepted)
    if isinstance(embeddings, np.ndarray):
        blocks = iter(split_rows(embeddings, [len(x) for x in accepted]))
    else:
        blocks = iter([embeddings] * len(accepted))
    return [next(blocks) if good(x) else x for x in inputs]


def responses(pb_utils: Any, output_name: str, results: Sequence[Any]) -> list[Any]:
    """`embed_batch`'s results -> Triton responses: a block as `output_name`, an error as a 400 (INVALID_ARG)
    with its message, or a TritonError as it is. `pb_utils` is the backend's module, passed in so that this module
    needs no Triton."""
    answered = []
    for result in results:
        if isinstance(result, np.ndarray):
            answered.append(pb_utils.InferenceResponse([pb_utils.Tensor(output_name, result)]))
            continue
        error = result if isinstance(result, pb_utils.TritonError) else pb_utils.TritonError(
            str(result), pb_utils.TritonError.INVALID_ARG)
        answered.append(pb_utils.InferenceResponse(error=error))
    return answered


def split_rows(embeddings: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """float32 [sum(sizes), D] -> one [size, D] block per request, in order."""
    if sum(sizes) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings for requests of {sizes} rows")
    return np.split(embeddings, np.cumsum(sizes)[:-1])
