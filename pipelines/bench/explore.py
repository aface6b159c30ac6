"""`python -m pipelines.bench.explore`: the explore app's query latency through its HTTP API, p50 / p99, on generated
outputs of 100k and 1M rows (`pipelines.bench.synthetic`), with the exact and the approximate (IVF) index.

Each query is `GET /api/search?path=<a random row>&k=10` ("more like this": the row's stored embedding, no model)
sent one at a time over a kept-alive connection to the real app (uvicorn on 127.0.0.1), so the figure is what a
user or a script waits for: HTTP, the lookup, the FAISS search, the JSON. A second series adds `filter_split=valid`
(2% of the rows: FAISS's id selector). The time to open the catalog (rows + index: built, or loaded when saved) is
reported too; the text tower's own time per query is measured apart (it adds to text queries only).

    python -m pipelines.bench.explore                       # 100k and 1M x 1152, exact and ivf
    python -m pipelines.bench.explore --rows 100000 --kinds exact
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

from pipelines.bench.search import ann_defaults
from pipelines.bench.synthetic import write_store
from pipelines.explore.app import Explorer, Limits, make_app
from pipelines.explore.catalog import Catalog
from pipelines.explore.images import ImageStore, ThumbnailCache
from pipelines.explore.reports import Reports

log = logging.getLogger(__name__)


def serve_in_thread(explorer: Explorer, port: int) -> tuple[Any, threading.Thread, int]:
    """The app on 127.0.0.1:`port` (0: a free one) in a thread; (server, thread, port) once it answers."""
    import socket

    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]

    server = uvicorn.Server(uvicorn.Config(make_app(explorer), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while True:
        try:
            requests.get(f"http://127.0.0.1:{port}/api/info", timeout=5)
            return server, thread, port
        except requests.ConnectionError:
            time.sleep(0.05)


def latencies(url: str, paths: list[str], extra: dict[str, str]) -> np.ndarray:
    """Milliseconds of each query, sent one after another on one connection (after 10 warm-up queries)."""
    session = requests.Session()
    for path in paths[:10]:
        session.get(f"{url}/api/search", params={"path": path, "k": 10, **extra}, timeout=60).raise_for_status()
    out = []
    for path in paths:
        t0 = time.perf_counter()
        session.get(f"{url}/api/search", params={"path": path, "k": 10, **extra}, timeout=60).raise_for_status()
        out.append(1000 * (time.perf_counter() - t0))
    return np.asarray(out)


def one_size(*, rows: int, dim: int, kinds: list[str], queries: int, folder: Path, port: int) -> list[dict[str, Any]]:
    out = folder / f"synthetic-{rows}x{dim}"
    write_store(out, rows=rows, dim=dim, clusters=1000, copies=0.01)
    results = []
    for kind in kinds:
        t0 = time.perf_counter()
        catalog = Catalog(out, splits=None, index=kind, index_dir=folder / f"synthetic-{rows}x{dim}-index",
                          options=ann_defaults())
        opened = time.perf_counter() - t0
        reopened = None
        if kind != "exact":  # the saved index: what every later start costs
            del catalog
            gc.collect()
            t0 = time.perf_counter()
            catalog = Catalog(out, splits=None, index=kind, index_dir=folder / f"synthetic-{rows}x{dim}-index",
                              options=ann_defaults())
            reopened = time.perf_counter() - t0
        explorer = Explorer(catalog, ImageStore(out), Reports(out), None, None, Limits(), {"rows": rows},
                            ThumbnailCache())
        server, thread, bound = serve_in_thread(explorer, port)
        rng = np.random.default_rng(0)
        paths = catalog.paths.take(rng.choice(rows, size=queries, replace=False)).to_pylist()
        row = {"rows": rows, "dim": dim, "index": {"kind": kind, **catalog.searcher.settings()},
               "open_s": round(opened, 1), "reopen_s": None if reopened is None else round(reopened, 1)}
        for name, extra in (("all", {}), ("valid only", {"filter_split": "valid"})):
            ms = latencies(f"http://127.0.0.1:{bound}", paths, extra)
            row[name] = {"p50_ms": round(float(np.percentile(ms, 50)), 1),
                         "p99_ms": round(float(np.percentile(ms, 99)), 1), "queries": len(ms)}
        log.info("%s", row)
        results.append(row)
        server.should_exit = True
        thread.join(timeout=30)
        del explorer, catalog
        gc.collect()
    return results


def text_tower_ms(model: str, n: int = 50) -> dict[str, float]:
    """The text tower's time per query (in-process, CPU, one text at a time): p50 / p99 ms."""
    from pipelines.text import load_text_encoder

    encoder = load_text_encoder(model, revision=None, device="cpu", dtype="float32")
    encoder.embed(["warm up"])
    ms = []
    for i in range(n):
        t0 = time.perf_counter()
        encoder.embed([f"a photo of thing number {i}"])
        ms.append(1000 * (time.perf_counter() - t0))
    return {"model": model, "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def format_report(report: dict[str, Any]) -> str:
    lines = [(f"{'rows':>10} {'index':<28}{'open s':>8}{'reopen s':>10}{'p50 ms':>9}{'p99 ms':>9}"
              f"{'valid p50':>11}{'valid p99':>11}")]
    for r in report["runs"]:
        idx = ", ".join(f"{k} {v}" for k, v in r["index"].items())
        reopen = "" if r["reopen_s"] is None else r["reopen_s"]
        lines.append(f"{r['rows']:>10,} {idx:<28}{r['open_s']:>8}{reopen:>10}{r['all']['p50_ms']:>9}"
                     f"{r['all']['p99_ms']:>9}{r['valid only']['p50_ms']:>11}{r['valid only']['p99_ms']:>11}")
    if report.get("text"):
        t = report["text"]
        lines.append(f"text tower ({t['model']}, CPU): p50 {t['p50_ms']} ms, p99 {t['p99_ms']} ms per query")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench.explore", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=1152)
    p.add_argument("--kinds", nargs="+", choices=["exact", "ivf", "hnsw"], default=["exact", "ivf"])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--folder", type=Path, default=Path("outputs/bench"))
    p.add_argument("--port", type=int, default=8093)
    p.add_argument("--text-model", default="tiny", help="the text tower timed apart ('' skips it)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    runs = []
    for rows in args.rows:
        runs += one_size(rows=rows, dim=args.dim, kinds=args.kinds, queries=args.queries, folder=args.folder,
                         port=args.port)
    report = {"runs": runs, "text": text_tower_ms(args.text_model) if args.text_model else None}
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
