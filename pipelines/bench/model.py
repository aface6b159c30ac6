"""(b) The encoder alone on random uint8 batches, for each dtype x batch size x compile setting."""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.bench.flops import count_flops, mfu
from pipelines.bench.machine import free, sync
from pipelines.siglip import Encoder, NaFlexPreprocess, Pixels, load_encoder, resolve_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepSettings:
    """Every dtype x batch size x compile setting; `warmup` batches, then `repeats` x `iters` timed."""

    dtypes: list[str]
    batch_sizes: list[int]
    compile: list[bool]
    compile_mode: str | None
    warmup: int
    iters: int
    repeats: int


def run_sweep(*, model: str, revision: str | None, device: torch.device, sweep: SweepSettings,
              keep: tuple[str, int, bool] | None, measure: bool, peak: float | None,
              on_run: Callable[[int, dict[str, Any]], None] | None = None) -> tuple[dict[str, Any], Encoder | None]:
    """Time every setting of `sweep` (when `measure`); returns the figures and a warm encoder for `keep`.

    `keep` (dtype, batch size, compile) is the embed job's setting: timed last (when `measure`), its encoder is
    handed on warm; None: no encoder is kept. `on_run(flops_per_image, row)` hears of each row as it is timed.
    """
    def canonical(dtype: str, batch_size: int, compiled: bool) -> tuple[str, int, bool]:
        return str(resolve_dtype(dtype, device)).removeprefix("torch."), batch_size, compiled

    keep = canonical(*keep) if keep else None
    configs = [canonical(d, b, c) for d in sweep.dtypes for b in sweep.batch_sizes for c in sweep.compile]
    configs = list(dict.fromkeys(c for c in configs if c != keep)) if measure else []
    configs += [keep] if keep else []
    encoder = None
    runs, flops = [], None
    for dtype, batch_size, compiled in configs:
        if compiled:
            torch.compiler.reset()  # each compiled setting starts clean, below dynamo's recompile limit
        encoder = load_encoder(model, device=device, dtype=dtype, revision=revision)
        flops = flops or _flops(encoder)
        if compiled:
            encoder.compile(batch_size=batch_size, mode=sweep.compile_mode)
        figures = bench_model(encoder, batch_size=batch_size, warmup=sweep.warmup,
                              iters=sweep.iters if measure else 0, repeats=sweep.repeats if measure else 0)
        if measure:
            runs.append(_model_row(encoder, batch_size, compiled, figures, flops, peak))
            log.info("model alone: %s", runs[-1])
            if on_run is not None:
                on_run(flops, runs[-1])
        if (dtype, batch_size, compiled) != keep:
            encoder = None
            free(device)
    return {"flops_per_image": flops, "runs": runs}, encoder


def bench_model(encoder: Encoder, *, batch_size: int, warmup: int, iters: int, repeats: int) -> dict[str, Any]:
    """Images/s of `encoder.embed_uint8` on `sample_batch` already on the device (the median of `repeats` runs of
    `iters` batches), after `warmup` batches (compilation happens there)."""
    images = sample_batch(encoder, batch_size)
    start = time.perf_counter()
    for _ in range(max(1, warmup)):
        encoder.embed_uint8(images)
    sync(encoder.device)
    warmup_s = time.perf_counter() - start
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            encoder.embed_uint8(images)
        sync(encoder.device)
        rates.append(batch_size * iters / (time.perf_counter() - start))
    return {"images_per_s": statistics.median(rates) if rates else None, "rates": rates, "warmup_s": warmup_s}


# ImageNet's most common image size: what a NaFlex model is timed on (its patch count depends on the shape).
NAFLEX_SAMPLE_SIZE = (375, 500)


def sample_batch(encoder: Encoder, batch_size: int) -> Pixels:
    """Random pixels as `embed_uint8` takes them, on the encoder's device: uint8 [batch_size, 3, H, W], or for a
    NaFlex model its dict for 500x375 images (252 of 256 patches)."""
    if isinstance(encoder.preprocess, NaFlexPreprocess):
        images = torch.randint(0, 256, (batch_size, 3, *NAFLEX_SAMPLE_SIZE), dtype=torch.uint8)
        return {key: value.to(encoder.device) for key, value in encoder.preprocess.resize(images).items()}
    shape = (batch_size, 3, encoder.preprocess.height, encoder.preprocess.width)
    return torch.randint(0, 256, shape, dtype=torch.uint8, device=encoder.device)


def _flops(encoder: Encoder) -> int:
    """FLOPs per image, counted from the model (`count_flops`)."""
    if not isinstance(encoder.preprocess, NaFlexPreprocess):
        return count_flops(encoder.model, height=encoder.preprocess.height, width=encoder.preprocess.width)
    # The meta device cannot run NaFlex's position-embedding resize (it reads the patch grid's values); the rest of
    # the work depends on the number of patches alone, padding included: a SigLIP twin with a square grid of them
    # (all of max_num_patches when it is a square, as the released checkpoints' 256) does the same products.
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config, side = encoder.model.config, math.isqrt(encoder.preprocess.max_num_patches)
    twin = SiglipVisionConfig(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                              num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                              patch_size=config.patch_size, image_size=config.patch_size * side,
                              hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps)
    with torch.device("meta"):
        model = SiglipVisionModel(twin)
    return count_flops(model, height=twin.image_size, width=twin.image_size)


def _model_row(encoder: Encoder, batch_size: int, compiled: bool, figures: dict[str, Any], flops: int,
               peak: float | None) -> dict[str, Any]:
    rate = figures["images_per_s"]
    return {
        "dtype": str(encoder.dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "compile": compiled,
        "threads": torch.get_num_threads() if encoder.device.type == "cpu" else None,
        **figures,
        "tflops": rate * flops / 1e12,
        "mfu": mfu(rate, flops, peak, encoder.dtype),
    }
