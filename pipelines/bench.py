"""`python -m pipelines.bench`: where the embed job's time goes, measured side by side in one run.

(a) preprocess: decode + preprocess on one core, ours vs transformers' `SiglipImageProcessor`, outputs compared;
(b) model: the encoder alone on random uint8 batches for each dtype x batch size x compile setting, with the
    FLOPs per image counted from the model and, on CUDA, the MFU;
(c) embed: the embed job (DataLoader -> encoder -> Parquet) on a generated folder of ImageNet-like JPEGs, next
    to the data path alone (the same DataLoader, no model) and the bound min((a) x workers, (b));
(d) writer: the Parquet writer alone.
Prints a report and writes the figures as JSON after each part, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from pipelines import store
from pipelines.config import CONF_DIR, UserError, clean_errors
from pipelines.data import EncodedImageDataset, ImageRecord, collate_encoded, decode, list_split
from pipelines.runner import PartWriter, default_workers, embed_split, make_loader
from pipelines.siglip import (
    Encoder,
    Preprocess,
    WeightsUnavailableError,
    load_encoder,
    load_preprocess,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger(__name__)

PARTS = ("preprocess", "model", "embed", "writer")
# Dense BF16/FP16 tensor-core peaks in TFLOP/s from the vendors' datasheets, matched in order in the GPU's name.
PEAK_TFLOPS = (
    ("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("RTX 4090", 165.2),
)
PHOTOS = ("china.jpg", "flower.jpg")  # scikit-learn's sample photos: real content for the generated JPEGs
SPLIT = "train"


@dataclass(frozen=True)
class PreprocessSettings:
    """(a): `images` of the generated JPEGs, each pipeline timed `rounds` times, interleaved; the best counts."""

    images: int = 64
    rounds: int = 3


@dataclass(frozen=True)
class SweepSettings:
    """(b): every dtype x batch size x compile setting; `warmup` batches, then `repeats` x `iters` timed."""

    dtypes: list[str] = field(default_factory=lambda: ["auto"])
    batch_sizes: list[int] = field(default_factory=lambda: [64])
    compile: list[bool] = field(default_factory=lambda: [False])
    compile_mode: str | None = None
    warmup: int = 2
    iters: int = 5
    repeats: int = 3


@dataclass(frozen=True)
class EmbedSettings:
    """(c): the job on `images` JPEGs of about `image_size` (w, h); data path and job alternate `rounds` times."""

    images: int = 512
    image_size: list[int] = field(default_factory=lambda: [500, 375])
    quality: int = 90
    dtype: str = "auto"
    batch_size: int = 64
    compile: bool = False
    num_workers: int | str = "auto"
    device_decode: list[bool] = field(default_factory=lambda: [False])
    rounds: int = 2
    rows_per_part: int = 4096


@dataclass(frozen=True)
class WriterSettings:
    """(d): `rows` random embeddings added `batch_size` at a time, parts of `rows_per_part`."""

    rows: int = 20000
    batch_size: int = 64
    rows_per_part: int = 4096


def run_bench(
    *,
    model: str,
    revision: str | None = None,
    device: str = "auto",
    parts: Sequence[str] = PARTS,
    output: str | Path,
    work_dir: str | Path,
    peak_tflops: float | str | None = "auto",
    preprocess: PreprocessSettings = PreprocessSettings(),
    sweep: SweepSettings = SweepSettings(),
    embed: EmbedSettings = EmbedSettings(),
    writer: WriterSettings = WriterSettings(),
    command: str | None = None,
) -> dict[str, Any]:
    """Run the chosen parts, writing `output` (JSON) after each; returns the same figures.

    `command` is recorded with the figures (the entry point passes its command line).
    """
    _check(parts, preprocess, sweep, embed, writer)
    torch_device = resolve_device(device)
    work_dir, output = Path(work_dir), Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    peak = peak_flops(torch_device, peak_tflops)
    results: dict[str, Any] = {"machine": machine(torch_device), "command": command, "model": model,
                               "device": str(torch_device), "peak_tflops": peak / 1e12 if peak else None,
                               "settings": _settings(parts, preprocess, sweep, embed, writer)}

    def save(key: str, value: Any) -> None:
        results[key] = value
        store.write_json(output, results)

    root = records = encoder = None
    if "preprocess" in parts or "embed" in parts:
        root, records = _jpegs(work_dir, preprocess, embed, parts)
    if "preprocess" in parts:
        pipeline = load_preprocess(model, revision=revision)
        save("preprocess", bench_preprocess(root, records[: preprocess.images], pipeline, device=torch_device,
                                            rounds=preprocess.rounds))
    if "model" in parts or "embed" in parts:
        keep = (embed.dtype, embed.batch_size, embed.compile) if "embed" in parts else None
        encoder = _model_part(model=model, revision=revision, device=torch_device, sweep=sweep, keep=keep,
                              measure="model" in parts, peak=peak, save=save)
    if "embed" in parts:
        save("embed", bench_embed(encoder, root=root, records=records, out_dir=work_dir / "embed-out", settings=embed,
                                  sweep=sweep, results=results, peak=peak))
    if "writer" in parts:
        encoder = encoder or load_encoder(model, device=torch_device, revision=revision)
        save("writer", bench_writer(out_dir=work_dir / "writer-out", dim=encoder.embedding_dim,
                                    metadata=encoder.metadata(), settings=writer))
    store.write_json(output, results)
    return results


def _model_part(*, model: str, revision: str | None, device: torch.device, sweep: SweepSettings,
                keep: tuple[str, int, bool] | None, measure: bool, peak: float | None,
                save: Callable[[str, Any], None]) -> Encoder | None:
    """(b), each row saved as soon as it is timed (a compilation cut short loses only itself)."""
    rows: list[dict[str, Any]] = []

    def measured(flops: int, row: dict[str, Any]) -> None:
        rows.append(row)
        save("flops_per_image", flops)
        save("model_alone", rows)

    figures, encoder = run_sweep(model=model, revision=revision, device=device, sweep=sweep, keep=keep,
                                 measure=measure, peak=peak, on_run=measured)
    save("flops_per_image", figures["flops_per_image"])
    return encoder


def _check(parts: Sequence[str], pre: PreprocessSettings, sweep: SweepSettings, embed: EmbedSettings,
           writer: WriterSettings) -> None:
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise UserError(f"parts={parts}: choose from {', '.join(PARTS)}")
    counts = {"preprocess.images": pre.images, "preprocess.rounds": pre.rounds, "sweep.iters": sweep.iters,
              "sweep.repeats": sweep.repeats, "embed.images": embed.images, "embed.batch_size": embed.batch_size,
              "embed.rounds": embed.rounds, "writer.rows": writer.rows, "writer.batch_size": writer.batch_size,
              **{f"sweep.batch_sizes[{i}]": b for i, b in enumerate(sweep.batch_sizes)}}
    for key, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{key}={value!r}: must be a whole number >= 1")
    if len(embed.image_size) != 2 or min(embed.image_size) < 16:
        raise UserError(f"embed.image_size={list(embed.image_size)}: expected [width, height], each >= 16")


def _settings(parts: Sequence[str], *sections: Any) -> dict[str, Any]:
    names = ("preprocess", "sweep", "embed", "writer")
    return {"parts": list(parts), **{name: asdict(section) for name, section in zip(names, sections)}}


# -- (a) preprocessing on one core ------------------------------------------------------------------------------


def bench_preprocess(root: Path, records: list[ImageRecord], preprocess: Preprocess, *, device: torch.device,
                     rounds: int = 3) -> dict[str, Any]:
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
    import io

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


# -- (b) the model alone ----------------------------------------------------------------------------------------


def count_flops(model: torch.nn.Module, *, height: int, width: int) -> int:
    """FLOPs for one image, counted by FlopCounterMode on a meta-device twin of `model` with eager attention.

    The counter misses the CPU SDPA kernel; eager attention does the same matrix products, and on the meta
    device nothing is computed.
    """
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel

    with torch.device("meta"):
        twin = AutoModel.from_config(copy.deepcopy(model.config), attn_implementation="eager")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        twin(pixel_values=torch.empty(1, 3, height, width, device="meta"))
    return int(counter.get_total_flops())


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
        flops = flops or count_flops(encoder.model, height=encoder.preprocess.height, width=encoder.preprocess.width)
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
            _free(device)
    return {"flops_per_image": flops, "runs": runs}, encoder


def bench_model(encoder: Encoder, *, batch_size: int, warmup: int, iters: int, repeats: int) -> dict[str, Any]:
    """Images/s of `encoder.embed_uint8` on random uint8 [batch_size, 3, H, W] already on the device (the median
    of `repeats` runs of `iters` batches), after `warmup` batches (compilation happens there)."""
    shape = (batch_size, 3, encoder.preprocess.height, encoder.preprocess.width)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=encoder.device)
    start = time.perf_counter()
    for _ in range(max(1, warmup)):
        encoder.embed_uint8(images)
    _sync(encoder.device)
    warmup_s = time.perf_counter() - start
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            encoder.embed_uint8(images)
        _sync(encoder.device)
        rates.append(batch_size * iters / (time.perf_counter() - start))
    return {"images_per_s": statistics.median(rates) if rates else None, "rates": rates, "warmup_s": warmup_s}


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
        "mfu": _mfu(rate, flops, peak, encoder.dtype),
    }


def _mfu(rate: float, flops: int | None, peak: float | None, dtype: torch.dtype) -> float | None:
    """Achieved / peak FLOP/s; only against a tensor-core peak, so only for bf16 and fp16."""
    if not peak or not flops or dtype not in (torch.bfloat16, torch.float16):
        return None
    return rate * flops / peak


def peak_flops(device: torch.device, override: float | str | None) -> float | None:
    """The device's dense bf16/fp16 peak in FLOP/s: `override` (TFLOP/s), else from the GPU's name; None on CPU."""
    if override not in (None, "auto"):
        try:
            return float(override) * 1e12
        except ValueError:
            raise UserError(f"peak_tflops={override!r}: expected auto or a number (TFLOP/s)") from None
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in name), None)


# -- (c) the embed job next to its data path --------------------------------------------------------------------


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
               "mfu": _mfu(job_rate, results.get("flops_per_image"), peak, encoder.dtype), "last_run": stats}
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
    count = sum(len(loaded.decoded(preprocess, device).indices) for loaded in loader)
    _sync(device)
    return count / (time.perf_counter() - start)


def run_job(encoder: Encoder, *, root: Path, records: list[ImageRecord], out_dir: Path, batch_size: int,
            num_workers: int, device_decode: bool, rows_per_part: int) -> dict[str, Any]:
    """One embed job over `records` into an emptied `out_dir`; its SplitStats as a dict."""
    shutil.rmtree(out_dir, ignore_errors=True)
    stats = embed_split(encoder=encoder, root=root, split=SPLIT, records=records, output_dir=out_dir,
                        batch_size=batch_size, num_workers=num_workers, rows_per_part=rows_per_part,
                        prefix="bench", progress=False, device_decode=device_decode)
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


# -- (d) the Parquet writer alone -------------------------------------------------------------------------------


def bench_writer(*, out_dir: Path, dim: int, metadata: dict[str, Any], settings: WriterSettings) -> dict[str, Any]:
    """Rows/s and MB/s of `PartWriter` on random float32 [rows, dim] embeddings, from the first add to close."""
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((settings.rows, dim), dtype=np.float32)
    paths = [f"{SPLIT}/class{i % 10:03d}/image-{i:08d}.jpg" for i in range(settings.rows)]
    labels = [p.split("/")[1] for p in paths]
    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    writer = PartWriter(store.split_dir(out_dir, SPLIT), metadata=metadata, rows_per_part=settings.rows_per_part, prefix="bench")
    for i in range(0, settings.rows, settings.batch_size):
        j = i + settings.batch_size
        writer.add(paths[i:j], labels[i:j], embeddings[i:j])
    writer.close()
    wall = time.perf_counter() - start
    return {"rows": settings.rows, "dim": dim, "rows_per_s": settings.rows / wall,
            "mb_per_s": embeddings.nbytes / 1e6 / wall, "parts": len(store.parts(store.split_dir(out_dir, SPLIT))),
            "bytes_on_disk": sum(p.stat().st_size for p in store.parts(store.split_dir(out_dir, SPLIT)))}


# -- generated JPEGs --------------------------------------------------------------------------------------------


def make_jpegs(folder: Path, *, count: int, size: tuple[int, int] = (500, 375), quality: int = 90,
               classes: int = 10, seed: int = 0, processes: int = 1) -> Path:
    """`count` JPEGs of about `size` (width, height) under `folder/train/<class>/`; returns `folder`.

    Random crops of real photos, a quarter of them portrait, heights jittered as ImageNet's are; a folder
    already made with the same settings is reused.
    """
    settings = {"count": count, "size": list(size), "quality": quality, "classes": classes, "seed": seed}
    marker = folder / "jpegs.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for label in range(classes):
        (folder / SPLIT / f"class{label:03d}").mkdir(parents=True)
    jobs = [(folder / SPLIT / f"class{i % classes:03d}" / f"image-{i:06d}.jpg", i, tuple(size), quality, seed)
            for i in range(count)]
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write_jpeg, jobs, chunksize=max(1, count // (4 * processes))))
    else:
        for job in jobs:
            _write_jpeg(job)
    store.write_json(marker, settings)
    return folder


def _write_jpeg(job: tuple[Path, int, tuple[int, int], int, int]) -> None:
    path, index, (width, height), quality, seed = job
    rng = np.random.default_rng([seed, index])
    photo = _photo(PHOTOS[index % len(PHOTOS)])
    height = round(height * rng.uniform(0.88, 1.0))
    if rng.random() < 0.25:
        width, height = height, width
    # The largest crop of the photo's with the target's aspect, scaled down at random, placed at random.
    fit = min(photo.width / width, photo.height / height) * rng.uniform(0.5, 1.0)
    box_w, box_h = width * fit, height * fit
    x, y = rng.uniform(0, photo.width - box_w), rng.uniform(0, photo.height - box_h)
    image = photo.resize((width, height), Image.Resampling.BICUBIC, box=(x, y, x + box_w, y + box_h))
    pixels = np.asarray(image, dtype=np.float32) * rng.uniform(0.8, 1.2, size=3)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=quality)


_PHOTOS: dict[str, Image.Image] = {}


def _photo(name: str) -> Image.Image:
    if name not in _PHOTOS:
        import sklearn.datasets

        _PHOTOS[name] = Image.open(Path(sklearn.datasets.__file__).parent / "images" / name).convert("RGB")
    return _PHOTOS[name]


def _jpegs(work_dir: Path, pre: PreprocessSettings, embed: EmbedSettings,
           parts: Sequence[str]) -> tuple[Path, list[ImageRecord]]:
    count = max(pre.images if "preprocess" in parts else 0, embed.images if "embed" in parts else 0)
    width, height = embed.image_size
    folder = work_dir / f"jpegs-{width}x{height}-q{embed.quality}-{count}"
    start = time.perf_counter()
    make_jpegs(folder, count=count, size=(width, height), quality=embed.quality, processes=default_workers())
    log.info("%d JPEGs ready in %s (%.1f s)", count, folder, time.perf_counter() - start)
    records = list_split(folder, SPLIT)
    return folder, records[: embed.images] if "embed" in parts else records


# -- the machine, timing helpers, the report ---------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on, and when."""
    import torchvision
    import transformers

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
    }
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    matmul_bf16_tflops=matmul_tflops(device))
    return info


def matmul_tflops(device: torch.device, *, n: int = 8192, iters: int = 10) -> float:
    """The achievable dense bf16 rate: an n x n x n matrix product on random data, in TFLOP/s."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def format_report(results: dict[str, Any]) -> str:
    """The figures as a few tables for the terminal."""
    m = results["machine"]
    lines = [(f"{results['model']} on {m.get('gpu', m['cpu'])} ({m['cores']} cores), {m['date']}, "
              f"load {m['load_average'][0]}")]
    if "preprocess" in results:
        lines += _preprocess_lines(results["preprocess"])
    if results.get("flops_per_image"):
        peak = f", peak {results['peak_tflops']:.0f} TFLOP/s" if results.get("peak_tflops") else ""
        lines.append(f"FLOPs per image (counted): {results['flops_per_image'] / 1e9:.3f} G{peak}")
    if "model_alone" in results:
        lines += _model_lines(results["model_alone"])
    if "embed" in results:
        lines += _embed_lines(results["embed"])
    if "writer" in results:
        w = results["writer"]
        lines.append(f"(d) Parquet writer: {w['rows']} rows x {w['dim']}: {w['rows_per_s']:,.0f} rows/s "
                     f"({w['mb_per_s']:.0f} MB/s of float32)")
    return "\n".join(lines)


def _preprocess_lines(p: dict[str, Any]) -> list[str]:
    r = p["images_per_s"]
    return [(
        f"(a) decode + preprocess, 1 core, {p['images']} JPEGs, images/s: ours {r['ours']:.0f} "
        f"(worker part {r['ours_worker']:.0f}), SiglipImageProcessor {r['processor_pil']:.0f} (PIL in) / "
        f"{r['processor_tensor']:.0f} (tensor in) -> {p['speedup_vs_processor']:.2f}x the faster; "
        f"max abs diff {p['max_abs_diff']:.1e} (device decode: {p['device_decode_max_abs_diff']:.1e})"
    )]


def _model_lines(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["(b) model alone:",
             f"  {'dtype':<10}{'batch':>6}{'compile':>9}{'img/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'warmup s':>10}"]
    for r in runs:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"  {r['dtype']:<10}{r['batch_size']:>6}{'yes' if r['compile'] else 'no':>9}"
                     f"{r['images_per_s']:>10.1f}{r['tflops']:>9.2f}{mfu:>7}{r['warmup_s']:>10.1f}")
    return lines


def _embed_lines(rows: list[dict[str, Any]]) -> list[str]:
    first = rows[0]
    lines = [(f"(c) embed job, {first['images']} JPEGs, {first['dtype']}, batch {first['batch_size']}, "
              f"{'compiled' if first['compile'] else 'eager'}; bound = min((a) x workers, model alone):"),
             (f"  {'decode':<8}{'workers':>8}{'data img/s':>12}{'model img/s':>12}{'job img/s':>11}"
              f"{'job/data':>10}{'job/bound':>11}{'MFU':>7}{'start s':>9}")]
    for r in rows:
        vs_bound = f"{r['vs_bound']:.1%}" if r["vs_bound"] else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"  {'device' if r['device_decode'] else 'workers':<8}{r['num_workers']:>8}"
                     f"{r['data_path_images_per_s']:>12.1f}{r['model_alone_images_per_s']:>12.1f}"
                     f"{r['images_per_s']:>11.1f}{r['vs_data_path']:>10.1%}{vs_bound:>11}{mfu:>7}"
                     f"{r['last_run']['first_batch_s']:>9.2f}")
    return lines


@hydra.main(config_path=CONF_DIR, config_name="bench", version_base="1.3")
@clean_errors(WeightsUnavailableError, FileNotFoundError, ValueError)
def main(cfg: DictConfig) -> None:
    def section(name: str) -> dict[str, Any]:
        return OmegaConf.to_container(cfg[name], resolve=True)

    results = run_bench(
        model=cfg.model.name_or_path,
        revision=cfg.model.revision,
        device=cfg.device,
        parts=list(cfg.parts),
        output=cfg.output,
        work_dir=cfg.work_dir,
        peak_tflops=cfg.peak_tflops,
        preprocess=PreprocessSettings(**section("preprocess")),
        sweep=SweepSettings(**section("sweep")),
        embed=EmbedSettings(**section("embed")),
        writer=WriterSettings(**section("writer")),
        command=" ".join(["python -m pipelines.bench", *sys.argv[1:]]),
    )
    print(format_report(results))
    print(f"figures: {cfg.output}")


if __name__ == "__main__":
    main()
