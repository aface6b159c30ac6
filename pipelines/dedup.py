"""`python -m pipelines.dedup`: near-duplicate pairs among stored embeddings, within and across splits.

A range search on L2-normalised embeddings: every pair with cosine at or above `threshold`, each once. Below
`exact_below` rows all pairs are compared (blocks of `chunk_rows` rows against the rest: matrix products). Above,
the rows are cut into cells by FAISS k-means (√rows cells, trained on a sample; GPU FAISS when present) and each
row is compared, again by matrix products, with the rows of its own cell and of the `probe` - 1 cells next nearest
to it (a near-copy lies in its original's cell or a neighbouring one). Matrix products per cell, rather than an
IVF index searched row by row: on this project's 2-core machine FAISS's IVF scan cost 2.2 ms a row at 4 cells
visited (100,000 rows: 4 minutes), the products a tenth of that. They run on the GPU (torch) when `device` is one.

Writes `<embeddings_dir>-duplicates/` (pairs.parquet: path_a, split_a, label_a, path_b, split_b, label_b, score;
summary.json) and prints a summary line: pairs, rows involved, and the leakage between splits (query rows with a
near-copy in train). `near_copies` is the same test for two in-memory splits (validate's `exclude_duplicates`).
Knows the store and FAISS, nothing of models.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from pipelines import index as ann
from pipelines import store
from pipelines.config import CONF_DIR, clean_errors
from pipelines.errors import UserError

log = logging.getLogger(__name__)

SUFFIX = "-duplicates"
PAIRS = "pairs.parquet"
SUMMARY = "summary.json"


def duplicates_dir(embeddings_dir: str | Path) -> Path:
    """The sibling folder `<embeddings_dir>-duplicates` (outside the embeddings' Parquet dataset)."""
    return store.sibling_dir(embeddings_dir, SUFFIX, instead="output_dir=")


def default_threshold() -> float:
    """conf/dedup.yaml's threshold: the one source of the default (validate's `duplicate_threshold: null`)."""
    return float(OmegaConf.load(Path(CONF_DIR) / "dedup.yaml").threshold)


def check_threshold(threshold: Any, *, key: str = "threshold") -> float:
    """A cosine in (0, 1] (UserError otherwise)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise UserError(f"{key}={threshold!r}: expected a cosine similarity in (0, 1], e.g. {key}=0.95")
    return float(threshold)


def unique_pairs(a: np.ndarray, b: np.ndarray, s: np.ndarray, rows: int) -> tuple[np.ndarray, ...]:
    """Each pair (a < b) once (cells overlap: a pair can be met twice), highest score first: (a, b, score)."""
    key = a * rows + b
    _, first = np.unique(key, return_index=True)
    a, b, s = a[first], b[first], s[first]
    order = np.lexsort((b, a, -s))
    return a[order], b[order], s[order]


def block_pairs(x: Any, left: np.ndarray, right: np.ndarray, *, threshold: float,
                chunk_rows: int) -> list[tuple[np.ndarray, ...]]:
    """Pairs (a < b, score) with cosine >= threshold between rows `left` and rows `right` (int64 ids into the unit
    rows `x`, a float32 [N, D] torch tensor), by matrix products of `chunk_rows` left rows at a time."""
    import torch

    found = []
    r = torch.from_numpy(right).to(x.device)
    xr = x[r]
    for lo in range(0, len(left), chunk_rows):
        ids = left[lo:lo + chunk_rows]
        sims = x[torch.from_numpy(ids).to(x.device)] @ xr.T
        i, j = torch.nonzero(sims >= threshold, as_tuple=True)
        if len(i):
            ga, gb = torch.from_numpy(ids).to(x.device)[i], r[j]
            keep = ga != gb
            ga, gb, sc = ga[keep], gb[keep], sims[i[keep], j[keep]]
            found.append((torch.minimum(ga, gb).cpu().numpy(), torch.maximum(ga, gb).cpu().numpy(),
                          sc.float().cpu().numpy()))
    return found


def cells(x: np.ndarray, *, n_cells: int, probe: int, train_rows: int, iters: int, seed: int,
          gpu: bool) -> np.ndarray:
    """Each unit row's `probe` nearest k-means cells, nearest first: int64 [N, probe] (FAISS k-means, spherical)."""
    faiss = ann.import_faiss()
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(len(x), size=min(len(x), max(train_rows, n_cells)), replace=False))]
    gpu = gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    kmeans = faiss.Kmeans(x.shape[1], n_cells, niter=iters, seed=seed, spherical=True, gpu=gpu, verbose=False)
    kmeans.train(np.ascontiguousarray(sample))
    _, assigned = kmeans.index.search(x, probe)
    return assigned.astype(np.int64)


def find_pairs(x: np.ndarray, *, threshold: float, chunk_rows: int, exact_below: int, n_cells: int | str,
               probe: int, train_rows: int | str, iters: int, seed: int,
               device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """All pairs of unit rows float32 [N, D] at or above the threshold: (a, b, score) and how they were found."""
    import torch

    gpu = device != "cpu" and torch.cuda.is_available()
    xt = torch.from_numpy(x).to("cuda" if gpu else "cpu")
    rows = len(x)
    if rows < exact_below:
        every = np.arange(rows, dtype=np.int64)
        found = [p for lo in range(0, rows, chunk_rows)
                 for p in block_pairs(xt, every[lo:lo + chunk_rows], every[lo:], threshold=threshold,
                                      chunk_rows=chunk_rows)]
        how: dict[str, Any] = {"method": "all pairs", "device": str(xt.device)}
    else:
        n = ann.ivf_nlist(rows, n_cells)
        near = cells(x, n_cells=n, probe=min(probe, n), train_rows=64 * n if train_rows == "auto" else
                     int(train_rows), iters=iters, seed=seed, gpu=gpu)
        order = np.argsort(near[:, 0], kind="stable")  # rows by their own cell
        bounds = np.searchsorted(near[order, 0], np.arange(n + 1))
        flat = np.argsort(near.reshape(-1), kind="stable")  # rows having cell c among their `probe` nearest
        edges = np.searchsorted(near.reshape(-1)[flat], np.arange(n + 1))
        found = []
        for c in range(n):
            own, members = order[bounds[c]:bounds[c + 1]], flat[edges[c]:edges[c + 1]] // near.shape[1]
            if len(own) and len(members):
                found += block_pairs(xt, own, members, threshold=threshold, chunk_rows=chunk_rows)
        how = {"method": "k-means cells", "cells": n, "probe": min(probe, n), "device": str(xt.device)}
    if not found:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32), how
    a, b, s = (np.concatenate(parts) for parts in zip(*found, strict=True))
    return (*unique_pairs(a, b, s, rows), how)


def leakage(splits: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, dict[str, int]]:
    """Each row's split (object [N]) and the pairs -> {split: {other split: its rows with a near-copy there}}."""
    cross = splits[a] != splits[b]
    row = np.concatenate([a[cross], b[cross]])
    mine = np.concatenate([splits[a][cross], splits[b][cross]])
    other = np.concatenate([splits[b][cross], splits[a][cross]])
    out: dict[str, dict[str, int]] = {}
    for m, o in sorted(set(zip(mine.tolist(), other.tolist(), strict=True))):
        out.setdefault(m, {})[o] = len(np.unique(row[(mine == m) & (other == o)]))
    return out


def pairs_table(rows: ann.Rows, a: np.ndarray, b: np.ndarray, s: np.ndarray) -> pa.Table:
    """pairs.parquet's table: path/split/label of both rows and the cosine score, highest first."""
    ia, ib = pa.array(a, pa.int64()), pa.array(b, pa.int64())
    return pa.table({"path_a": rows.paths.take(ia), "split_a": rows.splits.take(ia), "label_a": rows.labels.take(ia),
                     "path_b": rows.paths.take(ib), "split_b": rows.splits.take(ib), "label_b": rows.labels.take(ib),
                     "score": pa.array(s, pa.float32())})


def check_whole(key: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{key}={value!r}: expected a whole number of at least {low}")


def run_dedup(*, embeddings_dir: str | Path, splits: list[str] | None, threshold: float, chunk_rows: int,
              exact_below: int, cells: int | str, probe: int, train_rows: int | str, iters: int, seed: int,
              output_dir: str | Path | None, device: str) -> dict[str, Any]:
    """Find the near-duplicate pairs, write pairs.parquet and summary.json; the summary as a dict."""
    start = time.perf_counter()
    threshold = check_threshold(threshold)
    for key, value in (("chunk_rows", chunk_rows), ("probe", probe), ("iters", iters)):
        check_whole(key, value)
    check_whole("exact_below", exact_below, 0)
    if cells != "auto":
        check_whole("cells", cells)
    source = ann.open_source(embeddings_dir, splits)
    out = duplicates_dir(embeddings_dir) if output_dir in (None, "") else Path(output_dir)
    if store.is_inside(out.resolve(), Path(embeddings_dir).resolve()):
        raise UserError(f"output_dir={out}: lies inside embeddings_dir={embeddings_dir}; choose a folder outside it")
    x = np.concatenate(list(ann.iter_vectors(source)))  # 4·D bytes a row: 4.6 GB for 1M x 1152
    read_s = time.perf_counter() - start
    a, b, s, how = find_pairs(x, threshold=threshold, chunk_rows=chunk_rows, exact_below=exact_below,
                              n_cells=cells, probe=probe, train_rows=train_rows, iters=iters, seed=seed,
                              device=device)
    del x
    rows = ann.read_rows(source)
    splits_of = np.asarray(rows.splits.to_pylist(), dtype=object)
    summary = {"embeddings_dir": str(embeddings_dir), "splits": source.splits, "rows": source.rows,
               "threshold": threshold, "search": how,
               "pairs": len(a), "rows_involved": len(np.unique(np.concatenate([a, b]))),
               "within_split_pairs": int((splits_of[a] == splits_of[b]).sum()),
               "leakage": leakage(splits_of, a, b), "seconds": {"read": round(read_s, 3)},
               "pairs_file": str(out / PAIRS)}
    with store.writing(out, then="then rerun"):
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pairs_table(rows, a, b, s), out / PAIRS)
    summary["seconds"]["total"] = round(time.perf_counter() - start, 3)
    store.write_json(out / SUMMARY, summary)
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    """One line: pairs, rows involved, leakage between splits, where the pairs are."""
    leaks = [f"{n} {mine} rows have a near-copy in {other}" for mine, others in summary["leakage"].items()
             for other, n in others.items()]
    return (f"{summary['pairs']} near-duplicate pairs (cosine >= {summary['threshold']}) among {summary['rows']} "
            f"rows ({summary['within_split_pairs']} within a split), {summary['rows_involved']} rows involved; "
            f"leakage: {'; '.join(leaks) or 'none'}; {summary['seconds']['total']:.1f} s; pairs in {summary['pairs_file']}")


def near_copies(queries: np.ndarray, support: np.ndarray, *, threshold: float,
                chunk_rows: int = 4096) -> np.ndarray:
    """float32 [Q, D] and [N, D] embeddings (any norm) -> bool [Q]: whether each query has a support row with
    cosine >= threshold (exact, in chunks of queries; numpy alone)."""
    x = ann.normalize(np.array(support, dtype=np.float32))
    found = np.zeros(len(queries), dtype=bool)
    if len(x) == 0:
        return found
    for lo in range(0, len(queries), chunk_rows):
        q = ann.normalize(np.array(queries[lo:lo + chunk_rows], dtype=np.float32))
        found[lo:lo + len(q)] = (q @ x.T).max(axis=1) >= threshold
    return found


def _splits(value: Any) -> list[str] | None:
    if value in (None, "", []):
        return None
    return [str(value)] if isinstance(value, str) else [str(v) for v in OmegaConf.to_container(value)]


@hydra.main(config_path=CONF_DIR, config_name="dedup", version_base="1.3")
@clean_errors(FileNotFoundError, PermissionError)
def main(cfg: DictConfig) -> None:
    summary = run_dedup(embeddings_dir=cfg.embeddings_dir, splits=_splits(cfg.splits), threshold=cfg.threshold,
                        chunk_rows=cfg.chunk_rows, exact_below=cfg.exact_below, cells=cfg.cells, probe=cfg.probe,
                        train_rows=cfg.train_rows, iters=cfg.iters, seed=cfg.seed, output_dir=cfg.output_dir,
                        device=cfg.device)
    print(summary_line(summary))


if __name__ == "__main__":
    main()
