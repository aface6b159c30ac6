"""`python -m pipelines.bench.dedup`: the near-duplicate threshold study and `pipelines.dedup`'s time on many rows.

Study: real photos (scikit-image's and scikit-learn's sample photos), each cut into its 4 quadrants, which are the
originals (distinct images; quadrants of one photo are the hard negatives: same colours and textures). Each
original gets four planted copies: `exact` (the same bytes), `reencoded` (JPEG quality 40), `resized` (to half
size), `cropped` (5% cut from every side). All are embedded with the model (decoded and preprocessed as the embed
job does). For each threshold and kind: recall = planted (original, copy) pairs at or above the threshold / all
planted pairs of that kind; precision = planted pairs found / every pair found among the originals and that kind's
copies (the other pairs are false: two different images).

Timing: a generated output of `--rows` clustered vectors of `--dim` with 1% planted near-copies
(`pipelines.bench.synthetic`), searched by `pipelines.dedup.run_dedup` with conf/dedup.yaml's settings; the
planted pairs found are counted.

    python -m pipelines.bench.dedup --rows 0                    # the study alone (tiny model, a minute)
    python -m pipelines.bench.dedup --skip-study --rows 1000000 # dedup's time on 1M x 1152
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from pipelines.config import CONF_DIR
from pipelines.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("exact", "reencoded", "resized", "cropped")
THRESHOLDS = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9995, 0.9999)


def photos() -> list[tuple[str, Any]]:
    """(name, RGB PIL image) of the sample photos shipped inside scikit-image and scikit-learn (no download)."""
    from PIL import Image

    try:
        from skimage import data
    except ImportError as exc:
        raise UserError("the study needs scikit-image's photos: pip install scikit-image (the test extra)") from exc
    import sklearn.datasets

    found = []
    for name in ("astronaut", "camera", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "motorcycle", "retina", "moon", "page", "coins", "horse", "clock", "brick", "grass", "gravel",
                 "logo", "text", "cell"):
        try:
            pixels = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        except Exception as exc:  # noqa: BLE001 - a photo fetched on demand (pooch) is absent offline
            log.info("skipping %s: %s", name, exc)
            continue
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8:
            pixels = (255 * (pixels.astype(np.float64) / max(float(pixels.max()), 1e-9))).astype(np.uint8)
        found.append((name, Image.fromarray(pixels).convert("RGB")))
    images_dir = Path(sklearn.datasets.__file__).parent / "images"
    found += [(p.stem, Image.open(p).convert("RGB")) for p in sorted(images_dir.glob("*.jpg"))]
    return found


def encode(image: Any, fmt: str = "PNG", **kw: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def planted_set() -> tuple[list[bytes], dict[str, list[bytes]]]:
    """The originals (PNG bytes: lossless) and, per kind, one copy of each, in the same order."""
    originals, copies = [], {kind: [] for kind in KINDS}
    for _, photo in photos():
        w, h = photo.size
        for box in ((0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h)):
            part = photo.crop(box)
            pw, ph = part.size
            originals.append(encode(part))
            copies["exact"].append(originals[-1])
            copies["reencoded"].append(encode(part, "JPEG", quality=40))
            copies["resized"].append(encode(part.resize((max(pw // 2, 1), max(ph // 2, 1)))))
            dx, dy = round(0.05 * pw), round(0.05 * ph)
            copies["cropped"].append(encode(part.crop((dx, dy, pw - dx, ph - dy))))
    return originals, copies


def embed_all(blobs: list[bytes], *, model: str, device: str) -> np.ndarray:
    """Encoded images -> L2-normalised float32 [n, D], decoded and preprocessed as the embed job does."""
    import torch

    from pipelines.data import decode
    from pipelines.siglip import load_encoder

    encoder = load_encoder(model, device=device, dtype="float32")
    out = []
    for lo in range(0, len(blobs), 32):
        batch = torch.stack([encoder.preprocess.resize(decode(b)) for b in blobs[lo:lo + 32]])
        out.append(encoder.embed_uint8(batch).cpu().numpy())
    x = np.concatenate(out)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def measure(originals: np.ndarray, copies: np.ndarray, thresholds: tuple[float, ...]) -> list[dict[str, float]]:
    """Recall and precision at each threshold of one kind's copies (row i copies original i)."""
    n = len(originals)
    x = np.concatenate([originals, copies]).astype(np.float64)
    sims = x @ x.T
    upper = np.triu(np.ones_like(sims, dtype=bool), k=1)
    planted = np.zeros_like(upper)
    planted[np.arange(n), np.arange(n) + n] = True
    rows = []
    for t in thresholds:
        found = upper & (sims >= t)
        true = int((found & planted).sum())
        rows.append({"threshold": t, "recall": true / n, "precision": true / max(int(found.sum()), 1),
                     "false_pairs": int(found.sum()) - true})
    return rows


def study(*, model: str, device: str, thresholds: tuple[float, ...]) -> dict[str, Any]:
    """The threshold study (see the module docstring): per kind, recall and precision at each threshold."""
    start = time.perf_counter()
    originals, copies = planted_set()
    emb = embed_all(originals + [c for kind in KINDS for c in copies[kind]], model=model, device=device)
    n = len(originals)
    per_kind = {kind: measure(emb[:n], emb[n * (i + 1):n * (i + 2)], thresholds) for i, kind in enumerate(KINDS)}
    sims = {kind: np.sum(emb[:n] * emb[n * (i + 1):n * (i + 2)], axis=1) for i, kind in enumerate(KINDS)}
    others = emb[:n] @ emb[:n].T
    distinct = others[np.triu_indices(n, k=1)]
    return {"model": model, "originals": n, "photos": n // 4, "per_kind": per_kind,
            "copy_cosine": {k: {"min": float(v.min()), "median": float(np.median(v))} for k, v in sims.items()},
            "distinct_cosine": {"median": float(np.median(distinct)), "p99": float(np.quantile(distinct, 0.99)),
                                "max": float(distinct.max())},
            "seconds": round(time.perf_counter() - start, 1)}


def timing(*, rows: int, dim: int, folder: Path, device: str) -> dict[str, Any]:
    """dedup's time on a generated output of `rows` x `dim` with 1% planted near-copies; the pairs it finds."""
    import pandas as pd

    from pipelines.bench.synthetic import planted, write_store
    from pipelines.dedup import run_dedup

    out = folder / f"synthetic-{rows}x{dim}"  # shared with pipelines.bench.explore
    written = write_store(out, rows=rows, dim=dim, clusters=1000, copies=0.01)
    cfg = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "dedup.yaml"), resolve=False)
    settings = {key: cfg[key] for key in ("threshold", "chunk_rows", "exact_below", "cells", "probe", "train_rows",
                                          "iters", "seed")}
    start = time.perf_counter()
    summary = run_dedup(embeddings_dir=out, splits=None, output_dir=None, device=device, **settings)
    seconds = time.perf_counter() - start
    pairs = pd.read_parquet(Path(summary["pairs_file"]), columns=["path_a", "path_b"])
    ids = np.sort(np.stack([pairs.path_a.str.slice(-12, -4).astype(np.int64),
                            pairs.path_b.str.slice(-12, -4).astype(np.int64)], axis=1), axis=1)
    original, copy = planted(rows, copies=0.01, seed=0)
    found = set(map(tuple, ids.tolist()))
    hit = sum((int(a), int(b)) in found for a, b in zip(original, copy, strict=True))
    return {"rows": rows, "dim": dim, "search": summary["search"], "threshold": summary["threshold"],
            "seconds": round(seconds, 1), "pairs": summary["pairs"], "planted": len(copy),
            "planted_found": hit, "write_s": written["write_s"]}


def format_report(report: dict[str, Any]) -> str:
    lines = []
    s = report.get("study")
    if s:
        lines.append(f"threshold study: {s['originals']} originals ({s['photos']} photos x 4 quadrants), model "
                     f"{s['model']}; distinct pairs' cosine median {s['distinct_cosine']['median']:.4f}, p99 "
                     f"{s['distinct_cosine']['p99']:.4f}, max {s['distinct_cosine']['max']:.4f}")
        lines.append(f"{'threshold':>9}  " + "  ".join(f"{k + ' R/P':>17}" for k in KINDS))
        for i, t in enumerate(s["per_kind"][KINDS[0]]):
            cells = [f"{s['per_kind'][k][i]['recall']:.2f} / {s['per_kind'][k][i]['precision']:.2f}" for k in KINDS]
            lines.append(f"{t['threshold']:>9}  " + "  ".join(f"{c:>17}" for c in cells))
        lines.append("copies' cosine to their original (min / median): " + ", ".join(
            f"{k} {v['min']:.4f} / {v['median']:.4f}" for k, v in s["copy_cosine"].items()))
    t = report.get("timing")
    if t:
        lines.append(f"dedup on {t['rows']:,} x {t['dim']}: {t['seconds']:.1f} s ({t['search']}), {t['pairs']} pairs, "
                     f"{t['planted_found']} of {t['planted']} planted pairs found")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench.dedup", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="the study's model (tiny: offline)")
    p.add_argument("--skip-study", action="store_true")
    p.add_argument("--rows", type=int, default=1_000_000, help="dedup timing rows; 0 skips the timing")
    p.add_argument("--dim", type=int, default=1152)
    p.add_argument("--folder", type=Path, default=Path("outputs/bench"), help="where the generated output goes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report: dict[str, Any] = {}
    if not args.skip_study:
        report["study"] = study(model=args.model, device=args.device, thresholds=THRESHOLDS)
    if args.rows:
        report["timing"] = timing(rows=args.rows, dim=args.dim, folder=args.folder, device=args.device)
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
