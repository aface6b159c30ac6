"""Few-shot k-NN evaluation of stored embeddings: the splits read and checked, the episodes' draws of `shots`
train images per class, `pipelines.knn` per episode, and the report family of `pipelines.report`.

Reads the embed job's Parquet (never runs the model) and writes to the sibling folder `<embeddings_dir>-validation/`
(outside the embeddings' Parquet dataset): report.json, per_class.csv, predictions.parquet (with each query's
neighbours) and per_class.png. pandas, matplotlib and the k-NN backends (scikit-learn, torch) are imported where
they are used, so that bad settings answer in a moment. `pipelines.validate` is its command line.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines import report, store
from pipelines.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from pipelines import knn

log = logging.getLogger(__name__)


def check_compatible(train: store.Split, query: store.Split, *, names: tuple[str, str]) -> None:
    """Refuse two splits made with other models or settings, or holding other classes (UserError)."""
    a, b = names
    diffs = store.differences(train.metadata, query.metadata, where=(f"in {a}", f"in {b}"))
    if diffs:
        raise UserError(f"cannot compare {a} with {b}: they were embedded differently ({'; '.join(diffs)}); "
                        "embed both splits with the same model and settings")
    if train.embeddings.shape[1] != query.embeddings.shape[1]:
        raise UserError(f"cannot compare {a} with {b}: {train.embeddings.shape[1]}-d against "
                        f"{query.embeddings.shape[1]}-d embeddings")
    only_a, only_b = set(train.labels) - set(query.labels), set(query.labels) - set(train.labels)
    if only_a or only_b:
        raise UserError(f"{a} and {b} hold different classes: {_some(only_a)} only in {a}; "
                        f"{_some(only_b)} only in {b}")


def _some(labels: set[str], n: int = 5) -> str:
    shown = ", ".join(sorted(labels)[:n])
    return f"{len(labels)} ({shown}{', ...' if len(labels) > n else ''})" if labels else "none"


def episode_draws(labels: np.ndarray, n_classes: int, *, shots: int | None, episodes: int,
                  seed: int) -> list[np.ndarray]:
    """Sorted int64 train-row indices, one array per episode: `shots` rows per class, seeded by (seed, episode).

    Without a class holding more than `shots` rows (or with shots=None) there is nothing to draw: one episode of
    every row, the seed protocol.
    """
    counts = np.bincount(labels, minlength=n_classes)
    if shots is None or counts.max() <= shots:
        if episodes > 1:
            log.warning("no class has more than shots=%s train images: one episode, nothing to draw", shots)
        return [np.arange(len(labels))]
    if counts.min() < shots:
        log.warning("%d classes have fewer than shots=%d train images; all of theirs are used",
                    int((counts < shots).sum()), shots)
    groups = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])
    draws = []
    for episode in range(episodes):
        rng = np.random.default_rng([seed, episode])
        picks = [rng.choice(g, size=min(shots, len(g)), replace=False) for g in groups]
        draws.append(np.sort(np.concatenate(picks)))
    return draws


@dataclass
class Labelled:
    """The two splits read and checked, their sorted classes, and int64 class indices [N] and [Q]."""

    train: store.Split
    query: store.Split
    classes: list[str]
    y_train: np.ndarray
    y_query: np.ndarray


def load_splits(embeddings_dir: Path, train_split: str, query_split: str) -> Labelled:
    """Read both splits through the store; refuse a mismatch (UserError)."""
    train, query = store.read_split(embeddings_dir, train_split), store.read_split(embeddings_dir, query_split)
    check_compatible(train, query, names=(train_split, query_split))
    classes = sorted(set(train.labels))
    return Labelled(train, query, classes, _codes(train.labels, classes), _codes(query.labels, classes))


def evaluate(
    *,
    embeddings_dir: str | Path,
    train_split: str,
    query_split: str,
    k: int,
    weights: str,
    metric: str,
    backend: knn.Backend | str,
    shots: int | None,
    episodes: int,
    seed: int,
    class_names: str | Path | None,
    dataset_root: str | Path | None,
    output_dir: str | Path | None,
    worst: int,
    exclude_duplicates: bool = False,
    duplicate_threshold: float | None = None,
) -> tuple[dict[str, Any], str]:
    """k-NN of `query_split` against `train_split` in `embeddings_dir`; writes the outputs (`pipelines.report`),
    returns the report and the printed table.

    `output_dir`: None = `<embeddings_dir>-validation` (`store.validation_dir`); never inside `embeddings_dir`.
    `exclude_duplicates`: drop the queries with a near-copy (cosine >= `duplicate_threshold`, None = dedup's
    default) among the train rows before classifying; the count is reported.
    """
    from pipelines import knn

    start = time.perf_counter()
    knn.check_settings(k=k, weights=weights, metric=metric)
    if episodes < 1:
        raise UserError(f"episodes={episodes}: expected at least 1")
    backend = knn.make_backend(backend) if isinstance(backend, str) else backend
    embeddings_dir = Path(embeddings_dir)
    out = output_location(embeddings_dir, output_dir)
    data = load_splits(embeddings_dir, train_split, query_split)
    excluded = drop_duplicates(data, threshold=duplicate_threshold) if exclude_duplicates else None
    read_s = time.perf_counter() - start
    n_classes = len(data.classes)
    draws = episode_draws(data.y_train, n_classes, shots=shots, episodes=episodes, seed=seed)
    runs, first = _run_episodes(data, draws, n_classes=n_classes, k=k, weights=weights, metric=metric,
                                backend=backend)
    names_path = report.find_class_names(class_names, [embeddings_dir, *([Path(dataset_root)] if dataset_root else [])])
    metadata = {
        "num_classes": n_classes,
        "num_train": len(draws[0]),
        "num_train_available": len(data.y_train),
        "num_query": len(data.y_query),
        "settings": {"train_split": train_split, "query_split": query_split, "k": k, "weights": weights,
                     "metric": metric, "shots": shots, "episodes": len(draws), "seed": seed,
                     "subsampled": len(draws[0]) < len(data.y_train)},
        "backend": backend.describe(),
        "model": data.train.metadata,
        "class_names": str(names_path) if names_path else None,
        "dataset_root": _image_root(dataset_root, data.train.paths[0]),
        "duplicates_excluded": excluded,
    }
    source = {"embeddings_dir": str(embeddings_dir)}
    return report.publish(
        out, runs=runs, classes=data.classes, paths=data.query.paths, source=source, metadata=metadata,
        names=report.read_class_names(names_path) if names_path else {},
        n_train=np.bincount(data.y_train[draws[0]], minlength=n_classes),
        columns=_neighbour_columns(first, data, rows=draws[0]),
        title=f"{Path(str(data.train.metadata['model'])).name}: {n_classes} classes, k={k} ({metric})",
        header=_header({**source, **metadata}), note=NOTE, worst=worst,
        seconds={"read": round(read_s, 3), "knn": round(sum(run.info["knn_s"] for run in runs), 3)}, start=start)


def drop_duplicates(data: Labelled, *, threshold: float | None) -> dict[str, Any]:
    """Remove from `data.query` the rows with a near-copy among the train rows (in place); what was dropped."""
    from pipelines import dedup

    threshold = dedup.default_threshold() if threshold is None else dedup.check_threshold(
        threshold, key="duplicate_threshold")
    copied = dedup.near_copies(data.query.embeddings, data.train.embeddings, threshold=threshold)
    if copied.all():
        raise UserError(f"exclude_duplicates=true: every one of the {len(copied)} query images has a near-copy in "
                        f"the train split (cosine >= {threshold}); nothing is left to classify")
    keep = np.flatnonzero(~copied)
    q = data.query
    data.query = store.Split([q.paths[i] for i in keep], [q.labels[i] for i in keep], q.embeddings[keep], q.metadata)
    data.y_query = data.y_query[keep]
    log.info("dropped %d of %d query images with a near-copy in the train split (cosine >= %s)",
             int(copied.sum()), len(copied), threshold)
    return {"threshold": threshold, "dropped": int(copied.sum()), "of": len(copied),
            "examples": [q.paths[i] for i in np.flatnonzero(copied)[:5]]}


def output_location(embeddings_dir: Path, output_dir: str | Path | None) -> Path:
    """Where the outputs go: `output_dir`, or the sibling `<embeddings_dir>-validation`. A folder inside
    `embeddings_dir` is refused (UserError): readers of the embeddings (`**/*.parquet`) would take in
    predictions.parquet."""
    out = store.validation_dir(embeddings_dir) if output_dir in (None, "") else Path(output_dir)
    if store.is_inside(out.resolve(), embeddings_dir.resolve()):
        raise UserError(f"output_dir={output_dir}: lies inside embeddings_dir={embeddings_dir}, whose Parquet "
                        "readers would take predictions.parquet for embeddings; choose a folder outside it "
                        f"(the default, output_dir=null, is {store.validation_dir(embeddings_dir)})")
    return out


def _codes(labels: list[str], classes: list[str]) -> np.ndarray:
    """Class indices int64 [N] of `labels` in the sorted `classes`."""
    return np.searchsorted(np.asarray(classes), np.asarray(labels)).astype(np.int64)


def _run_episodes(data: Labelled, draws: list[np.ndarray], **knn_args: Any) -> tuple[list[report.Counts],
                                                                                      knn.Result]:
    """Classify the queries once per draw of train rows; each episode's counts and the first episode's result."""
    from pipelines import knn

    runs, first = [], None
    for i, rows in enumerate(draws):
        t0 = time.perf_counter()
        result = knn.classify(data.train.embeddings[rows], data.y_train[rows], data.query.embeddings, **knn_args)
        info = {"rechecked": result.neighbours.rechecked, "train_images": len(rows),
                "knn_s": round(time.perf_counter() - t0, 3)}
        runs.append(report.count(data.y_query, result.top(report.TOP), n_classes=knn_args["n_classes"], info=info))
        log.info("episode %d/%d: top-1 %.2f%%, %.1f s", i + 1, len(draws), 100 * runs[-1].top1, info["knn_s"])
        if first is None:
            first = result
    return runs, first


def _neighbour_columns(result: knn.Result, data: Labelled, *, rows: np.ndarray) -> dict[str, list]:
    """predictions.parquet's k-NN columns: the neighbours' train paths, labels and distances of each query.

    `rows` int [n]: the train rows the result's neighbour indices refer to (the episode's draw).
    """
    neighbours = rows[result.neighbours.indices]
    return {
        "neighbours": [list(row) for row in np.asarray(data.train.paths, dtype=object)[neighbours]],
        "neighbour_labels": [list(row) for row in np.asarray(data.train.labels, dtype=object)[neighbours]],
        "distances": list(result.neighbours.distances),
    }


def _image_root(dataset_root: str | Path | None, sample_path: str) -> str | None:
    """The dataset root when it holds the embedded files (the notebook shows images from it), else None."""
    if dataset_root is not None and (Path(dataset_root) / sample_path).exists():
        return str(Path(dataset_root).resolve())
    return None


NOTE = "({seconds[knn]:.1f} s k-NN, {seconds[total]:.1f} s in all)"  # the top-1 line's end, from the report


def _header(run: dict[str, Any]) -> list[str]:
    """The table's first lines: what was compared, with which model and settings, and how many images."""
    s, model, backend = run["settings"], run["model"], run["backend"]
    device = f" on {backend['device']}" if "device" in backend else ""
    available = f" of {run['num_train_available']}" if s["subsampled"] else ""
    dropped = run.get("duplicates_excluded")
    extra = [(f"excluded {dropped['dropped']} of {dropped['of']} {s['query_split']} images with a near-copy in "
              f"{s['train_split']} (cosine >= {dropped['threshold']})")] if dropped else []
    return [
        (f"{run['embeddings_dir']}: {model['model']} ({model['embedding_dim']}-d), "
         f"k={s['k']} {s['weights']} {s['metric']}, backend {backend['name']}{device}"),
        (f"classes {run['num_classes']}   {s['train_split']} {run['num_train']}{available}   "
         f"{s['query_split']} {run['num_query']}   episodes {s['episodes']}"),
        *extra,
    ]


def format_report(run: dict[str, Any], table: pd.DataFrame, *, rows: int = 10) -> str:
    """A saved run's table for the terminal (report.json and per_class.csv read back): as `main` prints it."""
    return report.format_table(run, table, header=_header(run), note=NOTE, rows=rows)
