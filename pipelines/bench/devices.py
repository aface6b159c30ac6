"""`python -m pipelines.bench.devices`: the embed job on every device against one device, on the same generated
JPEGs, side by side; prints both rates and their ratio (the GPU check's multi-GPU step; `--all [cpu,cpu]` on a
CPU host). Writes outputs/bench/devices.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from pipelines.bench.jpegs import make_jpegs
from pipelines.embed import run_embed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="so400m-random")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--one", default="cuda:0", help="the single device")
    parser.add_argument("--all", default="auto", help="auto (every visible GPU) or a list, e.g. [cpu,cpu]")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--dir", type=Path, default=Path("outputs/bench/devices"))
    args = parser.parse_args()
    root = make_jpegs(args.dir / "jpegs", count=args.images, size=(500, 375), quality=90, processes=4)
    every = yaml.safe_load(args.all) if args.all.startswith("[") else args.all
    rates = {}
    for name, device in (("one", args.one), ("all", every)):
        out = args.dir / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        summary = run_embed(root=root, splits=["train"], output_dir=out, model=args.model, device=device,
                            dtype=args.dtype, batch_size=args.batch_size, progress=False)
        rates[name] = {"device": device, "images_per_s": summary["images_per_s"],
                       "devices": summary.get("devices", [])}
        print(f"{name}: device={device}: {summary['images_per_s']:.1f} images/s")
    ratio = rates["all"]["images_per_s"] / rates["one"]["images_per_s"]
    print(f"every device / one device: {ratio:.2f}x")
    out = args.dir.parent / "devices.json"
    out.write_text(json.dumps({**rates, "ratio": ratio}, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
