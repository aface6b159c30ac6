"""The four measured parts run side by side, the figures written as JSON after each part."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pipelines import store
from pipelines.bench import SPLIT
from pipelines.bench.embed import EmbedSettings, bench_embed
from pipelines.bench.flops import peak_flops
from pipelines.bench.jpegs import make_jpegs
from pipelines.bench.machine import machine
from pipelines.bench.model import SweepSettings, run_sweep
from pipelines.bench.preprocess import PreprocessSettings, bench_preprocess
from pipelines.bench.writer import WriterSettings, bench_writer
from pipelines.config import UserError
from pipelines.data import ImageRecord, list_split
from pipelines.devices import resolve_device
from pipelines.runners.local import default_workers
from pipelines.siglip import Encoder, load_encoder, load_preprocess, resolve_dtype

log = logging.getLogger(__name__)

PARTS = ("preprocess", "model", "embed", "writer")
SECTIONS = {"preprocess": PreprocessSettings, "sweep": SweepSettings, "embed": EmbedSettings,
            "writer": WriterSettings}


def bench_options(config: dict[str, Any]) -> dict[str, Any]:
    """conf/bench.yaml, composed and resolved into plain containers -> `run_bench`'s keyword arguments."""
    options = {key: SECTIONS[key](**value) if key in SECTIONS else value
               for key, value in config.items() if key != "model"}
    return {**options, "model": config["model"]["name_or_path"], "revision": config["model"]["revision"]}


def run_bench(
    *,
    model: str,
    revision: str | None,
    device: str,
    parts: Sequence[str],
    output: str | Path,
    work_dir: str | Path,
    peak_tflops: float | str | None,
    preprocess: PreprocessSettings,
    sweep: SweepSettings,
    embed: EmbedSettings,
    writer: WriterSettings,
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
    workers = embed.num_workers
    if workers != "auto" and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
        raise UserError(f"embed.num_workers={workers!r}: expected auto or a whole number >= 0")
    if len(embed.image_size) != 2 or min(embed.image_size) < 16:
        raise UserError(f"embed.image_size={list(embed.image_size)}: expected [width, height], each >= 16")
    for dtype in [*sweep.dtypes, embed.dtype]:
        resolve_dtype(dtype, torch.device("cpu"))  # the encoder's own check (a UserError), before any part runs


def _settings(parts: Sequence[str], *sections: Any) -> dict[str, Any]:
    return {"parts": list(parts), **{name: asdict(section) for name, section in zip(SECTIONS, sections)}}


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
