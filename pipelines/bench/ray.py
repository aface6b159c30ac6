"""`python -m pipelines.bench.ray`: `runner=ray` against the local runner on the same generated JPEGs, as a user
runs them (the CLI, a fresh process each, Ray's start included), alternating, with the ratio of their rates.

The JPEGs (500x375, as `pipelines.bench` makes them) are split into `train` and `valid` folders, so the per-split
costs show as they do in a default job. Prints one row per run and the best of each runner, and writes
outputs/bench/ray.json. Options: --images N (default 1000), --rounds R (default 3), --model (default tiny),
and any further `key=value` goes to both jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.bench import SPLIT
from pipelines.bench.jpegs import make_jpegs

SPLITS = ("train", "valid")


def two_splits(jpegs: Path, out: Path) -> Path:
    """`out/{train,valid}/<class>`: links to the generated class folders, the first half train, the rest valid."""
    classes = sorted(p.name for p in (jpegs / SPLIT).iterdir() if p.is_dir())
    for i, name in enumerate(classes):
        link = out / SPLITS[i * 2 >= len(classes)] / name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((jpegs / SPLIT / name).resolve(), target_is_directory=True)
    return out


def run_cli(runner: str, root: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    """One `python -m pipelines.embed` run into an emptied `out`: its wall time (process start to exit) and rows."""
    command = [sys.executable, "-m", "pipelines.embed", f"runner={runner}", f"dataset.root={root}",
               f"output_dir={out}", "overwrite=true", "progress=false", *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local Ray, as by default
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((out / "_summary.json").read_text())
    return {"wall_s": wall, "images": summary["images"], "job_wall_s": summary["wall_s"],
            "split_wall_s": [s["wall_s"] for s in summary["splits"]],
            "images_per_s": summary["images"] / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dir", type=Path, default=Path("outputs/bench/ray"))
    parser.add_argument("overrides", nargs="*", help="key=value for both jobs, e.g. batch_size=32")
    args = parser.parse_args()
    jpegs = make_jpegs(args.dir / f"jpegs-{args.images}", count=args.images, size=(500, 375), quality=90)
    root = two_splits(jpegs, args.dir / f"splits-{args.images}")
    extra = [f"model={args.model}", "device=cpu", *args.overrides]
    runs: dict[str, list[dict[str, Any]]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as scratch:
        for round_ in range(args.rounds):  # alternating, so that a busy moment hits both alike
            for runner, rows in runs.items():
                run = run_cli(runner, root, Path(scratch) / runner, extra)
                rows.append(run)
                splits = ", ".join(f"{s:.1f}" for s in run["split_wall_s"])
                print(f"round {round_}  {runner:<6}{run['images']:>7} images {run['wall_s']:>7.1f} s "
                      f"{run['images_per_s']:>8.1f} img/s  (splits: {splits} s)", flush=True)
    best = {runner: max(r["images_per_s"] for r in rows) for runner, rows in runs.items()}
    ratios = [r["images_per_s"] / l["images_per_s"] for l, r in zip(runs["local"], runs["ray"])]
    report = {"images": args.images, "command": " ".join(["python -m pipelines.bench.ray", *sys.argv[1:]]),
              "load_avg": os.getloadavg(), "runs": runs, "best_images_per_s": best,
              "ray_vs_local_best": best["ray"] / best["local"], "ray_vs_local_per_round": ratios}
    print(f"best: local {best['local']:.1f} img/s, ray {best['ray']:.1f} img/s, "
          f"ray/local {report['ray_vs_local_best']:.2f} (per round: {', '.join(f'{r:.2f}' for r in ratios)})")
    out = args.dir.parent / "ray.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
