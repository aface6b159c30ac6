"""The explore app's report pages: what `pipelines.validate`, `pipelines.zeroshot` and `pipelines.dedup` wrote beside
the embeddings (`<embeddings_dir>-validation/`, `-zeroshot/`, `-duplicates/`), read once and served as JSON."""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines import dedup, store

log = logging.getLogger(__name__)

KINDS = {"validation": store.VALIDATION_SUFFIX, "zeroshot": "-zeroshot"}


def _plain(value: Any) -> Any:
    """numpy / pandas values -> JSON values (NaN -> None, arrays -> lists)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


class Reports:
    """The classification reports and the duplicate pairs found beside `embeddings_dir` (None where absent)."""

    def __init__(self, embeddings_dir: str | Path) -> None:
        self.folders = {kind: store.sibling_dir(embeddings_dir, suffix) for kind, suffix in KINDS.items()}
        self.folders = {k: f for k, f in self.folders.items() if (f / "report.json").is_file()}
        pairs = dedup.duplicates_dir(embeddings_dir) / dedup.PAIRS
        self.pairs_path = pairs if pairs.is_file() else None
        self._cache: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        log.info("reports: %s; duplicates: %s", ", ".join(self.folders) or "none", self.pairs_path or "none")

    def available(self) -> dict[str, Any]:
        """Which pages exist: {"validation": {...summary}, "zeroshot": ..., "duplicates": {...}}."""
        out: dict[str, Any] = {}
        for kind in self.folders:
            report = self._load(kind, "report")
            out[kind] = {"top1": report.get("top1"), "top5": report.get("top5"),
                         "classes": report.get("num_classes"), "queries": report.get("num_query"),
                         "settings": report.get("settings", {}), "excluded": report.get("duplicates_excluded")}
        if self.pairs_path is not None:
            summary_file = self.pairs_path.parent / dedup.SUMMARY
            summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
            out["duplicates"] = {k: summary.get(k) for k in ("pairs", "rows_involved", "threshold", "leakage",
                                                               "within_split_pairs")}
        return out

    def _load(self, kind: str, what: str) -> Any:
        """report.json (dict), per_class.csv or predictions.parquet (DataFrames) of a kind, read once."""
        with self._lock:
            key = (kind, what)
            if key not in self._cache:
                folder = self.folders[kind]
                if what == "report":
                    self._cache[key] = json.loads((folder / "report.json").read_text())
                elif what == "per_class":
                    self._cache[key] = pd.read_csv(folder / "per_class.csv", keep_default_na=False)
                else:
                    self._cache[key] = pd.read_parquet(folder / "predictions.parquet")
            return self._cache[key]

    def per_class(self, kind: str) -> dict[str, Any]:
        """The per-class table as a list of rows, with the report's summary."""
        table = self._load(kind, "per_class")
        rows = [{k: _plain(v) for k, v in row.items()} for row in table.to_dict(orient="records")]
        return {"kind": kind, "summary": self.available()[kind], "classes": rows}

    def misclassified(self, kind: str, label: str, *, limit: int) -> dict[str, Any] | None:
        """A class's wrongly predicted queries (at most `limit`): path, prediction, top-5 and, for validation, the
        k neighbours that voted (path, label, distance); None for a class the report does not hold."""
        predictions = self._load(kind, "predictions")
        mine = predictions[predictions["label"] == label]
        if mine.empty:
            return None
        wrong = mine[mine["prediction"] != label]
        extra = [c for c in ("top5", "probability", "top5_probabilities", "neighbours", "neighbour_labels",
                             "distances") if c in wrong.columns]
        items = []
        for row in wrong.head(limit).itertuples(index=False):
            item = {"path": row.path, "label": row.label, "prediction": row.prediction}
            item.update({c: _plain(getattr(row, c)) for c in extra})
            if "neighbours" in item:
                item["neighbours"] = [{"path": p, "label": lab, "distance": d} for p, lab, d in
                                      zip(item.pop("neighbours"), item.pop("neighbour_labels"), item.pop("distances"),
                                          strict=True)]
            items.append(item)
        return {"kind": kind, "label": label, "queries": len(mine), "wrong": len(wrong), "shown": items}

    def duplicates(self, *, offset: int, limit: int, cross: bool) -> dict[str, Any]:
        """A page of the near-duplicate pairs, highest score first; `cross`: only pairs across splits."""
        pairs = self._pairs()
        if cross:
            pairs = pairs[pairs["split_a"] != pairs["split_b"]]
        page = pairs.iloc[offset:offset + limit]
        return {"total": len(pairs), "offset": offset,
                "pairs": [{k: _plain(v) for k, v in row.items()} for row in page.to_dict(orient="records")]}

    def _pairs(self) -> pd.DataFrame:
        with self._lock:
            if ("duplicates", "pairs") not in self._cache:
                self._cache[("duplicates", "pairs")] = pd.read_parquet(self.pairs_path)
            return self._cache[("duplicates", "pairs")]
