"""`python -m pipelines.bench.sources`: the data path (read, decode, resize; no model) from tars against the same
images as files, one DataLoader worker each, measured side by side; the same tars from a local HTTP server; and
the peak memory of a worker reading one large tar (it must not grow with the shard).

Prints a table and writes outputs/bench/sources.json. Options: --images N (default 2000), --big-gb G (the large
tar, default 1.0; 0 skips it), --rounds R (alternating runs per row, the best kept).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import io
import json
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from pipelines.bench.jpegs import make_jpegs
from pipelines.data import decode, list_split, worker_init
from pipelines.presets import SO400M_PREPROCESSOR
from pipelines.runners.local import make_loader
from pipelines.runners.stream import UnitDataset, collate_stream
from pipelines.siglip import Preprocess
from pipelines.sources.files import FileSource

BATCH = 64


def write_tars(root: Path, out: Path, *, per_shard: int = 500) -> list[Path]:
    """The folder's train images as WebDataset tars (key.jpg + key.cls), in listing order."""
    out.mkdir(parents=True, exist_ok=True)
    records = list_split(root, "train")
    tars = []
    for shard, start in enumerate(range(0, len(records), per_shard)):
        path = out / f"{shard:05d}.tar"
        if not path.exists():
            with tarfile.open(path, "w") as tar:
                for i, record in enumerate(records[start:start + per_shard]):
                    for ext, data in (("jpg", (root / record.path).read_bytes()), ("cls", record.label.encode())):
                        info = tarfile.TarInfo(f"{shard:05d}{i:04d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        tars.append(path)
    return tars


def folder_rate(root: Path, preprocess: Preprocess) -> float:
    records = list_split(root, "train")
    start = time.perf_counter()
    loader = make_loader(root=root, records=records, preprocess=preprocess, batch_size=BATCH, num_workers=1,
                         device=torch.device("cpu"))
    count = sum(len(batch.indices) for batch in loader)
    return count / (time.perf_counter() - start)


def tar_rate(pattern: str, preprocess: Preprocess) -> tuple[float, int]:
    """(rows/s, the worker's peak resident memory in bytes) for the tars `pattern` names."""
    source = FileSource.build(data_files={"train": pattern}, storage_options=None, format="auto",
                              image_extensions=["jpg"], image_column="auto", label="auto", keep_columns=[],
                              retries=3)
    units = source.list("train").units
    def load(data: bytes) -> torch.Tensor:
        return preprocess.resize(decode(data))

    start = time.perf_counter()
    dataset = UnitDataset(source, units, {}, load, 1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=1, collate_fn=collate_stream,
                                         prefetch_factor=2, worker_init_fn=worker_init)  # as embed_units makes it
    with PeakRss() as peak:
        count = sum(len(batch.indices) for batch in loader)
    rate = count / (time.perf_counter() - start)
    return rate, peak.bytes


class PeakRss:
    """The largest resident set of this process's children (the decode worker), sampled every 20 ms."""

    def __init__(self) -> None:
        self.bytes, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.02):
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self.bytes = max(self.bytes, child.memory_info().rss)


@contextlib.contextmanager
def serve(folder: Path):
    handler = functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def big_tar(folder: Path, root: Path, gigabytes: float) -> Path:
    """One tar of about `gigabytes`, the folder's JPEGs repeated under new keys."""
    path = folder / "big" / "00000.tar"
    if path.exists() and path.stat().st_size >= gigabytes * 2**30:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    blobs = [(root / r.path).read_bytes() for r in list_split(root, "train")]
    with tarfile.open(path, "w") as tar:
        written, i = 0, 0
        while written < gigabytes * 2**30:
            data = blobs[i % len(blobs)]
            info = tarfile.TarInfo(f"{i:09d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            written, i = written + len(data) + 512, i + 1
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--big-gb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("outputs/bench/sources"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    preprocess = Preprocess.from_config(SO400M_PREPROCESSOR)
    root = make_jpegs(args.dir / "jpegs", count=args.images, size=(500, 375), quality=90)
    write_tars(root, args.dir / "tars")
    rows: dict[str, list[float]] = {"files": [], "tars": [], "tars over http": []}
    with serve(args.dir / "tars") as base:
        shards = len(list((args.dir / "tars").glob("*.tar")))
        for _ in range(args.rounds):  # alternating, so that a busy moment hits every row alike
            rows["files"].append(folder_rate(root, preprocess))
            rows["tars"].append(tar_rate(str(args.dir / "tars" / "*.tar"), preprocess)[0])
            rows["tars over http"].append(tar_rate(f"{base}/{{00000..{shards - 1:05d}}}.tar", preprocess)[0])
    best = {name: max(rates) for name, rates in rows.items()}
    report: dict[str, Any] = {"images": args.images, "rows_per_s": best,
                              "tars_vs_files": best["tars"] / best["files"],
                              "http_vs_files": best["tars over http"] / best["files"]}
    print(f"data path, one worker, {args.images} JPEGs 500x375, best of {args.rounds} alternating runs")
    for name, rate in best.items():
        print(f"  {name:<16}{rate:>8.1f} rows/s  ({rate / best['files']:.2f}x files)")
    if args.big_gb > 0:
        before = tar_rate(str(args.dir / "tars" / "*.tar"), preprocess)[1]  # the worker on 500-image shards
        path = big_tar(args.dir, root, args.big_gb)
        rate, peak = tar_rate(str(path), preprocess)
        report["big_tar"] = {"bytes": path.stat().st_size, "rows_per_s": rate, "worker_peak_rss_bytes": peak,
                             "small_shards_worker_peak_rss_bytes": before}
        print(f"  one {path.stat().st_size / 2**30:.2f} GiB tar: {rate:.1f} rows/s; decode workers' peak RSS "
              f"{peak / 2**20:.0f} MiB (on the {args.images // 500 or 1} small tars: {before / 2**20:.0f} MiB)")
    out = args.dir.parent / "sources.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
