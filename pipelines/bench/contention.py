"""`python -m pipelines.bench.contention`: how much the embed job slows down when another program keeps every
core busy, next to a hand-written loop over the same files (what a new user writes first), side by side.

Each method runs on an idle machine and under a CPU hog (one busy-looping process per core), alternating; the
figure is the slowdown (time under the hog / time idle; lower is better). Methods: the hand-written loop (decode,
resize, batch, model in one process, torch's default threads), the embed job as it runs now (decode workers plus
an encoder whose threads are the cores less the workers), and the embed job with torch's default encoder threads
(how it ran before the budget). Writes outputs/bench/contention.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from pipelines.bench.jpegs import make_jpegs
from pipelines.data import decode, list_split
from pipelines.runners.job import encoder_threads
from pipelines.runners.local import run as local_run
from pipelines.runners.split import Job
from pipelines.siglip import EncoderSpec, load_encoder


def hand_written(root: Path, batch_size: int) -> float:
    """Seconds for the loop a user writes: read, decode, resize, batch, embed; one process."""
    encoder = load_encoder("tiny", device="cpu")
    start = time.perf_counter()
    batch = []
    for record in list_split(root, "train"):
        batch.append(encoder.preprocess.resize(decode((root / record.path).read_bytes())))
        if len(batch) == batch_size:
            encoder.embed_uint8(torch.stack(batch))
            batch = []
    if batch:
        encoder.embed_uint8(torch.stack(batch))
    return time.perf_counter() - start


def job_seconds(root: Path, out: Path, *, batch_size: int, threads: int | None) -> float:
    """Seconds for the local runner over the folder (model loaded inside, as in a job)."""
    shutil.rmtree(out, ignore_errors=True)
    job = Job(encoder=EncoderSpec("tiny", None, "cpu", "float32"), root=root, output_dir=out, prefix="bench",
              batch_size=batch_size, num_workers="auto", rows_per_part=4096, progress=False, max_pixels=None,
              compile=False, threads=threads)
    start = time.perf_counter()
    local_run(job, {"train": list_split(root, "train")}, device_decode=False)
    return time.perf_counter() - start


def _spin(stop: Any) -> None:
    while not stop.is_set():
        sum(range(10000))


class Hog:
    """One busy-looping process per core while inside the block."""

    def __enter__(self) -> Hog:
        context = mp.get_context("fork")
        self.stop = context.Event()
        self.procs = [context.Process(target=_spin, args=(self.stop,), daemon=True)
                      for _ in range(len(os.sched_getaffinity(0)))]
        for proc in self.procs:
            proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for proc in self.procs:
            proc.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dir", type=Path, default=Path("outputs/bench/contention"))
    args = parser.parse_args()
    root = make_jpegs(args.dir / "jpegs", count=args.images, size=(500, 375), quality=90)
    budget = encoder_threads("auto", devices=1)
    methods = {
        "hand-written loop": lambda: hand_written(root, args.batch_size),
        f"embed job ({budget} encoder thread(s))": lambda: job_seconds(root, args.dir / "out",
                                                                       batch_size=args.batch_size, threads=budget),
        f"embed job (torch default, {torch.get_num_threads()} threads)": lambda: job_seconds(
            root, args.dir / "out", batch_size=args.batch_size, threads=torch.get_num_threads()),
    }
    times: dict[str, dict[str, list[float]]] = {m: {"idle": [], "hog": []} for m in methods}
    for _ in range(args.rounds):
        for name, method in methods.items():
            times[name]["idle"].append(method())
            with Hog():
                times[name]["hog"].append(method())
    report = {name: {"idle_s": min(t["idle"]), "hog_s": min(t["hog"]),
                     "slowdown": min(t["hog"]) / min(t["idle"])} for name, t in times.items()}
    print(f"{args.images} JPEGs 500x375, tiny model, best of {args.rounds}; slowdown = under a CPU hog / idle")
    for name, row in report.items():
        print(f"  {name:<40} idle {row['idle_s']:6.1f} s   hog {row['hog_s']:6.1f} s   slowdown {row['slowdown']:.2f}x")
    out = args.dir.parent / "contention.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
