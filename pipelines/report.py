"""The report family of a classification of a query split: the counting, the files written, the printed table.

Nothing here knows how the predictions were made (k-NN votes in `pipelines.validate`, or any other classifier of
stored embeddings): arrays in, files out. A class is an int index in [0, C) into the sorted list `classes`.

- `rank(scores, n)`: float [Q, C] per-class scores -> int64 [Q, min(n, C)] classes, best first, ties to the
  lowest index (as `argmax`).
- `count(truth, ranked, n_classes=C, info={...})` -> `Counts` of one run (an episode) over the same Q queries:
  top-1 / top-5 accuracy (`sklearn.metrics.top_k_accuracy_score`), the confusion matrix of the top-1 prediction
  (`sklearn.metrics.confusion_matrix`) and per-class top-5 hits; `info` is kept for the run's row in report.json.
- `publish(out, runs=..., classes=..., names=..., paths=..., source=..., metadata=..., title=..., header=...)`
  writes into `out`, through `pipelines.store` (one-line errors on a disk or permission failure):
  - `report.json`: `{**source, top1, top1_std, top5, top5_std, **metadata, per_episode, seconds, files}`; the
    accuracies are means over the runs (std ddof=1; 0 for one run); `per_episode` holds one row per run
    (`episode`, `top1`, `top5`, then the run's `info`); `seconds` is the caller's `seconds` plus `total` (since
    `start`, taken when the files are written); `files` the four paths;
  - `per_class.csv`: label, name, n_train (only when `n_train` is given), n_query, top1, top5, confused_with,
    confused_share (accuracies over all runs);
  - `predictions.parquet`: path, label, prediction, top5 of the first run's queries, then the caller's `columns`;
  - `per_class.png`: the histogram of per-class top-1 and the `worst` classes, titled `title`, top-1 appended;
  and returns the report (as written) and the printed table (`format_table`).
- `format_table(report, table, header=[...], note=...)`: the table text, from a run in memory or one read back
  from disk (a notebook): the `header` lines, the top-1 / top-5 line (`note`, a `str.format_map` template of the
  report such as "({seconds[total]:.1f} s in all)", appended), the worst classes, and where the files are.
- `read_class_names` / `find_class_names`: the `LOC_synset_mapping.txt` that gives a label its readable name.

numpy only at import; scikit-learn, pandas and matplotlib are imported where they are used (an entry point
importing this module still answers `--cfg job` in a moment).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines import store
from pipelines.errors import UserError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

CLASS_NAMES_FILE = "LOC_synset_mapping.txt"
REPORT, PER_CLASS, PREDICTIONS, FIGURE = store.VALIDATION_FILES  # the store lists them as ours (overwrite)
TOP = 5  # the second accuracy reported, top-5, and the predictions kept per query


def rank(scores: np.ndarray, n: int = TOP) -> np.ndarray:
    """float [Q, C] -> int64 [Q, min(n, C)]: the classes with the largest scores, best first, ties to the lowest."""
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :n]


@dataclass
class Counts:
    """One run over Q queries: true int64 [Q], ranked int64 [Q, n], confusion int64 [C, C] (true, top-1
    predicted), top-5 hits int64 [C] per true class, the accuracies, and what the caller records of the run."""

    truth: np.ndarray
    ranked: np.ndarray
    confusion: np.ndarray
    top5_hits: np.ndarray
    top1: float
    top5: float
    info: dict[str, Any] = field(default_factory=dict)


def count(truth: np.ndarray, ranked: np.ndarray, *, n_classes: int, info: dict[str, Any] | None = None) -> Counts:
    """Count one run: true int [Q] classes against ranked int [Q, n] predictions (best first, n >= min(5, C)).

    Hits are read off the ranking itself (the caller's tie order holds); the confusion matrix is sklearn's.
    """
    from sklearn.metrics import confusion_matrix

    truth, ranked = np.asarray(truth, dtype=np.int64), np.asarray(ranked, dtype=np.int64)
    hit1 = ranked[:, 0] == truth
    hit5 = (ranked[:, :TOP] == truth[:, None]).any(axis=1)
    padded = np.arange(max(n_classes, 2))  # sklearn warns about a 1 x 1 matrix, even one asked for
    confusion = confusion_matrix(truth, ranked[:, 0], labels=padded)[:n_classes, :n_classes].astype(np.int64)
    return Counts(truth, ranked, confusion, np.bincount(truth[hit5], minlength=n_classes).astype(np.int64),
                  float(hit1.mean()), float(hit5.mean()), dict(info or {}))


def accuracy(runs: list[Counts]) -> dict[str, float]:
    """Mean and standard deviation (ddof=1; 0 for one run) of top-1 and top-5 over the runs."""
    out = {}
    for key in ("top1", "top5"):
        values = np.array([getattr(run, key) for run in runs])
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


def per_class_table(runs: list[Counts], classes: list[str], names: dict[str, str], *,
                    n_train: np.ndarray | None = None) -> pd.DataFrame:
    """One row per class: counts, top-1/top-5 accuracy over the runs, the class it is most often taken for."""
    import pandas as pd

    confusion = sum(run.confusion for run in runs)
    n_query = confusion.sum(axis=1) // len(runs)  # every run classifies the same queries
    seen = n_query * len(runs)
    wrong = confusion.copy()
    np.fill_diagonal(wrong, 0)
    confused = wrong.argmax(axis=1)
    return pd.DataFrame({
        "label": classes,
        "name": [names.get(c, c) for c in classes],
        **({"n_train": n_train} if n_train is not None else {}),
        "n_query": n_query,
        "top1": np.diagonal(confusion) / seen,
        "top5": sum(run.top5_hits for run in runs) / seen,
        "confused_with": [classes[j] if wrong[i, j] else "" for i, j in enumerate(confused)],
        "confused_share": wrong[np.arange(len(classes)), confused] / seen,
    })


def predictions_frame(run: Counts, classes: list[str], paths: list[str], **columns: Any) -> pd.DataFrame:
    """One row per query: path, label, prediction, top-5 labels, then `columns` (one value per query each)."""
    import pandas as pd

    cls = np.asarray(classes, dtype=object)
    return pd.DataFrame({
        "path": paths,
        "label": cls[run.truth],
        "prediction": cls[run.ranked[:, 0]],
        "top5": [list(row) for row in cls[run.ranked[:, :TOP]]],
        **columns,
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


def publish(out: Path, *, runs: list[Counts], classes: list[str], names: dict[str, str], paths: list[str],
            source: dict[str, Any], metadata: dict[str, Any], title: str, header: list[str], note: str = "",
            n_train: np.ndarray | None = None, columns: dict[str, Any] | None = None,
            seconds: dict[str, float] | None = None, start: float | None = None,
            worst: int) -> tuple[dict[str, Any], str]:
    """Write report.json, per_class.csv, predictions.parquet and per_class.png under `out` (see the module
    docstring for what each holds); the report as written and the printed table."""
    report = {**source, **accuracy(runs), **metadata,
              "per_episode": [{"episode": i, "top1": run.top1, "top5": run.top5, **run.info}
                              for i, run in enumerate(runs)]}
    table = per_class_table(runs, classes, names, n_train=n_train)
    with store.writing(out, then="then rerun"):  # disk full, read-only, permissions: one line naming it
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / PER_CLASS, index=False)
        predictions_frame(runs[0], classes, paths, **(columns or {})).to_parquet(out / PREDICTIONS, index=False)
    with store.writing(out, then="then rerun"):
        plot_per_class(table, worst=worst, title=f"{title}, top-1 {100 * report['top1']:.2f}%").savefig(
            out / FIGURE, dpi=110)
    if seconds is not None:
        total = {"total": round(time.perf_counter() - start, 3)} if start is not None else {}
        report["seconds"] = {**seconds, **total}
    report["files"] = {"report": str(out / REPORT), "per_class": str(out / PER_CLASS),
                       "predictions": str(out / PREDICTIONS), "figure": str(out / FIGURE)}
    store.write_json(out / REPORT, report)
    return report, format_table(report, table, header=header, note=note)


def format_table(report: dict[str, Any], table: pd.DataFrame, *, header: list[str], note: str = "",
                 rows: int = 10) -> str:
    """A few lines for the terminal: `header`, top-1/top-5 (± std over several runs), the worst classes."""
    runs = len(report["per_episode"])
    top1, top5 = (f"{100 * report[key]:.2f}%" + (f" ± {100 * report[key + '_std']:.2f}" if runs > 1 else "")
                  for key in ("top1", "top5"))
    lines = [
        *header,
        f"top-1 {top1}   top-5 {top5}" + (f"   {note.format_map(report)}" if note else ""),
        "worst classes by top-1:",
        f"  {'class':<40}{'top-1':>8}{'top-5':>8}  most often taken for",
    ]
    for row in table.sort_values(["top1", "label"]).head(rows).itertuples():
        name = row.label if row.name == row.label else f"{row.label} {row.name}"
        taken = f"{row.confused_with} ({100 * row.confused_share:.0f}%)" if row.confused_with else ""
        lines.append(f"  {name[:40]:<40}{100 * row.top1:>7.1f}%{100 * row.top5:>7.1f}%  {taken}")
    lines.append(f"report, per-class table, predictions and figure in {Path(report['files']['report']).parent}/")
    return "\n".join(lines)


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
    if class_names not in (None, ""):
        if not Path(class_names).is_file():
            raise UserError(f"class_names={class_names}: no such file")
        return Path(class_names)
    return next((d / CLASS_NAMES_FILE for d in search if (d / CLASS_NAMES_FILE).is_file()), None)
