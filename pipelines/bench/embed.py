"""(c) The embed job (DataLoader -> encoder -> Parquet) on generated JPEGs, next to its data path alone and the
bound min((a) x workers, (b))."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.bench import SPLIT
from pipelines.bench.flops import mfu
from pipelines.bench.machine import sync
from pipelines.bench.model import SweepSettings, bench_model
from pipelines.data import DEFAULT_MAX_PIXELS, ImageRecord, decoded
from pipelines.runners.local import default_workers, embed_split, make_loader
from pipelines.runners.split import Job
from pipelines.siglip import Encoder, EncoderSpec, Preprocess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedSettings:
    """The job on `images` JPEGs of about `image_size` (w, h); data path and job alternate `rounds` times."""

    images: int
    image_size: list[int]
    quality: int
    dtype: str
    batch_size: int
    compile: bool
    num_workers: int | str
    device_decode: list[bool]
    rounds: int
    rows_per_part: int


def bench_embed(encoder: Encoder, *, root: Path, records: list[ImageRecord], out_dir: Path, settings: EmbedSettings,
                sweep: SweepSettings, results: dict[str, Any], peak: float | None) -> list[dict[str, Any]]:
    """For each `device_decode` setting: the data path alone, the model alone and the whole job, alternated
    `rounds` times, the best of each counting; the job's share of the data path, and of min((a) x workers,
    model alone)."""
    workers = default_workers() if settings.num_workers == "auto" else int(settings.num_workers)
    common = {"root": root, "records": records, "batch_size": settings.batch_size, "num_workers": workers}
    rows = []
    for device_decode in settings.device_decode:
        data_rate = model_rate = job_rate = 0.0
        for _ in range(settings.rounds):
            data_rate = max(data_rate, data_path_rate(**common, preprocess=encoder.preprocess, device=encoder.device,
                                                      device_decode=device_decode))
            alone = bench_model(encoder, batch_size=settings.batch_size, warmup=1, iters=sweep.iters, repeats=1)
            model_rate = max(model_rate, alone["images_per_s"])
            stats = run_job(encoder, **common, out_dir=out_dir, device_decode=device_decode,
                            rows_per_part=settings.rows_per_part)
            job_rate = max(job_rate, stats["images_per_s"])
        row = {"device_decode": device_decode, "num_workers": workers, "batch_size": settings.batch_size,
               "dtype": str(encoder.dtype).removeprefix("torch."), "compile": encoder.compiled_batch is not None,
               "images": len(records), "data_path_images_per_s": data_rate,
               "images_per_s": job_rate,
               "vs_data_path": job_rate / data_rate, **_bound(results, model_rate, workers, job_rate),
               "mfu": mfu(job_rate, results.get("flops_per_image"), peak, encoder.dtype), "last_run": stats}
        log.info("embed job: %s", row)
        rows.append(row)
    return rows


def data_path_rate(*, root: Path, records: list[ImageRecord], preprocess: Preprocess, batch_size: int,
                   num_workers: int, device: torch.device, device_decode: bool) -> float:
    """Images/s of the job's DataLoader alone, worker start-up included as in the job; with `device_decode`
    the batches are also decoded on the device, as the job does."""
    start = time.perf_counter()
    loader = make_loader(root=root, records=records, preprocess=preprocess, batch_size=batch_size,
                         num_workers=num_workers, device=device, device_decode=device_decode)
    count = sum(len(decoded(loaded, preprocess, device).indices) for loaded in loader)
    sync(device)
    return count / (time.perf_counter() - start)


def run_job(encoder: Encoder, *, root: Path, records: list[ImageRecord], out_dir: Path, batch_size: int,
            num_workers: int, device_decode: bool, rows_per_part: int) -> dict[str, Any]:
    """One embed job over `records` into an emptied `out_dir`; its SplitStats as a dict."""
    shutil.rmtree(out_dir, ignore_errors=True)
    spec = EncoderSpec(encoder.name_or_path, encoder.revision, str(encoder.device),
                       str(encoder.dtype).removeprefix("torch."))
    job = Job(encoder=spec, root=root, output_dir=out_dir, prefix="bench", batch_size=batch_size,
              num_workers=num_workers, rows_per_part=rows_per_part, progress=False, max_pixels=DEFAULT_MAX_PIXELS,
              compile=encoder.compiled_batch is not None)
    stats = embed_split(encoder, job, split=SPLIT, records=records, device_decode=device_decode)
    if stats.embedded != len(records):
        raise RuntimeError(f"the job embedded {stats.embedded} of {len(records)} generated images")
    return stats.to_dict()


def _bound(results: dict[str, Any], model_rate: float, workers: int, job_rate: float) -> dict[str, Any]:
    """min((a) x workers, the model alone) and the job's share of it; (a) only where it was measured."""
    worker_rate = results.get("preprocess", {}).get("images_per_s", {}).get("ours_worker")
    data_rate = worker_rate * workers if worker_rate else None
    bound = min(data_rate, model_rate) if data_rate else None
    return {"workers_x_preprocess_images_per_s": data_rate, "model_alone_images_per_s": model_rate,
            "bound_images_per_s": bound, "vs_bound": job_rate / bound if bound else None}
