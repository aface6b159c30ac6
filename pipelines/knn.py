"""k-nearest-neighbour classification of embeddings: arrays in, predictions out.

Three interchangeable neighbour searches and one vote:
- `SklearnBackend`: `sklearn.neighbors` brute force, the reference (the search `KNeighborsClassifier.predict` runs);
- `FaissBackend`: a flat (exact) FAISS index, on the GPU when GPU FAISS and a GPU are there;
- `TorchBackend`: matrix product + top-k in chunks, on any torch device.

Every backend takes float64 copies of the embeddings, so that all agree with sklearn fed the same arrays. The
fast ones find candidates in float32, recompute the candidates' distances in float64 as sklearn defines them
and keep the k nearest. A query whose candidates cannot be proven (by a float32 error bound) to hold its float64
nearest neighbours is searched again exhaustively in float64, so speed never costs a prediction.

The vote follows `KNeighborsClassifier.predict`: weight 1/d (`distance`) or 1 (`uniform`); when a query has
neighbours at distance 0, only those vote, with weight 1; ties go to the lowest class index.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.neighbors import NearestNeighbors

from pipelines.errors import UserError

log = logging.getLogger(__name__)

METRICS = ("cosine", "euclidean")
WEIGHTS = ("distance", "uniform")
_U32 = 2.0**-24  # unit roundoff of float32
_U64 = 2.0**-53


@dataclass
class Neighbours:
    """The k nearest train rows of each query: float64 [Q, k] distances (ascending), int64 [Q, k] indices."""

    distances: np.ndarray
    indices: np.ndarray
    rechecked: int = 0  # queries whose float32 candidates were not conclusive and were searched in float64


@dataclass
class Result:
    """Summed vote weights float64 [Q, C] (class c = column c) and the neighbours they came from."""

    scores: np.ndarray
    neighbours: Neighbours

    @property
    def predictions(self) -> np.ndarray:
        """int64 [Q]: the class with the largest summed weight, the lowest index among equals."""
        return self.scores.argmax(axis=1)

    def top(self, n: int) -> np.ndarray:
        """int64 [Q, n]: the n classes with the largest summed weight, best first, ties to the lowest index."""
        return np.argsort(-self.scores, axis=1, kind="stable")[:, :n]


def check_settings(*, k: int, weights: str, metric: str) -> None:
    """Raise UserError naming the setting that is out of range."""
    if metric not in METRICS:
        raise UserError(f"metric={metric!r}: expected one of {', '.join(METRICS)}")
    if weights not in WEIGHTS:
        raise UserError(f"weights={weights!r}: expected one of {', '.join(WEIGHTS)}")
    if int(k) < 1:
        raise UserError(f"k={k}: expected a positive number of neighbours")


def prepared(x: np.ndarray, metric: str) -> np.ndarray:
    """float [N, D] -> float64 [N, D]; for cosine, rows scaled to unit length as sklearn's `normalize` does."""
    x = np.array(x, dtype=np.float64)  # a copy: the caller's array is left alone
    if metric == "cosine":
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        norms[norms < 10 * np.finfo(np.float64).eps] = 1.0  # zero rows stay zero (distance 1 to all), as sklearn
        x /= norms[:, None]
    return x


def exact_distances(train: np.ndarray, query: np.ndarray, indices: np.ndarray, *, metric: str,
                    buffer: np.ndarray | None = None) -> np.ndarray:
    """float64 [Q, c] distances from each query to its listed train rows, by sklearn's formulas.

    `train` [N, D] and `query` [Q, D] come from `prepared`; `indices` is int [Q, c]; `buffer`, float64 with at
    least Q * c * D elements, is reused for the gathered rows (fresh allocations of this size cost page faults).
    cosine: clip(1 - <q, t>, 0, 2); euclidean: sqrt(max(|q|^2 - 2 <q, t> + |t|^2, 0)).
    """
    shape = (*indices.shape, train.shape[1])
    out = None if buffer is None else buffer[:np.prod(shape)].reshape(shape)
    t = np.take(train, indices, axis=0, out=out, mode="clip")  # indices are valid; "clip" avoids a copy of out
    dots = np.einsum("qd,qcd->qc", query, t)
    if metric == "cosine":
        return np.clip(1.0 - dots, 0.0, 2.0)
    qq = np.einsum("qd,qd->q", query, query)[:, None]
    return np.sqrt(np.maximum(qq - 2.0 * dots + np.einsum("qcd,qcd->qc", t, t), 0.0))


def exhaustive(train: np.ndarray, query: np.ndarray, *, k: int, metric: str) -> Neighbours:
    """Float64 brute force over every train row; `train`, `query` from `prepared`."""
    dist = np.empty((len(query), k))
    ind = np.empty((len(query), k), dtype=np.int64)
    tt = np.einsum("ij,ij->i", train, train)
    rows = max(1, 2**24 // max(1, len(train)))
    for start in range(0, len(query), rows):
        q = query[start:start + rows]
        dots = q @ train.T
        if metric == "cosine":
            d = np.clip(1.0 - dots, 0.0, 2.0)
        else:
            d = np.sqrt(np.maximum(np.einsum("ij,ij->i", q, q)[:, None] - 2.0 * dots + tt, 0.0))
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        ind[start:start + rows] = order
        dist[start:start + rows] = np.take_along_axis(d, order, axis=1)
    return Neighbours(dist, ind)


class Backend(ABC):
    """A neighbour search: float [N, D] train, float [Q, D] queries -> the k nearest train rows of each query."""

    name: str = ""

    @abstractmethod
    def search(self, train: np.ndarray, query: np.ndarray, *, k: int, metric: str) -> Neighbours:
        """Neighbours with float64 distances (see the module docstring for how they are made exact)."""

    def describe(self) -> dict[str, Any]:
        """What the report records about the backend."""
        return {"name": self.name}


class SklearnBackend(Backend):
    """`sklearn.neighbors` on float64 arrays: the neighbours `KNeighborsClassifier.predict` uses."""

    name = "sklearn"

    def __init__(self, n_jobs: int | None = None) -> None:
        self.n_jobs = n_jobs

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": "cpu"}

    def search(self, train: np.ndarray, query: np.ndarray, *, k: int, metric: str) -> Neighbours:
        index = NearestNeighbors(n_neighbors=k, metric=metric, n_jobs=self.n_jobs)
        index.fit(np.asarray(train, dtype=np.float64))
        dist, ind = index.kneighbors(np.asarray(query, dtype=np.float64))
        return Neighbours(dist.astype(np.float64, copy=False), ind.astype(np.int64, copy=False))


class CandidateBackend(Backend):
    """A float32 candidate search made exact: float64 rerank, proof of completeness, float64 fallback."""

    @abstractmethod
    def candidates(self, train: np.ndarray, query: np.ndarray, *, n: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """float32 [N, D], [Q, D] (unit rows for cosine) -> (approx [Q, n], int64 indices [Q, n]).

        approx is ascending: 1 - similarity for cosine, the squared distance for euclidean.
        """

    def search(self, train: np.ndarray, query: np.ndarray, *, k: int, metric: str) -> Neighbours:
        train64, query64 = prepared(train, metric), prepared(query, metric)
        n = min(len(train64), 2 * k + 16)
        approx, idx = self.candidates(train64.astype(np.float32), query64.astype(np.float32), n=n, metric=metric)
        # A row whose approx exceeds the k-th candidate's by more than 2 tol is farther, exactly, than k rows:
        # only rows under that limit can be among the k nearest, and all of them are candidates unless the
        # limit reaches the last candidate.
        limit = approx[:, k - 1] + 2 * _tolerance(train64, query64, approx, metric=metric)
        within = approx <= limit[:, None]
        found = _rerank(train64, query64, idx, within, k=k, metric=metric)
        unsure = np.flatnonzero(within[:, -1]) if n < len(train64) else np.empty(0, dtype=np.int64)
        if len(unsure):
            again = exhaustive(train64, query64[unsure], k=k, metric=metric)
            found.distances[unsure], found.indices[unsure] = again.distances, again.indices
            found.rechecked = len(unsure)
            log.info("%s: %d of %d queries rechecked in float64", self.name, len(unsure), len(query64))
        return found


def _tolerance(train: np.ndarray, query: np.ndarray, approx: np.ndarray, *, metric: str) -> np.ndarray:
    """float64 [Q]: a bound on |approx - exact| for any train row and each query, from float32 rounding.

    Rounding the inputs plus a D-term dot product cost at most (D + 16) u |q| |t| (u = 2^-24): unit rows for
    cosine, (|q| + |t|)^2 on squared distances for euclidean.
    """
    dim = train.shape[1]
    if metric == "cosine":
        tol = np.full(len(query), (dim + 16) * _U32)
    else:
        t_max = float(np.sqrt(np.einsum("ij,ij->i", train, train).max()))
        tol = (dim + 16) * _U32 * (np.sqrt(np.einsum("ij,ij->i", query, query)) + t_max) ** 2
    return tol + 64 * _U64 * np.abs(approx).max(axis=1)


def _rerank(train: np.ndarray, query: np.ndarray, idx: np.ndarray, within: np.ndarray, *, k: int,
            metric: str) -> Neighbours:
    """The k nearest by exact float64 distance among the candidates; those past `within` (bool [Q, n], a prefix)
    are provably farther than k others, so each block of rows only gathers as many columns as it needs."""
    dist = np.empty((len(query), k))
    ind = np.empty((len(query), k), dtype=np.int64)
    rows = 1024
    buffer = np.empty(min(rows, len(query)) * idx.shape[1] * train.shape[1])
    for start in range(0, len(query), rows):
        sl = slice(start, start + rows)
        m = max(k, int(within[sl].sum(axis=1).max()))  # gather only the candidates that can matter
        d = exact_distances(train, query[sl], idx[sl, :m], metric=metric, buffer=buffer)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        dist[sl], ind[sl] = np.take_along_axis(d, order, axis=1), np.take_along_axis(idx[sl, :m], order, axis=1)
    return Neighbours(dist, ind)


class TorchBackend(CandidateBackend):
    """Matrix product + top-k in chunks with torch, on `device` (`auto`: CUDA when present, else CPU)."""

    name = "torch"

    def __init__(self, device: str = "auto", max_chunk_bytes: int = 2**28) -> None:
        import torch  # noqa: F401  (here, so that search timings leave the import out)

        self.device = device
        self.max_chunk_bytes = max_chunk_bytes

    def _device(self) -> Any:
        from pipelines.devices import resolve_device  # torch, imported only for this backend

        return resolve_device(self.device)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": str(self._device())}

    def candidates(self, train: np.ndarray, query: np.ndarray, *, n: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        import torch

        device = self._device()
        approx = np.empty((len(query), n), dtype=np.float32)
        idx = np.empty((len(query), n), dtype=np.int64)
        rows = max(1, self.max_chunk_bytes // (4 * len(train)))
        with torch.inference_mode(), _full_fp32_matmul(torch):
            t = torch.from_numpy(train).to(device)
            tt = (t * t).sum(dim=1)
            for start in range(0, len(query), rows):
                q = torch.from_numpy(query[start:start + rows]).to(device)
                if metric == "cosine":
                    val, ind = torch.topk(q @ t.T, n, dim=1, largest=True, sorted=True)
                    val = 1.0 - val
                else:
                    sq = (q * q).sum(dim=1, keepdim=True) - 2.0 * (q @ t.T) + tt
                    val, ind = torch.topk(sq, n, dim=1, largest=False, sorted=True)
                approx[start:start + rows], idx[start:start + rows] = val.cpu().numpy(), ind.cpu().numpy()
        return approx, idx


@contextlib.contextmanager
def _full_fp32_matmul(torch: Any) -> Iterator[None]:
    """TF32 on CUDA would break the float32 error bound the exactness proof relies on."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


class FaissBackend(CandidateBackend):
    """A flat FAISS index (inner product or L2); GPU FAISS when installed and a GPU is present (`auto`)."""

    name = "faiss"

    def __init__(self, device: str = "auto") -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise UserError(f"faiss device={device!r}: expected auto, cpu or cuda")
        import_faiss()  # here, so that search timings leave the import out
        self.device = device

    def _use_gpu(self) -> bool:
        import faiss

        gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
        if self.device == "cuda" and gpus == 0:
            raise UserError("faiss device=cuda: GPU FAISS or a GPU is missing (pip install '.[gpu]' on a CUDA host)")
        return self.device != "cpu" and gpus > 0

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": "cuda" if self._use_gpu() else "cpu"}

    def candidates(self, train: np.ndarray, query: np.ndarray, *, n: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        index = faiss.IndexFlatIP(train.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(train.shape[1])
        if self._use_gpu():
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(np.ascontiguousarray(train))
        val, ind = index.search(np.ascontiguousarray(query), n)
        return (1.0 - val if metric == "cosine" else val), ind.astype(np.int64, copy=False)


FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu")


def import_faiss(who: str = "knn=faiss", *, otherwise: str = "; or use knn=torch or knn=sklearn") -> Any:
    """The `faiss` module; UserError (one line naming the extra) when none or several FAISS wheels are installed.
    `who`: what needs it (the message's start); `otherwise`: what to do instead, appended to the missing case."""
    from importlib import metadata

    installed = []
    for dist in FAISS_DISTRIBUTIONS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            installed.append(f"{dist} {metadata.version(dist)}")
    if len(installed) > 1:  # they ship the same `faiss` package: the last one installed overwrote the other's files
        raise UserError(f"{who}: {' and '.join(installed)} are both installed and overwrite each other's "
                        f"`faiss` package; keep one (pip uninstall faiss-cpu on a CUDA host, else the GPU one)")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it loaded: noise
    try:
        import faiss
    except ImportError as exc:
        raise UserError(f"{who} needs FAISS ({exc}): pip install 'siglip-pipelines[cpu]', or "
                        f"'siglip-pipelines[gpu]' on a CUDA 12 host{otherwise}") from exc
    return faiss


BACKENDS: dict[str, type[Backend]] = {"sklearn": SklearnBackend, "faiss": FaissBackend, "torch": TorchBackend}


def make_backend(name: str, **kwargs: Any) -> Backend:
    """A backend by name: sklearn, faiss or torch; kwargs go to its constructor (e.g. device)."""
    if name not in BACKENDS:
        raise UserError(f"knn backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name](**kwargs)


def class_scores(neighbours: Neighbours, train_labels: np.ndarray, n_classes: int, *, weights: str) -> np.ndarray:
    """float64 [Q, C] summed vote weights; `train_labels` int [N] in [0, C).

    As sklearn: weight 1/d, or 1 for `uniform`; a query with neighbours at distance 0 counts only those, each 1.
    """
    labels = np.asarray(train_labels)[neighbours.indices]
    if weights == "uniform":
        w = np.ones(labels.shape)
    else:
        d = neighbours.distances
        with np.errstate(divide="ignore"):
            w = 1.0 / d
        zero = d == 0
        exact = zero.any(axis=1)
        w[exact] = zero[exact]
    scores = np.zeros((len(labels), n_classes))
    rows = np.arange(len(labels))
    for j in range(labels.shape[1]):  # in neighbour order, as sklearn's predict_proba adds them
        scores[rows, labels[:, j]] += w[:, j]
    return scores


def classify(
    train: np.ndarray,
    train_labels: np.ndarray,
    query: np.ndarray,
    *,
    n_classes: int,
    k: int = 10,
    weights: str = "distance",
    metric: str = "cosine",
    backend: Backend | None = None,
) -> Result:
    """k-NN vote of float [N, D] `train` (int [N] labels in [0, n_classes)) for float [Q, D] `query`."""
    check_settings(k=k, weights=weights, metric=metric)
    if train.shape[1] != query.shape[1]:
        raise UserError(f"train embeddings are {train.shape[1]}-d, queries {query.shape[1]}-d")
    if k > len(train):
        raise UserError(f"k={k} neighbours asked for, but only {len(train)} train rows")
    backend = backend or SklearnBackend()
    neighbours = backend.search(train, query, k=k, metric=metric)
    return Result(class_scores(neighbours, train_labels, n_classes, weights=weights), neighbours)
