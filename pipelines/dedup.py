"""`python -m pipelines.dedup`: near-duplicate pairs among stored embeddings, within and across splits.

Each row is searched against every row (FAISS inner product of L2-normalised embeddings, `pipelines.index`: exact
below `ann.exact_below` rows, else the saved approximate index, GPU FAISS when present) in chunks, keeping its
`k` nearest; a pair is kept when its cosine is at least `threshold`. Writes `<embeddings_dir>-duplicates/`
(pairs.parquet: path_a, split_a, label_a, path_b, split_b, label_b, score; summary.json) and prints a summary
line: pairs, rows involved, and the leakage between splits (query rows with a near-copy in train).

`near_copies` is the same test for two in-memory splits (validate's `exclude_duplicates`), without FAISS.
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


def pairs_in_chunk(scores: np.ndarray, ids: np.ndarray, first: int, *,
                   threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-NN answers float32 [n, k] / int64 [n, k] of rows first..first+n -> pairs (a < b) with score >= threshold:
    int64 a [m], int64 b [m], float32 score [m]."""
    rows = np.arange(first, first + len(ids), dtype=np.int64)[:, None].repeat(ids.shape[1], axis=1)
    keep = (ids >= 0) & (ids != rows) & (scores >= threshold)
    a, b = rows[keep], ids[keep]
    return np.minimum(a, b), np.maximum(a, b), scores[keep].astype(np.float32)


def unique_pairs(a: np.ndarray, b: np.ndarray, s: np.ndarray, rows: int) -> tuple[np.ndarray, ...]:
    """Each pair once (found from both ends), highest score first: (a, b, score)."""
    key = a * rows + b
    _, first = np.unique(key, return_index=True)
    a, b, s = a[first], b[first], s[first]
    order = np.lexsort((b, a, -s))
    return a[order], b[order], s[order]


def find_pairs(searcher: ann.SearchIndex, *, threshold: float, k: int,
               chunk_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Every row against the index, `chunk_rows` at a time: pairs (a, b, score) and how many rows had all `k`
    neighbours above the threshold (their further copies may be missed: raise k)."""
    found: list[tuple[np.ndarray, ...]] = []
    first, capped = 0, 0
    for chunk in ann.iter_vectors(searcher.source, chunk_rows=chunk_rows):
        scores, ids = searcher.search(chunk, k=k + 1)  # +1: a row finds itself
        capped += int((scores[:, -1] >= threshold).sum()) if scores.shape[1] == k + 1 else 0
        found.append(pairs_in_chunk(scores, ids, first, threshold=threshold))
        first += len(chunk)
        log.debug("searched %d of %d rows", first, searcher.source.rows)
    a, b, s = (np.concatenate(parts) for parts in zip(*found, strict=True))
    return (*unique_pairs(a, b, s, searcher.source.rows), capped)


def leakage(splits: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, dict[str, int]]:
    """Each row's split (object [N]) and the pairs -> {split: {other split: its rows with a near-copy there}}."""
    cross = splits[a] != splits[b]
    row = np.concatenate([a[cross], b[cross]])
    mine = np.concatenate([splits[a][cross], splits[b][cross]])
    other = np.concatenate([splits[b][cross], splits[a][cross]])
    out: dict[str, dict[str, int]] = {}
    for m, o in sorted(set(zip(mine.tolist(), other.tolist(), strict=True))):
        out.setdefault(m, {})[o] = int(len(np.unique(row[(mine == m) & (other == o)])))
    return out


def pairs_table(rows: ann.Rows, a: np.ndarray, b: np.ndarray, s: np.ndarray) -> pa.Table:
    """pairs.parquet's table: path/split/label of both rows and the cosine score, highest first."""
    ia, ib = pa.array(a, pa.int64()), pa.array(b, pa.int64())
    return pa.table({"path_a": rows.paths.take(ia), "split_a": rows.splits.take(ia), "label_a": rows.labels.take(ia),
                     "path_b": rows.paths.take(ib), "split_b": rows.splits.take(ib), "label_b": rows.labels.take(ib),
                     "score": pa.array(s, pa.float32())})


def run_dedup(*, embeddings_dir: str | Path, splits: list[str] | None, threshold: float, k: int, index: str,
              index_dir: str | Path | None, output_dir: str | Path | None, chunk_rows: int, device: str,
              ann_options: dict[str, Any]) -> dict[str, Any]:
    """Find the near-duplicate pairs, write pairs.parquet and summary.json; the summary as a dict."""
    start = time.perf_counter()
    threshold = check_threshold(threshold)
    for key, value in (("k", k), ("chunk_rows", chunk_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{key}={value!r}: expected a whole number of at least 1")
    ann.check_kind(index)
    source = ann.open_source(embeddings_dir, splits)
    out = duplicates_dir(embeddings_dir) if output_dir in (None, "") else Path(output_dir)
    if store.is_inside(out.resolve(), Path(embeddings_dir).resolve()):
        raise UserError(f"output_dir={out}: lies inside embeddings_dir={embeddings_dir}; choose a folder outside it")
    searcher = ann.open_index(source, kind=index, rebuild=False, folder=index_dir,
                              device="cpu" if device == "cpu" else "auto", options=ann_options)
    a, b, s, capped = find_pairs(searcher, threshold=threshold, k=k, chunk_rows=chunk_rows)
    rows = ann.read_rows(source)
    splits_of = np.asarray(rows.splits.to_pylist(), dtype=object)
    summary = {"embeddings_dir": str(embeddings_dir), "splits": source.splits, "rows": source.rows,
               "threshold": threshold, "k": k, "index": {"kind": searcher.kind, **searcher.info["settings"]},
               "pairs": int(len(a)), "rows_involved": int(len(np.unique(np.concatenate([a, b])))),
               "within_split_pairs": int((splits_of[a] == splits_of[b]).sum()),
               "leakage": leakage(splits_of, a, b), "rows_at_k": capped,
               "seconds": round(time.perf_counter() - start, 3), "pairs_file": str(out / PAIRS)}
    with store.writing(out, then="then rerun"):
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pairs_table(rows, a, b, s), out / PAIRS)
    store.write_json(out / SUMMARY, summary)
    if capped:
        log.warning("%d rows have all k=%d neighbours above the threshold: raise k to find all their copies", capped, k)
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    """One line: pairs, rows involved, leakage between splits, where the pairs are."""
    leaks = [f"{n} {mine} rows have a near-copy in {other}" for mine, others in summary["leakage"].items()
             for other, n in others.items()]
    return (f"{summary['pairs']} near-duplicate pairs (cosine >= {summary['threshold']}) among {summary['rows']} "
            f"rows ({summary['within_split_pairs']} within a split), {summary['rows_involved']} rows involved; "
            f"leakage: {'; '.join(leaks) or 'none'}; {summary['seconds']:.1f} s; pairs in {summary['pairs_file']}")


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
                        k=cfg.k, index=cfg.index, index_dir=cfg.index_dir, output_dir=cfg.output_dir,
                        chunk_rows=cfg.chunk_rows, device=cfg.device,
                        ann_options=OmegaConf.to_container(cfg.ann, resolve=True))
    print(summary_line(summary))


if __name__ == "__main__":
    main()
