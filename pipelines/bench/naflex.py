"""`python -m pipelines.bench.naflex`: SigLIP 2 NaFlex against fixed resolution at the same model size, and how
NaFlex batches should be shaped, measured side by side in one run (random weights: speed does not depend on them).

(1) How much of a NaFlex batch is padding: for common photo shapes, the patches an image fills of
max_num_patches (NaFlex resizes each image at its own aspect ratio to at most that many). (2) images/s of the
so400m geometry, fixed resolution (so400m-patch14-384: 729 patches) against NaFlex (so400m-patch16-naflex: 256
patches, padding included), each through `Encoder.embed_uint8` as the embed job calls it. (3) One batch of mixed
shapes embedded padded to max_num_patches (what `NaFlexPreprocess.resize` gives: fixed shapes, so the DataLoader
stacks them and torch.compile sees one shape) against cut to the batch's longest image (the most any bucketing by
patch count could save), with the embeddings compared.

    python -m pipelines.bench.naflex                          # so400m on this machine's CPU, batch 4
    python -m pipelines.bench.naflex --device cuda --dtype bfloat16 --batch-size 64 --iters 10
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from pipelines.bench.machine import free, sync
from pipelines.bench.model import bench_model
from pipelines.errors import UserError
from pipelines.hub import SO400M_NAFLEX_RANDOM, SO400M_RANDOM
from pipelines.siglip import NaFlexPreprocess, load_encoder, naflex_size, stack_pixels

log = logging.getLogger(__name__)

# (width, height) of common photos: camera 4:3 and 3:2 both ways, square, 16:9 video, panoramas, strips.
SHAPES = ((500, 375), (375, 500), (500, 333), (500, 500), (640, 360), (1000, 250), (250, 1000), (2000, 200))


def padding(preprocess: NaFlexPreprocess) -> list[dict[str, Any]]:
    """Per shape of SHAPES: the patch grid NaFlex resizes it to and the share of max_num_patches it fills."""
    rows = []
    for width, height in SHAPES:
        h, w = naflex_size(height, width, patch_size=preprocess.patch_size, max_num_patches=preprocess.max_num_patches)
        patches = (h // preprocess.patch_size) * (w // preprocess.patch_size)
        rows.append({"image": f"{width}x{height}", "resized": f"{w}x{h}", "patches": patches,
                     "filled": patches / preprocess.max_num_patches})
    return rows


def padded_vs_trimmed(encoder: Any, *, iters: int) -> dict[str, Any]:
    """Bucketing's best case: one batch of SHAPES' images that do not fill max_num_patches, embedded padded to it
    and cut to the batch's longest image; images/s of each (best of `iters`) and the largest difference between
    their embeddings. (A batch holding any full image has nothing to cut.)"""
    p, most = encoder.preprocess.patch_size, encoder.preprocess.max_num_patches
    shapes = [(w, h) for w, h in SHAPES
              if math.prod(n // p for n in naflex_size(h, w, patch_size=p, max_num_patches=most)) < most]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for w, h in shapes]
    batch = {k: v.to(encoder.device) for k, v in stack_pixels([encoder.preprocess.resize(i) for i in images]).items()}
    inputs = encoder.preprocess.normalize(batch, dtype=encoder.dtype)
    longest = int(inputs["pixel_attention_mask"].sum(1).max())
    trimmed = {**inputs, "pixel_values": inputs["pixel_values"][:, :longest],
               "pixel_attention_mask": inputs["pixel_attention_mask"][:, :longest]}
    out: dict[str, Any] = {"images": [f"{w}x{h}" for w, h in shapes], "longest": longest, "max_num_patches": most}
    embeddings = {}
    for name, x in (("padded", inputs), ("trimmed", trimmed)):
        embeddings[name] = encoder.embed(x)  # warm-up, and the embeddings compared
        best = float("inf")
        for _ in range(iters):
            start = time.perf_counter()
            encoder.embed(x)
            sync(encoder.device)
            best = min(best, time.perf_counter() - start)
        out[f"{name}_images_per_s"] = len(images) / best
    out["max_abs_difference"] = float((embeddings["padded"] - embeddings["trimmed"]).abs().max())
    return out


def run(*, fixres: str, naflex: str, device: str, dtype: str, batch_size: int, iters: int) -> dict[str, Any]:
    """The three measurements on the models `fixres` and `naflex` (presets, directories or hub ids); each is
    loaded, timed and freed in turn."""
    results: dict[str, Any] = {"device": device, "dtype": dtype, "batch_size": batch_size, "iters": iters,
                               "threads": torch.get_num_threads()}
    for key, model in (("fixres", fixres), ("naflex", naflex)):
        encoder = load_encoder(model, device=device, dtype=dtype)
        if isinstance(encoder.preprocess, NaFlexPreprocess) != (key == "naflex"):
            raise UserError(f"--{key} {model}: {'not ' if key == 'naflex' else ''}a NaFlex checkpoint")
        figures = bench_model(encoder, batch_size=batch_size, warmup=1, iters=iters, repeats=1)
        results[key] = {"model": model, "images_per_s": figures["images_per_s"], "warmup_s": figures["warmup_s"],
                        "patches": _patches(encoder)}
        log.info("%s: %.3f images/s", model, figures["images_per_s"])
        if key == "naflex":
            results["padding"] = padding(encoder.preprocess)
            results["padded_vs_trimmed"] = padded_vs_trimmed(encoder, iters=iters)
        del encoder
        free(torch.device(device))
    results["naflex_vs_fixres"] = results["naflex"]["images_per_s"] / results["fixres"]["images_per_s"]
    return results


def _patches(encoder: Any) -> int:
    """Patches per image: max_num_patches (NaFlex, padding included), else the fixed grid's."""
    if isinstance(encoder.preprocess, NaFlexPreprocess):
        return encoder.preprocess.max_num_patches
    patch = encoder.model.config.patch_size
    return (encoder.preprocess.height // patch) * (encoder.preprocess.width // patch)


def report(results: dict[str, Any]) -> str:
    """The figures as a short text report."""
    fixres, naflex = results["fixres"], results["naflex"]
    trim = results["padded_vs_trimmed"]
    lines = [
        f"{results['device']} {results['dtype']}, batch {results['batch_size']}, {results['threads']} threads",
        (f"  fixed resolution, {fixres['model']} ({fixres['patches']} patches): "
         f"{fixres['images_per_s']:.3f} images/s"),
        (f"  NaFlex, {naflex['model']} ({naflex['patches']} patches, 500x375 images): "
         f"{naflex['images_per_s']:.3f} images/s ({results['naflex_vs_fixres']:.2f}x)"),
        f"  patches filled of {naflex['patches']}, by image shape: " + ", ".join(
            f"{row['image']} {row['patches']} ({row['filled']:.0%})" for row in results["padding"]),
        (f"  one batch of the {len(trim['images'])} shapes that do not fill it: padded to {trim['max_num_patches']} "
         f"{trim['padded_images_per_s']:.3f} images/s, cut to its longest ({trim['longest']}) "
         f"{trim['trimmed_images_per_s']:.3f} images/s; embeddings differ by at most "
         f"{trim['max_abs_difference']:.1e}"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixres", default=SO400M_RANDOM, help="the fixed-resolution model (preset, dir, hub id)")
    parser.add_argument("--naflex", default=SO400M_NAFLEX_RANDOM, help="the NaFlex model of the same size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("outputs/bench/naflex.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = run(fixres=args.fixres, naflex=args.naflex, device=args.device, dtype=args.dtype, batch_size=args.batch_size, iters=args.iters)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()
