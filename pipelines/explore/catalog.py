"""What the explore app searches: an embed output's rows (path, label, split), their FAISS index, and filters.

The index is `pipelines.index`'s (exact, or an approximate one built once and saved beside the embeddings, then
loaded in a moment), always searched on the CPU: one query at a time costs milliseconds there, and FAISS's id
selectors (the split and label filters) run on every CPU index kind. A row's own embedding is read back from the
index (`reconstruct`), so "more like this" never re-embeds an image.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import index as ann

log = logging.getLogger(__name__)


class UnknownRow(LookupError):
    """A path that is no row of the dataset (or is in several splits and no split was given)."""


@dataclass
class Hit:
    """One search result: the row and its cosine similarity to the query."""

    path: str
    split: str
    label: str
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "split": self.split, "label": self.label, "score": round(self.score, 6)}


class Catalog:
    """The rows of `splits` of an embed output and their index (see the module docstring)."""

    def __init__(self, embeddings_dir: str | Path, *, splits: list[str] | None, index: str,
                 index_dir: str | Path | None, options: dict[str, Any]) -> None:
        start = time.perf_counter()
        self.source = ann.open_source(embeddings_dir, splits)
        self.searcher = ann.open_index(self.source, kind=index, rebuild=False, folder=index_dir, device="cpu",
                                       options=options)
        rows = ann.read_rows(self.source)
        self.paths, self.labels_col, self.splits_col = rows.paths, rows.labels, rows.splits
        self.label_codes, self.label_names = _codes(rows.labels)
        self.split_codes, self.split_names = _codes(rows.splits)
        self._ids, self._shared = _path_ids(rows.paths)
        self._faiss = ann.import_faiss()
        self._reconstruct_lock = threading.Lock()
        if self.searcher.kind == "ivf":
            self.searcher.index.make_direct_map()  # reconstruct(i) on IVF needs id -> list (8 bytes a row)
        log.info("catalog of %d rows (%s) ready in %.1f s", self.rows, "+".join(self.source.splits),
                 time.perf_counter() - start)

    @property
    def rows(self) -> int:
        return self.source.rows

    def row_id(self, path: str, split: str | None = None) -> int:
        """The row id of `path` (in `split` when given); UnknownRow when it is no row."""
        first = self._ids.get(path)
        if first is None:
            raise UnknownRow(f"path {path!r}: no row of the dataset has it")
        ids = self._shared.get(path, [first])
        if split is not None:
            ids = [i for i in ids if self.split_names[self.split_codes[i]] == split]
            if not ids:
                raise UnknownRow(f"path {path!r}: no row of split {split!r} has it")
        if len(ids) > 1:
            raise UnknownRow(f"path {path!r} is a row of several splits: give split=")
        return ids[0]

    def vector(self, row: int) -> np.ndarray:
        """The stored, L2-normalised embedding of one row: float32 [1, D]."""
        with self._reconstruct_lock:
            return self.searcher.index.reconstruct(int(row)).reshape(1, -1)

    def mask(self, *, split: str | None, label: str | None) -> np.ndarray | None:
        """bool [N]: the rows a filter keeps (None: no filter). An unknown split or label keeps nothing."""
        keep = None
        for value, names, codes in ((split, self.split_names, self.split_codes),
                                    (label, self.label_names, self.label_codes)):
            if value is None:
                continue
            code = names.index(value) if value in names else -1
            hit = codes == code
            keep = hit if keep is None else keep & hit
        return keep

    def search(self, vector: np.ndarray, *, k: int, split: str | None = None, label: str | None = None,
               exclude: int | None = None) -> list[Hit]:
        """The `k` rows nearest to a float32 [1, D] query (cosine), best first, within the filter; `exclude`: a
        row left out (the query row of "more like this")."""
        keep = self.mask(split=split, label=label)
        if keep is not None and exclude is not None:
            keep = keep.copy()
            keep[exclude] = False
        if keep is not None and not keep.any():
            return []
        # Without a filter, the excluded row is dropped from k + 1 answers: an id selector would cost every
        # unfiltered search a slower FAISS path for the sake of one row.
        extra = 1 if exclude is not None and keep is None else 0
        params = None if keep is None else self._params(keep)
        query = ann.normalize(np.ascontiguousarray(vector, dtype=np.float32).copy())
        scores, ids = self.searcher.index.search(query, min(k + extra, self.rows), params=params)
        found = (ids[0] >= 0) & (ids[0] != (-2 if exclude is None else exclude))
        return self.hits(ids[0][found][:k], scores[0][found][:k])

    def hits(self, ids: np.ndarray, scores: np.ndarray) -> list[Hit]:
        """Hits for row ids int64 [n] with their scores float [n]."""
        take = pa.array(np.asarray(ids, dtype=np.int64))
        cols = (self.paths.take(take).to_pylist(), self.splits_col.take(take).to_pylist(),
                self.labels_col.take(take).to_pylist())
        return [Hit(p, s, lab, float(sc)) for p, s, lab, sc in zip(*cols, scores, strict=True)]

    def _params(self, keep: np.ndarray) -> Any:
        """FAISS search parameters restricting a search to the rows `keep` (bool [N]) marks."""
        faiss = self._faiss
        bits = np.packbits(keep, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(keep), faiss.swig_ptr(bits))
        if self.searcher.kind == "ivf":
            params = faiss.SearchParametersIVF(sel=selector, nprobe=int(self.searcher.index.nprobe))
        elif self.searcher.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=int(self.searcher.index.hnsw.efSearch))
        else:
            params = faiss.SearchParameters(sel=selector)
        params._keep = (bits, selector)  # FAISS holds raw pointers: keep the buffers alive with the parameters
        return params

    def facets(self) -> dict[str, Any]:
        """Splits and labels with their row counts, for the page's filters."""
        labels = np.bincount(self.label_codes, minlength=len(self.label_names))
        splits = np.bincount(self.split_codes, minlength=len(self.split_names))
        return {"splits": {s: int(n) for s, n in zip(self.split_names, splits, strict=True)},
                "labels": {lab: int(n) for lab, n in zip(self.label_names, labels, strict=True)}}


def _codes(column: pa.Array) -> tuple[np.ndarray, list[str]]:
    """A string column [N] -> int32 codes [N] and the sorted distinct values they index."""
    encoded = pc.dictionary_encode(column).combine_chunks() if isinstance(column, pa.ChunkedArray) else \
        pc.dictionary_encode(column)
    names = encoded.dictionary.to_pylist()
    order = np.argsort(np.asarray(names, dtype=object)).astype(np.int32) if names else np.zeros(0, np.int32)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order), dtype=np.int32)
    codes = rank[encoded.indices.to_numpy(zero_copy_only=False)] if len(names) else np.zeros(0, np.int32)
    return codes.astype(np.int32), [names[i] for i in order]


def _path_ids(paths: pa.Array) -> tuple[dict[str, int], dict[str, list[int]]]:
    """path -> its first row id, and for the paths embedded in several splits, all their row ids."""
    names = paths.to_pylist()
    ids = dict(zip(names, range(len(names)), strict=True))  # a later duplicate overwrites: fixed below
    shared: dict[str, list[int]] = {}
    if len(ids) < len(names):
        ids = {}
        for i, path in enumerate(names):
            if path in ids:
                shared.setdefault(path, [ids[path]]).append(i)
            else:
                ids[path] = i
    return ids, shared
