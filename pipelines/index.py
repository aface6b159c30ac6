"""The FAISS index over stored embeddings: exact (flat inner product) or approximate (IVF or HNSW), saved beside them.

Vectors are the stored embeddings L2-normalised, so an inner product is a cosine similarity. They are read part by
part and added to the index in chunks, never gathered in Python lists: a split of millions of rows costs the
index's own memory (4·D bytes a row for all three kinds) plus one chunk.

An approximate index is built once and saved in the sibling folder `<embeddings_dir>-index/` (outside the
embeddings' Parquet dataset, whose overwrite rules allow only the embed job's files) as `<splits>-<kind>.faiss`
with `<splits>-<kind>.json`: the model metadata and a fingerprint of the embeddings it was built from (each
part's split, name, size, mtime and Parquet footer, and the row count). When the embeddings change, the saved index is refused
with one line saying to rebuild it (or rebuilt, with `rebuild=true`). Row i of an index is row i of the parts
read in order (splits as given, parts sorted by name), which the fingerprint pins down.

Knows the store and FAISS, nothing of models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import store
from pipelines.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("exact", "auto", "ivf", "hnsw")
INDEX_SUFFIX = "-index"
FORMAT_VERSION = 1


class StaleIndexError(UserError):
    """A saved index was built from other embeddings (or another model) than those there now."""


class ModelMismatchError(UserError):
    """A query encoder (image or text) is not the model the stored embeddings were made with."""


def check_same_model(stored: dict[str, Any], encoder: dict[str, Any], *, keys: tuple[str, ...]) -> None:
    """Refuse a query encoder that differs from the stored embeddings' footer metadata on `keys`
    (ModelMismatchError, one line naming each difference). A revision is compared only when both name one."""
    diffs = []
    for key in keys:
        a, b = stored.get(key), encoder.get(key)
        if key == "revision" and (a is None or b is None):
            continue
        if a != b:
            diffs.append(f"{key}: {a!r} stored, {b!r} for the query")
    if diffs:
        raise ModelMismatchError(f"the query encoder is not the model of the stored embeddings ({'; '.join(diffs)}); "
                                 f"use model.name_or_path={stored.get('model')} (the embeddings' model)")


def import_faiss() -> Any:
    """The `faiss` module for search (`knn.import_faiss`: the one check of the installed FAISS wheels)."""
    from pipelines.knn import import_faiss as checked

    return checked("search", otherwise="")


# ---------------------------------------------------------------------------------------------------- the source


@dataclass
class Source:
    """The parts of one or more splits of an embed job's output: what an index is built from.

    `parts`: (split, part file, rows) in index order; `metadata`: the footer metadata all parts share.
    """

    embeddings_dir: Path
    splits: list[str]
    parts: list[tuple[str, Path, int]]
    dim: int
    metadata: dict[str, Any]

    @property
    def rows(self) -> int:
        return sum(n for _, _, n in self.parts)

    def fingerprint(self) -> dict[str, Any]:
        """Row count, and each part's split, name, size, mtime (ns) and footer digest, with their SHA-256.

        Size and mtime alone can be kept by a rewrite (`touch -r`, a copy restoring times); the footer cannot: it
        holds every column chunk's offset, sizes and min/max statistics (paths and embedding values) and the
        footer metadata, so rewritten content shows there. Reading it costs two small reads a part.
        """
        entries = []
        for split, part, rows in self.parts:
            st = part.stat()
            entries.append([split, part.name, rows, st.st_size, st.st_mtime_ns, footer_digest(part)])
        digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
        return {"rows": self.rows, "parts": len(entries), "sha256": digest}


PARQUET_MAGIC = b"PAR1"


def footer_digest(part: Path) -> str:
    """SHA-256 of a Parquet file's footer (its FileMetaData: row groups, column chunk sizes, statistics, key-value
    metadata), read from the file's end: `<footer><4-byte little-endian length>PAR1`."""
    try:
        with open(part, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < 12:
                raise ValueError(f"{size} bytes")
            f.seek(size - 8)
            tail = f.read(8)
            length = int.from_bytes(tail[:4], "little")
            if tail[4:] != PARQUET_MAGIC or length > size - 12:
                raise ValueError("no Parquet footer at its end")
            f.seek(size - 8 - length)
            return hashlib.sha256(f.read(length)).hexdigest()
    except (OSError, ValueError) as exc:
        raise store.CorruptPartError(f"{part} is not a readable part ({exc}); delete it and rerun the embed job: "
                                     "its rows are embedded again") from exc


def all_splits(embeddings_dir: Path) -> list[str]:
    """The split names of an output directory (its `split=<name>/` folders holding parts), sorted."""
    prefix = f"{store.PARTITION}="
    names = []
    for folder in sorted(Path(embeddings_dir).glob(f"{prefix}*")):
        if folder.is_dir() and store.parts(folder):
            name = folder.name.removeprefix(prefix).replace("%3D", "=").replace("%25", "%")
            names.append(name)
    return names


def open_source(embeddings_dir: str | Path, splits: list[str] | None) -> Source:
    """The parts of `splits` (None or [] = every split there), their row counts from the footers; parts of other
    settings than the first are refused (StoreMismatchError), as are a missing folder or split (UserError)."""
    embeddings_dir = Path(embeddings_dir)
    if not embeddings_dir.is_dir():
        raise UserError(f"embeddings_dir={embeddings_dir}: no such folder; embed the dataset first "
                        "(python -m pipelines.embed) or point embeddings_dir at its output_dir")
    store.check_layout(embeddings_dir)
    splits = list(splits or all_splits(embeddings_dir))
    if not splits:
        raise UserError(f"embeddings_dir={embeddings_dir}: holds no embedded split (no split=*/part-*.parquet)")
    parts: list[tuple[str, Path, int]] = []
    metadata: dict[str, Any] | None = None
    for split in splits:
        found = store.parts(store.split_dir(embeddings_dir, split))
        if not found:
            there = ", ".join(all_splits(embeddings_dir)) or "none"
            raise UserError(f"split {split!r}: no parts under {store.split_dir(embeddings_dir, split)} "
                            f"(embedded splits: {there})")
        for part in found:
            meta = store.read_metadata(part)
            if metadata is None:
                metadata = meta
            else:
                store.check_same(metadata, meta, what=str(part), hint="embed every split with the same settings")
            parts.append((split, part, _num_rows(part)))
    assert metadata is not None
    return Source(embeddings_dir, splits, parts, int(metadata["embedding_dim"]), metadata)


def _num_rows(part: Path) -> int:
    try:
        return pq.read_metadata(part).num_rows
    except (pa.ArrowException, OSError) as exc:
        raise store.CorruptPartError(f"{part} is not a readable part ({exc}); delete it and rerun the embed job: "
                                     "its rows are embedded again") from exc


def normalize(x: np.ndarray) -> np.ndarray:
    """float32 [n, D] rows scaled to unit L2 norm, in place (all-zero rows stay zero); returns x."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def iter_vectors(source: Source, *, chunk_rows: int = 65536) -> Iterator[np.ndarray]:
    """The source's embeddings, L2-normalised float32 [n, D] chunks of up to `chunk_rows` rows, in index order."""
    pending: list[np.ndarray] = []
    held = 0
    for _, part, _ in source.parts:
        table = store.read_part(part, columns=["embedding"])
        pending.append(store.embedding_matrix(table.column("embedding"), source.dim))
        held += len(pending[-1])
        del table
        if held >= chunk_rows:
            yield normalize(np.concatenate(pending) if len(pending) > 1 else pending[0].copy())
            pending, held = [], 0
    if pending:
        yield normalize(np.concatenate(pending) if len(pending) > 1 else pending[0].copy())


@dataclass
class Rows:
    """What a result row points at, as Arrow arrays [N] in index order: path, label, split."""

    paths: pa.Array
    labels: pa.Array
    splits: pa.Array

    def take(self, ids: np.ndarray) -> list[dict[str, str]]:
        """Python dicts for the given row ids only (the rest stays in Arrow)."""
        index = pa.array(ids, pa.int64())
        cols = (self.paths.take(index).to_pylist(), self.labels.take(index).to_pylist(),
                self.splits.take(index).to_pylist())
        return [{"path": p, "label": lab, "split": s} for p, lab, s in zip(*cols, strict=True)]


def read_rows(source: Source) -> Rows:
    """The path and label columns of every part (no embeddings), and each row's split; a split holding a path
    twice is refused (CorruptPartError), as validate does."""
    paths: list[pa.Array] = []
    labels: list[pa.Array] = []
    splits: list[pa.Array] = []
    for split in source.splits:
        first = len(paths)
        for part_split, part, rows in source.parts:
            if part_split != split:
                continue
            table = store.read_part(part, columns=["path", "label"])
            paths += [c.cast(pa.string()) for c in table.column("path").chunks]
            labels += [c.cast(pa.string()) for c in table.column("label").chunks]
            splits.append(pa.repeat(pa.scalar(split, pa.string()), rows))
        column = pa.chunked_array(paths[first:], pa.string())
        if pc.count_distinct(column).as_py() != len(column):
            store.check_unique(column.to_pylist(), where=str(store.split_dir(source.embeddings_dir, split)))
    return Rows(*(pa.concat_arrays(a) if a else pa.array([], pa.string()) for a in (paths, labels, splits)))


# ------------------------------------------------------------------------------------------------------ building


def check_kind(kind: str) -> None:
    """Refuse an index kind that is none of KINDS (UserError)."""
    if kind not in KINDS:
        raise UserError(f"index={kind!r}: expected one of {', '.join(KINDS)}")


def choose_kind(kind: str, rows: int, *, exact_below: int, hnsw_below: int) -> str:
    """The index kind for `rows` vectors: `exact`, `ivf` or `hnsw` as asked; `auto` by size.

    auto: fewer than `exact_below` rows -> exact (a flat scan of them takes milliseconds, an approximate index
    would not be faster); fewer than `hnsw_below` -> hnsw (the best recall for its speed, no training, but its
    build cost grows fastest and it stays on the CPU); more -> ivf (built in two BLAS-bound passes, trains on a
    sample, runs on GPU FAISS too).
    """
    check_kind(kind)
    if kind != "auto":
        return kind
    return "exact" if rows < exact_below else "hnsw" if rows < hnsw_below else "ivf"


MIN_POINTS_PER_CELL = 39  # FAISS's k-means wants 39 training points per centroid (and fails below 1)


def ivf_nlist(rows: int, nlist: int | str) -> int:
    """IVF cells: `nlist`, or for `auto` the power of two nearest √rows; at least 1 and at most rows/39 (FAISS
    wants 39 training points per centroid). A given `nlist` above that is lowered, with a warning saying so."""
    most = max(1, rows // MIN_POINTS_PER_CELL)
    if nlist != "auto":
        if not isinstance(nlist, int) or isinstance(nlist, bool) or nlist < 1:
            raise UserError(f"ann.ivf_nlist={nlist!r}: expected auto or a whole number of at least 1")
        if nlist > most:
            log.warning("ann.ivf_nlist=%d is too many cells for %d rows (k-means needs %d per cell): using %d",
                        nlist, rows, MIN_POINTS_PER_CELL, most)
        return min(nlist, most)
    best = 2 ** round(math.log2(max(math.sqrt(rows), 1)))
    return int(min(best, most))


def use_gpu(device: str) -> bool:
    """Whether to put an index on the GPU: `auto` when GPU FAISS and a GPU are there; `cuda` insists."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device={device!r}: expected auto, cpu or cuda")
    faiss = import_faiss()
    gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
    if device == "cuda" and gpus == 0:
        raise UserError("device=cuda: GPU FAISS or a GPU is missing (pip install '.[gpu]' on a CUDA host)")
    return device != "cpu" and gpus > 0


def to_device(index: Any, *, gpu: bool) -> Any:
    """The index on GPU 0 when `gpu` and the kind runs there (flat and IVF do; HNSW stays on the CPU)."""
    faiss = import_faiss()
    if not gpu or isinstance(index, faiss.IndexHNSW):
        return index
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)


def build_index(kind: str, vectors: Callable[[], Iterator[np.ndarray]], *, rows: int, dim: int, gpu: bool,
                options: dict[str, Any]) -> Any:
    """A FAISS inner-product index of kind exact / ivf / hnsw over the unit vectors `vectors()` yields.

    `vectors`: called once per pass (IVF reads twice: a training sample, then every row). `options`: the `ann`
    settings (ivf_nlist, ivf_nprobe, ivf_train_rows, ivf_train_iters, hnsw_m, hnsw_ef_construction,
    hnsw_ef_search, seed).
    """
    faiss = import_faiss()
    start = time.perf_counter()
    if kind == "exact":
        index = to_device(faiss.IndexFlatIP(dim), gpu=gpu)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(options["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(options["hnsw_ef_construction"])
        index.hnsw.efSearch = int(options["hnsw_ef_search"])
    elif kind == "ivf":
        nlist = ivf_nlist(rows, options["ivf_nlist"])
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(int(options["ivf_nprobe"]), nlist)
        sample = training_sample(vectors(), rows=rows, size=_train_rows(options["ivf_train_rows"], nlist, rows),
                                 seed=int(options["seed"]))
        index.cp.seed, index.cp.niter = int(options["seed"]), int(options["ivf_train_iters"])
        index = to_device(index, gpu=gpu)
        index.train(sample)
        del sample
        log.info("trained IVF%d in %.1f s", nlist, time.perf_counter() - start)
    else:
        raise UserError(f"index={kind!r}: expected exact, ivf or hnsw")
    added = 0
    for chunk in vectors():
        index.add(chunk)
        added += len(chunk)
        log.debug("added %d of %d rows", added, rows)
    log.info("built %s index of %d rows in %.1f s", kind, added, time.perf_counter() - start)
    return index


def _train_rows(train_rows: int | str, nlist: int, rows: int) -> int:
    """IVF training sample: `train_rows`, or for `auto` 64 rows per cell (k-means cost grows with both)."""
    size = 64 * nlist if train_rows == "auto" else int(train_rows)
    return max(min(size, rows), nlist)


def training_sample(chunks: Iterator[np.ndarray], *, rows: int, size: int, seed: int) -> np.ndarray:
    """`size` rows drawn without replacement (seeded) from chunks of `rows` rows in all: float32 [size, D]."""
    pick = np.sort(np.random.default_rng(seed).choice(rows, size=min(size, rows), replace=False))
    taken, offset = [], 0
    for chunk in chunks:
        lo, hi = np.searchsorted(pick, [offset, offset + len(chunk)])
        taken.append(chunk[pick[lo:hi] - offset])
        offset += len(chunk)
    return np.ascontiguousarray(np.concatenate(taken))


# ----------------------------------------------------------------------------------------------- saving, loading


def index_dir(embeddings_dir: str | Path) -> Path:
    """The sibling folder `<embeddings_dir>-index` (outside the embeddings' Parquet dataset)."""
    return store.sibling_dir(embeddings_dir, INDEX_SUFFIX, instead="index_dir=")


def index_paths(folder: Path, splits: list[str], kind: str) -> tuple[Path, Path]:
    """(`<splits>-<kind>.faiss`, `<splits>-<kind>.json`) in `folder`; splits joined by '+'."""
    stem = "+".join(s.replace("/", "_") for s in splits) + f"-{kind}"
    return folder / f"{stem}.faiss", folder / f"{stem}.json"


def check_index_location(folder: Path, embeddings_dir: Path) -> None:
    """Refuse an index folder inside the embeddings folder (UserError): its files are the embed job's alone."""
    if store.is_inside(folder.resolve(), embeddings_dir.resolve()):
        raise UserError(f"index_dir={folder}: lies inside embeddings_dir={embeddings_dir}, which holds only the "
                        f"embed job's files; choose a folder outside it (the default is {index_dir(embeddings_dir)})")


def describe(source: Source, kind: str, index: Any, options: dict[str, Any], build_s: float) -> dict[str, Any]:
    """The JSON saved beside an index: what it was built from and how."""
    settings: dict[str, Any] = {}
    if kind == "ivf":
        settings = {"nlist": int(index.nlist), "nprobe": int(index.nprobe)}
    elif kind == "hnsw":
        settings = {"m": int(options["hnsw_m"]), "ef_construction": int(options["hnsw_ef_construction"]),
                    "ef_search": int(index.hnsw.efSearch)}
    return {"format": FORMAT_VERSION, "kind": kind, "splits": source.splits, "rows": source.rows,
            "dim": source.dim, "metric": "inner product of L2-normalised embeddings (cosine)",
            "settings": settings, "fingerprint": source.fingerprint(), "model": source.metadata,
            "embeddings_dir": str(source.embeddings_dir), "build_s": round(build_s, 3)}


def save_index(index: Any, info: dict[str, Any], paths: tuple[Path, Path]) -> None:
    """Write the index and its JSON atomically (temporary names, then renames; the JSON last)."""
    faiss = import_faiss()
    target, meta = paths
    if hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex):
        index = faiss.index_gpu_to_cpu(index)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    with store.writing(target.parent, cleanup=tmp, then="then rerun"):
        target.parent.mkdir(parents=True, exist_ok=True)
        faiss.write_index(index, str(tmp))
        os.replace(tmp, target)
    store.write_json(meta, info)


def check_fresh(info: dict[str, Any], source: Source, meta_path: Path) -> None:
    """Refuse a saved index built from other embeddings or another model (StaleIndexError: rebuild)."""
    then, now = info.get("fingerprint", {}), source.fingerprint()
    why = []
    if info.get("format") != FORMAT_VERSION:
        why.append(f"format {info.get('format')!r}, this version reads {FORMAT_VERSION}")
    why += store.differences(info.get("model", {}), source.metadata, where=("then", "now"))
    if then.get("rows") != now["rows"]:
        why.append(f"{then.get('rows')} rows then, {now['rows']} now")
    elif then.get("sha256") != now["sha256"]:
        why.append("its parts changed (names, sizes, times or content)")
    if why:
        raise StaleIndexError(f"{meta_path.with_suffix('.faiss')} was built from other embeddings ({'; '.join(why)}); "
                              "rebuild it with rebuild=true")


def load_saved(paths: tuple[Path, Path], source: Source) -> tuple[Any, dict[str, Any]] | None:
    """The saved index and its JSON when both exist and match `source` (StaleIndexError otherwise); else None."""
    target, meta = paths
    if not (target.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StaleIndexError(f"{meta} is not valid JSON ({exc}); rebuild the index with rebuild=true") from exc
    check_fresh(info, source, meta)
    faiss = import_faiss()
    try:
        index = faiss.read_index(str(target))
    except RuntimeError as exc:
        raise StaleIndexError(f"{target} is not a readable FAISS index; rebuild it with rebuild=true") from exc
    if index.ntotal != source.rows or index.d != source.dim:
        raise StaleIndexError(f"{target} holds {index.ntotal} rows of {index.d}-d, the embeddings {source.rows} of "
                              f"{source.dim}-d; rebuild it with rebuild=true")
    return index, info


# ------------------------------------------------------------------------------------------------------ searching


@dataclass
class SearchIndex:
    """An index ready to search, with what it was built from: `info` as saved (or described, for exact)."""

    index: Any
    kind: str
    info: dict[str, Any]
    source: Source
    loaded: bool  # read from disk (True) or built in this process (False)
    path: Path | None = None  # the saved index file (None for exact)

    def settings(self) -> dict[str, Any]:
        """The settings searches use now: the saved ones with the query-time knobs (nprobe, efSearch) as set."""
        live = dict(self.info["settings"])
        if self.kind == "ivf":
            live["nprobe"] = int(self.index.nprobe)
        elif self.kind == "hnsw":
            live["ef_search"] = int(self.index.hnsw.efSearch)
        return live

    def search(self, queries: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 [q, D] queries (normalised here) -> cosine scores float32 [q, k'] and row ids int64 [q, k'],
        k' = min(k, rows); best first. An approximate index may return fewer: their ids are -1."""
        queries = normalize(np.ascontiguousarray(queries, dtype=np.float32).copy())
        scores, ids = self.index.search(queries, min(k, self.source.rows))
        return scores, ids.astype(np.int64, copy=False)


def open_index(source: Source, *, kind: str, rebuild: bool, folder: str | Path | None, device: str,
               options: dict[str, Any]) -> SearchIndex:
    """The index to search `source` with: exact (built in memory), or an approximate one loaded from `folder`
    (None = `<embeddings_dir>-index`), built and saved when missing or when `rebuild`."""
    kind = choose_kind(kind, source.rows, exact_below=int(options["exact_below"]),
                       hnsw_below=int(options["hnsw_below"]))
    gpu = use_gpu(device)
    def vectors() -> Iterator[np.ndarray]:  # one pass over the parts per call
        return iter_vectors(source)

    if kind == "exact":
        start = time.perf_counter()
        index = build_index("exact", vectors, rows=source.rows, dim=source.dim, gpu=gpu, options=options)
        return SearchIndex(index, kind, describe(source, kind, index, options, time.perf_counter() - start),
                           source, loaded=False)
    folder = index_dir(source.embeddings_dir) if folder in (None, "") else Path(folder)
    check_index_location(folder, source.embeddings_dir)
    paths = index_paths(folder, source.splits, kind)
    if not rebuild:
        saved = load_saved(paths, source)
        if saved is not None:
            index, info = saved
            _apply_search_settings(index, kind, options)
            log.info("loaded %s (%d rows)", paths[0], index.ntotal)
            return SearchIndex(to_device(index, gpu=gpu), kind, info, source, loaded=True, path=paths[0])
    start = time.perf_counter()
    index = build_index(kind, vectors, rows=source.rows, dim=source.dim, gpu=gpu, options=options)
    info = describe(source, kind, index, options, time.perf_counter() - start)
    save_index(index, info, paths)
    log.info("saved %s", paths[0])
    return SearchIndex(index, kind, info, source, loaded=False, path=paths[0])


def _apply_search_settings(index: Any, kind: str, options: dict[str, Any]) -> None:
    """Query-time knobs come from the settings, not from the saved file: nprobe (IVF), efSearch (HNSW)."""
    if kind == "ivf":
        index.nprobe = min(int(options["ivf_nprobe"]), int(index.nlist))
    elif kind == "hnsw":
        index.hnsw.efSearch = int(options["hnsw_ef_search"])
