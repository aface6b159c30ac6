"""`python -m pipelines.validate`: few-shot k-NN accuracy of stored embeddings (train split -> query split).

Reads the embed job's Parquet (never runs the model), votes with `pipelines.knn`, and writes to the sibling folder
`<embeddings_dir>-validation/` (outside the embeddings' Parquet dataset): report.json, per_class.csv,
predictions.parquet and per_class.png.
pandas, matplotlib and the k-NN backends (scikit-learn, torch) are imported where they are used, so that
`--cfg job` and bad settings answer in a moment.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipelines import store
from pipelines.config import CONF_DIR, UserError, clean_errors

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from pipelines import knn

log = logging.getLogger(__name__)

CLASS_NAMES_FILE = "LOC_synset_mapping.txt"
REPORT, PER_CLASS, PREDICTIONS, FIGURE = store.VALIDATION_FILES  # the store lists them as ours (overwrite)


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


def read_class_names(path: Path) -> dict[str, str]:
    """`LOC_synset_mapping.txt` lines 'n01440764 tench, Tinca tinca' -> {'n01440764': 'tench, Tinca tinca'}."""
    names = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            label, _, name = line.strip().partition(" ")
            if not name:
                raise UserError(f"{path}:{number}: expected '<label> <name>', got {line!r}")
            names[label] = name.strip()
    return names


def find_class_names(class_names: str | Path | None, search: list[Path]) -> Path | None:
    """The class-name file: `class_names` when given (must exist), else the first `search` folder holding one."""
    if class_names is not None:
        if not Path(class_names).is_file():
            raise UserError(f"class_names={class_names}: no such file")
        return Path(class_names)
    return next((d / CLASS_NAMES_FILE for d in search if (d / CLASS_NAMES_FILE).is_file()), None)


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
class Tally:
    """Counts over episodes: per-class top-1/top-5 hits int64 [C], confusions int64 [C, C] (true, predicted)."""

    n_classes: int
    top1: np.ndarray = field(init=False)
    top5: np.ndarray = field(init=False)
    confusion: np.ndarray = field(init=False)
    episodes: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.top1 = np.zeros(self.n_classes, np.int64)
        self.top5 = np.zeros(self.n_classes, np.int64)
        self.confusion = np.zeros((self.n_classes, self.n_classes), np.int64)

    def add(self, result: knn.Result, truth: np.ndarray, **info: Any) -> None:
        """Count one episode's predictions against the true int [Q] classes."""
        pred, top5 = result.predictions, result.top(5)
        hit1, hit5 = pred == truth, (top5 == truth[:, None]).any(axis=1)
        self.top1 += np.bincount(truth[hit1], minlength=self.n_classes)
        self.top5 += np.bincount(truth[hit5], minlength=self.n_classes)
        np.add.at(self.confusion, (truth, pred), 1)
        self.episodes.append({"episode": len(self.episodes), "top1": float(hit1.mean()), "top5": float(hit5.mean()),
                              "rechecked": result.neighbours.rechecked, **info})


def per_class_table(tally: Tally, classes: list[str], names: dict[str, str], *, query_counts: np.ndarray,
                    train_counts: np.ndarray) -> pd.DataFrame:
    """One row per class: counts, top-1/top-5 accuracy (mean over episodes), the class it is most taken for."""
    import pandas as pd

    runs = len(tally.episodes)
    wrong = tally.confusion.copy()
    np.fill_diagonal(wrong, 0)
    confused = wrong.argmax(axis=1)
    seen = query_counts * runs
    return pd.DataFrame({
        "label": classes,
        "name": [names.get(c, c) for c in classes],
        "n_train": train_counts,
        "n_query": query_counts,
        "top1": tally.top1 / seen,
        "top5": tally.top5 / seen,
        "confused_with": [classes[j] if wrong[i, j] else "" for i, j in enumerate(confused)],
        "confused_share": wrong[np.arange(len(classes)), confused] / seen,
    })


def plot_per_class(table: pd.DataFrame, *, worst: int, title: str) -> Figure:
    """Histogram of per-class top-1 accuracy and the `worst` classes as bars (no pyplot: renders with Agg)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    shown = table.sort_values(["top1", "label"]).head(worst)
    fig = Figure(figsize=(11, max(3.5, 0.25 * len(shown) + 1.2)), layout="constrained")
    hist, bars = fig.subplots(1, 2, width_ratios=[1, 1.3])
    hist.hist(table["top1"] * 100, bins=np.linspace(0, 100, 21), color="tab:blue", edgecolor="white")
    hist.axvline(table["top1"].mean() * 100, color="tab:red", linestyle="--", label="mean")
    hist.set(xlabel="top-1 accuracy of a class (%)", ylabel="classes", title="per-class top-1")
    hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    hist.legend()
    labels = [label if name == label else f"{name[:28]} ({label})"
              for label, name in zip(shown["label"], shown["name"], strict=True)]
    bars.barh(range(len(shown)), shown["top1"] * 100, color="tab:orange")
    bars.set_yticks(range(len(shown)), labels, fontsize=8)
    bars.invert_yaxis()
    bars.set(xlim=(0, 100), xlabel="top-1 accuracy (%)", title=f"the {len(shown)} worst classes")
    fig.suptitle(title)
    return fig


def predictions_frame(result: knn.Result, data: Labelled, *, rows: np.ndarray) -> pd.DataFrame:
    """One row per query: path, label, prediction, top-5 labels, the neighbours' train paths, labels, distances.

    `rows` int [n]: the train rows the result's neighbour indices refer to (the episode's draw).
    """
    import pandas as pd

    cls = np.asarray(data.classes, dtype=object)
    neighbours = rows[result.neighbours.indices]
    return pd.DataFrame({
        "path": data.query.paths,
        "label": data.query.labels,
        "prediction": cls[result.predictions],
        "top5": [list(row) for row in cls[result.top(5)]],
        "neighbours": [list(row) for row in np.asarray(data.train.paths, dtype=object)[neighbours]],
        "neighbour_labels": [list(row) for row in np.asarray(data.train.labels, dtype=object)[neighbours]],
        "distances": list(result.neighbours.distances),
    })


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


def run_validate(
    *,
    embeddings_dir: str | Path,
    train_split: str = "train",
    query_split: str = "valid",
    k: int = 10,
    weights: str = "distance",
    metric: str = "cosine",
    backend: knn.Backend | str = "sklearn",
    shots: int | None = 10,
    episodes: int = 1,
    seed: int = 0,
    class_names: str | Path | None = None,
    dataset_root: str | Path | None = None,
    output_dir: str | Path | None = None,
    worst: int = 20,
) -> dict[str, Any]:
    """k-NN of `query_split` against `train_split` in `embeddings_dir`; writes the outputs, returns the report.

    `output_dir`: None = `<embeddings_dir>-validation` (`store.validation_dir`); never inside `embeddings_dir`.
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
    read_s = time.perf_counter() - start
    n_classes = len(data.classes)
    draws = episode_draws(data.y_train, n_classes, shots=shots, episodes=episodes, seed=seed)
    tally, first = _run_episodes(data, draws, n_classes=n_classes, k=k, weights=weights, metric=metric,
                                 backend=backend)
    names_path = find_class_names(class_names, [embeddings_dir, *([Path(dataset_root)] if dataset_root else [])])
    table = per_class_table(tally, data.classes, read_class_names(names_path) if names_path else {},
                            query_counts=np.bincount(data.y_query, minlength=n_classes),
                            train_counts=np.bincount(data.y_train[draws[0]], minlength=n_classes))
    report = {
        "embeddings_dir": str(embeddings_dir),
        **_accuracy(tally),
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
        "per_episode": tally.episodes,
    }
    predictions = predictions_frame(first, data, rows=draws[0])
    _write(out, report, table, predictions, worst=worst, read_s=read_s, start=start)
    return report


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


def _run_episodes(data: Labelled, draws: list[np.ndarray], **knn_args: Any) -> tuple[Tally, knn.Result]:
    """Classify the queries once per draw of train rows; the tally and the first episode's result."""
    from pipelines import knn

    tally, first = Tally(knn_args["n_classes"]), None
    for i, rows in enumerate(draws):
        t0 = time.perf_counter()
        result = knn.classify(data.train.embeddings[rows], data.y_train[rows], data.query.embeddings, **knn_args)
        tally.add(result, data.y_query, train_images=len(rows), knn_s=round(time.perf_counter() - t0, 3))
        log.info("episode %d/%d: top-1 %.2f%%, %.1f s", i + 1, len(draws), 100 * tally.episodes[-1]["top1"],
                 tally.episodes[-1]["knn_s"])
        first = first or result
    return tally, first


def _accuracy(tally: Tally) -> dict[str, float]:
    """Mean and standard deviation (ddof=1; 0 for one episode) of top-1 and top-5 over the episodes."""
    out = {}
    for key in ("top1", "top5"):
        values = np.array([e[key] for e in tally.episodes])
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


def _image_root(dataset_root: str | Path | None, sample_path: str) -> str | None:
    """The dataset root when it holds the embedded files (the notebook shows images from it), else None."""
    if dataset_root is not None and (Path(dataset_root) / sample_path).exists():
        return str(Path(dataset_root).resolve())
    return None


def _write(out: Path, report: dict[str, Any], table: pd.DataFrame, predictions: pd.DataFrame, *, worst: int,
           read_s: float, start: float) -> None:
    """report.json (with the time taken), per_class.csv, predictions.parquet, per_class.png under `out`."""
    with store.writing(out, then="then rerun"):  # disk full, read-only, permissions: one line naming it
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / PER_CLASS, index=False)
        predictions.to_parquet(out / PREDICTIONS, index=False)
    model = report["model"]
    title = (f"{Path(str(model['model'])).name}: {report['num_classes']} classes, k={report['settings']['k']} "
             f"({report['settings']['metric']}), top-1 {100 * report['top1']:.2f}%")
    with store.writing(out, then="then rerun"):
        plot_per_class(table, worst=worst, title=title).savefig(out / FIGURE, dpi=110)
    knn_s = sum(e["knn_s"] for e in report["per_episode"])
    report["seconds"] = {"read": round(read_s, 3), "knn": round(knn_s, 3),
                         "total": round(time.perf_counter() - start, 3)}
    report["files"] = {"report": str(out / REPORT), "per_class": str(out / PER_CLASS),
                       "predictions": str(out / PREDICTIONS), "figure": str(out / FIGURE)}
    store.write_json(out / REPORT, report)


def format_report(report: dict[str, Any], table: pd.DataFrame, *, rows: int = 10) -> str:
    """A few lines for the terminal: the settings, top-1/top-5 and the worst classes."""
    s, model, backend = report["settings"], report["model"], report["backend"]
    runs = s["episodes"]
    device = f" on {backend['device']}" if "device" in backend else ""
    available = f" of {report['num_train_available']}" if s["subsampled"] else ""
    top1, top5 = (f"{100 * report[key]:.2f}%" + (f" ± {100 * report[key + '_std']:.2f}" if runs > 1 else "")
                  for key in ("top1", "top5"))
    lines = [
        (f"{report['embeddings_dir']}: {model['model']} ({model['embedding_dim']}-d), "
         f"k={s['k']} {s['weights']} {s['metric']}, backend {backend['name']}{device}"),
        (f"classes {report['num_classes']}   {s['train_split']} {report['num_train']}{available}   "
         f"{s['query_split']} {report['num_query']}   episodes {runs}"),
        (f"top-1 {top1}   top-5 {top5}   ({report['seconds']['knn']:.1f} s k-NN, "
         f"{report['seconds']['total']:.1f} s in all)"),
        "worst classes by top-1:",
        f"  {'class':<40}{'top-1':>8}{'top-5':>8}  most often taken for",
    ]
    for row in table.sort_values(["top1", "label"]).head(rows).itertuples():
        name = row.label if row.name == row.label else f"{row.label} {row.name}"
        taken = f"{row.confused_with} ({100 * row.confused_share:.0f}%)" if row.confused_with else ""
        lines.append(f"  {name[:40]:<40}{100 * row.top1:>7.1f}%{100 * row.top5:>7.1f}%  {taken}")
    lines.append(f"report, per-class table, predictions and figure in {Path(report['files']['report']).parent}/")
    return "\n".join(lines)


@hydra.main(config_path=CONF_DIR, config_name="validate", version_base="1.3")
@clean_errors(FileNotFoundError, PermissionError, ValueError)
def main(cfg: DictConfig) -> None:
    import pandas as pd

    root = None if OmegaConf.is_missing(cfg.dataset, "root") else cfg.dataset.root
    report = run_validate(
        embeddings_dir=cfg.embeddings_dir,
        train_split=cfg.train_split,
        query_split=cfg.query_split,
        k=cfg.k,
        weights=cfg.weights,
        metric=cfg.metric,
        backend=instantiate(cfg.knn),
        shots=cfg.shots,
        episodes=cfg.episodes,
        seed=cfg.seed,
        class_names=cfg.class_names,
        dataset_root=root,
        output_dir=cfg.output_dir,
        worst=cfg.worst,
    )
    print(format_report(report, pd.read_csv(report["files"]["per_class"], keep_default_na=False)))


if __name__ == "__main__":
    main()
