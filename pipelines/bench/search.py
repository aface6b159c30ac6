"""`python -m pipelines.bench.search`: recall@10 and queries/s of the approximate FAISS index against exact search,
side by side in one run, on generated unit vectors of the embeddings' shape (default 1,000,000 x 1,152 float32).

The database: `--rows` seeded random unit vectors, generated in chunks (never all in Python at once), uniform on
the sphere by default, or scattered around `--clusters` random centres (closer to real embeddings, which form
classes). The queries: `--queries` database rows picked at random, each perturbed by Gaussian noise of norm about
`--noise` and renormalised (cosine to their source row about 1/sqrt(1 + noise^2): 0.89 at 0.5). The exact top-k of
each query (a flat inner-product index, the one `pipelines.search` uses by default) is the ground truth.

What the figures mean. recall@k: the share of the exact top-k that the approximate index returns in its top-k.
`source found`: the share of queries whose perturbed source row is in the approximate top-k. On uniform random
vectors in 1,152-d, any two are nearly orthogonal (cosine ~ N(0, 1/1152), so |cos| < 0.15 between a query and
every row but its source): the exact top-1 is the source, and ranks 2..k are noise-floor rows with almost equal
scores and no relation to the query. recall@10 there measures whether the index happens to visit the cells of 9
unrelated rows: the worst case for an index that relies on neighbourhood structure. `source found` is the
meaningful figure on uniform data; with `--clusters` all k neighbours are real and recall@10 means what it says.
The build is timed once; each search setting (IVF nprobe, HNSW efSearch: query-time knobs, no rebuild) is warmed
up and timed on all queries `--repeat` times (best kept). One index is held at a time: peak memory about
rows x dim x 4 bytes (4.6 GB by default) plus one chunk.

    python -m pipelines.bench.search                                 # 1M x 1152, IVF (what index=auto picks)
    python -m pipelines.bench.search --rows 200000 --kinds ivf hnsw --clusters 1000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from pipelines import index as ann
from pipelines.config import CONF_DIR

log = logging.getLogger(__name__)


def ann_defaults() -> dict[str, Any]:
    """The `ann` settings of conf/search.yaml: the benchmark measures what `pipelines.search` would build."""
    return OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "search.yaml").ann)


class Vectors:
    """Seeded unit vectors float32 [rows, dim], made chunk by chunk on demand (the same values every pass)."""

    def __init__(self, *, rows: int, dim: int, clusters: int, spread: float, seed: int, chunk: int) -> None:
        self.rows, self.dim, self.clusters, self.spread = rows, dim, clusters, spread
        self.seed, self.chunk = seed, chunk
        self.centres = (ann.normalize(np.random.default_rng([seed, 1]).standard_normal((clusters, dim),
                                                                                       dtype=np.float32))
                        if clusters else None)

    def block(self, i: int) -> np.ndarray:
        """Chunk i: rows [i * chunk, min((i + 1) * chunk, rows))."""
        n = min(self.chunk, self.rows - i * self.chunk)
        rng = np.random.default_rng([self.seed, 2, i])
        x = rng.standard_normal((n, self.dim), dtype=np.float32)
        if self.centres is not None:
            x *= self.spread / np.sqrt(self.dim)
            x += self.centres[rng.integers(0, self.clusters, n)]
        return ann.normalize(x)

    def __call__(self) -> Iterator[np.ndarray]:
        for i in range(-(-self.rows // self.chunk)):
            yield self.block(i)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """The rows `ids` (sorted int64), regenerated from their chunks: float32 [len(ids), dim]."""
        out = np.empty((len(ids), self.dim), np.float32)
        for i in np.unique(ids // self.chunk):
            sel = np.flatnonzero(ids // self.chunk == i)
            out[sel] = self.block(int(i))[ids[sel] - i * self.chunk]
        return out


def make_queries(vectors: Vectors, *, n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n perturbed database rows: unit float32 [n, D], and their source row ids int64 [n]."""
    rng = np.random.default_rng([seed, 3])
    sources = np.sort(rng.choice(vectors.rows, size=n, replace=False))
    q = vectors.take(sources)
    q += noise / np.sqrt(vectors.dim) * rng.standard_normal(q.shape, dtype=np.float32)
    return ann.normalize(q), sources


def timed_search(index: Any, queries: np.ndarray, *, k: int, repeat: int) -> tuple[np.ndarray, float]:
    """Row ids int64 [q, k] and the best of `repeat` wall times (s) for all queries, after a warm-up."""
    index.search(queries[: min(16, len(queries))], k)
    best, ids = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        _, ids = index.search(queries, k)
        best = min(best, time.perf_counter() - t0)
    return ids.astype(np.int64), best


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of `truth` [q, k] present in the same row of `found` [q, k]."""
    return float(np.mean([len(np.intersect1d(f, t)) / truth.shape[1] for f, t in zip(found, truth, strict=True)]))


def source_found(ids: np.ndarray, sources: np.ndarray) -> float:
    return float((ids == sources[:, None]).any(axis=1).mean())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Exact first (its results are the truth; then freed), then each approximate kind; the figures as a dict."""
    options = {**ann_defaults(), "seed": args.seed}
    if args.nlist is not None:
        options["ivf_nlist"] = args.nlist
    vectors = Vectors(rows=args.rows, dim=args.dim, clusters=args.clusters, spread=args.spread, seed=args.seed,
                      chunk=args.chunk)
    queries, sources = make_queries(vectors, n=args.queries, noise=args.noise, seed=args.seed)
    gpu = ann.use_gpu(args.device)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    exact = ann.build_index("exact", vectors, rows=args.rows, dim=args.dim, gpu=gpu, options=options)
    build_s = time.perf_counter() - t0
    truth, seconds = timed_search(exact, queries, k=args.k, repeat=args.repeat)
    del exact
    exact_qps = args.queries / seconds
    rows.append({"kind": "exact", "setting": "flat", "build_s": build_s, "qps": exact_qps, "speedup": 1.0,
                 "recall": 1.0, "source_found": source_found(truth, sources)})
    log.info("exact: %.0f queries/s", exact_qps)
    for kind in args.kinds:
        t0 = time.perf_counter()
        index = ann.build_index(kind, vectors, rows=args.rows, dim=args.dim, gpu=gpu, options=options)
        build_s = time.perf_counter() - t0
        knobs = args.nprobe if kind == "ivf" else args.ef_search
        for knob in knobs:
            if kind == "ivf":
                index.nprobe, setting = min(knob, index.nlist), f"nlist {index.nlist}, nprobe {min(knob, index.nlist)}"
            else:
                index.hnsw.efSearch, setting = knob, f"M {options['hnsw_m']}, efSearch {knob}"
            ids, seconds = timed_search(index, queries, k=args.k, repeat=args.repeat)
            qps = args.queries / seconds
            rows.append({"kind": kind, "setting": setting, "build_s": build_s, "qps": qps,
                         "speedup": qps / exact_qps, "recall": recall(ids, truth),
                         "source_found": source_found(ids, sources)})
            log.info("%s %s: recall@%d %.3f, %.0f queries/s", kind, setting, args.k, rows[-1]["recall"], qps)
        del index
    return {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "cores": os.cpu_count(),
            "device": "cuda" if gpu else "cpu", "results": rows}


def format_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    data = f"{s['clusters']} clusters (spread {s['spread']})" if s["clusters"] else "uniform on the sphere"
    lines = [(f"{s['rows']:,} x {s['dim']} unit vectors ({data}), {s['queries']:,} queries = database rows + noise "
             f"{s['noise']}, k={s['k']}, {report['device']}, {report['cores']} cores"),
             (f"{'index':<7}{'setting':<26}{'build s':>9}{'queries/s':>11}{'vs exact':>10}"
             f"{'recall@' + str(s['k']):>11}{'source found':>14}")]
    for r in report["results"]:
        lines.append(f"{r['kind']:<7}{r['setting']:<26}{r['build_s']:>9.1f}{r['qps']:>11.0f}{r['speedup']:>9.1f}x"
                     f"{r['recall']:>11.3f}{r['source_found']:>14.3f}")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench.search", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=1152)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--kinds", nargs="+", choices=["ivf", "hnsw"], default=["ivf"])
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128], help="IVF cells visited per query")
    p.add_argument("--nlist", type=int, default=None, help="IVF cells (default: conf/search.yaml's ann.ivf_nlist)")
    p.add_argument("--ef-search", type=int, nargs="+", default=[64, 128, 256], help="HNSW beam width")
    p.add_argument("--clusters", type=int, default=0, help="0 = uniform random unit vectors")
    p.add_argument("--spread", type=float, default=1.0, help="noise norm around a cluster centre")
    p.add_argument("--noise", type=float, default=0.5, help="noise norm added to a database row to make a query")
    p.add_argument("--chunk", type=int, default=65536, help="rows generated at a time")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if min(args.rows, args.dim, args.queries, args.k, args.chunk, args.repeat) < 1 or args.queries > args.rows:
        p.error("rows, dim, queries, k, chunk and repeat must be at least 1, and queries at most rows")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(argv)
    report = run(args)
    print(format_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
