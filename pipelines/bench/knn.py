"""`python -m pipelines.bench.knn`: seconds per k-NN backend on random embeddings, side by side in one run.

Default: 10,000 train (1,000 classes x 10) x 20,000 queries x 1,152-d float32, k=10, distance-weighted cosine:
the shape of the 10-shot ImageNet validation. Each backend is warmed up on a few queries (imports, thread pools,
CUDA context), then timed on all of them `--repeat` times (best and median printed); its predictions are compared
with sklearn's, which must agree on every query.

    python -m pipelines.bench.knn                          # sklearn, faiss, torch (GPU ones when present)
    python -m pipelines.bench.knn --backends sklearn torch:cpu torch:cuda faiss:cuda --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import numpy as np

from pipelines import knn


def random_embeddings(*, train: int, queries: int, dim: int, classes: int, spread: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """float32 [train, D] (train // classes per class), int64 labels, float32 [queries, D], their int64 labels.

    Points scatter around one random centre per class, so neighbours and votes are not all alike.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    y_train = np.arange(train) % classes
    y_query = rng.integers(0, classes, queries)
    x_train = centres[y_train] + spread * rng.standard_normal((train, dim), dtype=np.float32)
    x_query = centres[y_query] + spread * rng.standard_normal((queries, dim), dtype=np.float32)
    return x_train, y_train, x_query, y_query


def parse_backend(spec: str) -> knn.Backend:
    """'torch' or 'torch:cuda' (name:device) -> a backend."""
    name, _, device = spec.partition(":")
    return knn.make_backend(name, **({"device": device} if device else {}))


def time_backend(backend: knn.Backend, data: tuple[np.ndarray, ...], *, repeat: int,
                 **settings: Any) -> tuple[list[float], knn.Result]:
    """Seconds of each timed `knn.classify` after a warm-up on 256 queries, and the last result."""
    x_train, y_train, x_query, _ = data
    n_classes = int(y_train.max()) + 1
    knn.classify(x_train, y_train, x_query[:256], n_classes=n_classes, backend=backend, **settings)
    seconds, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = knn.classify(x_train, y_train, x_query, n_classes=n_classes, backend=backend, **settings)
        seconds.append(time.perf_counter() - start)
    return seconds, result


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=4.0, help="noise around each class centre")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--weights", default="distance", choices=knn.WEIGHTS)
    parser.add_argument("--metric", default="cosine", choices=knn.METRICS)
    parser.add_argument("--backends", nargs="+", default=["sklearn", "faiss", "torch"],
                        help="name or name:device; sklearn always runs first, as the reference")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)

    data = random_embeddings(train=args.train, queries=args.queries, dim=args.dim, classes=args.classes,
                             spread=args.spread, seed=args.seed)
    settings = {"k": args.k, "weights": args.weights, "metric": args.metric}
    print(f"k-NN benchmark: {args.train} train x {args.queries} queries x {args.dim}-d float32, {args.classes} "
          f"classes, k={args.k} {args.weights} {args.metric}; {os.cpu_count()} CPUs; best of {args.repeat}")
    specs = ["sklearn"] + [s for s in args.backends if s != "sklearn"]
    rows, reference = [], None
    for spec in specs:
        backend = parse_backend(spec)
        seconds, result = time_backend(backend, data, repeat=args.repeat, **settings)
        reference = result.predictions if reference is None else reference
        rows.append({**backend.describe(), "best_s": round(min(seconds), 3),
                     "median_s": round(statistics.median(seconds), 3),
                     "same_as_sklearn": int((result.predictions == reference).sum()), "queries": args.queries,
                     "rechecked": result.neighbours.rechecked,
                     "top1": float((result.predictions == data[3]).mean())})
    print(f"{'backend':<10}{'device':<8}{'best s':>9}{'median s':>10}{'vs sklearn':>12}{'same as sklearn':>18}"
          f"{'rechecked':>11}{'top-1':>8}")
    base = rows[0]["best_s"]
    for r in rows:
        print(f"{r['name']:<10}{r['device']:<8}{r['best_s']:>9.2f}{r['median_s']:>10.2f}{base / r['best_s']:>11.2f}x"
              f"{r['same_as_sklearn']:>10}/{r['queries']:<7}{r['rechecked']:>11}{100 * r['top1']:>7.2f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
