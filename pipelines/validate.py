"""`python -m pipelines.validate`: few-shot k-NN accuracy of stored embeddings (train split -> query split).

config -> `pipelines.fewshot.evaluate` (the splits read and checked, the episodes' draws, `pipelines.knn`,
`pipelines.report`) -> the printed table. Writes to the sibling folder `<embeddings_dir>-validation/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipelines.config import CONF_DIR, clean_errors
from pipelines.fewshot import evaluate


def defaults() -> dict[str, Any]:
    """conf/validate.yaml's settings (its `knn` group's default as `backend`), the one source of defaults."""
    cfg = OmegaConf.load(Path(CONF_DIR) / "validate.yaml")
    backend = next(item["knn"] for item in cfg.defaults if isinstance(item, DictConfig) and "knn" in item)
    settings = {key: cfg[key] for key in cfg if key not in ("defaults", "embeddings_dir")}
    return {**settings, "backend": backend, "dataset_root": None}


def run_validate(**settings: Any) -> dict[str, Any]:
    """k-NN of `query_split` against `train_split` in `embeddings_dir` (`evaluate`); writes the outputs, returns
    the report. A setting not given takes conf/validate.yaml's value (`defaults`)."""
    return evaluate(**{**defaults(), **settings})[0]


@hydra.main(config_path=CONF_DIR, config_name="validate", version_base="1.3")
@clean_errors(FileNotFoundError, PermissionError)
def main(cfg: DictConfig) -> None:
    settings = {key: cfg[key] for key in cfg if key not in ("dataset", "model", "knn")}
    root = None if OmegaConf.is_missing(cfg.dataset, "root") else cfg.dataset.root
    _, table = evaluate(**settings, backend=instantiate(cfg.knn), dataset_root=root)
    print(table)


if __name__ == "__main__":
    main()
