"""`python -m pipelines.embed`: every image of a dataset's splits -> a SigLIP embedding in Parquet.

torch, transformers and the runners are imported inside the functions that run the job, so that
`--cfg job` and the settings checks answer in a moment.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipelines.config import CONF_DIR, clean_errors
from pipelines.hub import check_model
from pipelines.runners.job import run_job
from pipelines.runners.summary import format_summary

if TYPE_CHECKING:
    from pipelines.runners.split import Runner
    from pipelines.sources.files import FileSource

log = logging.getLogger(__name__)

# conf/embed.yaml's job settings, passed through by `main`; the file is their one source of defaults.
SETTINGS = ("device", "dtype", "batch_size", "compile", "num_workers", "rows_per_part", "overwrite", "progress",
            "max_image_pixels")


def defaults() -> dict[str, Any]:
    """conf/embed.yaml's job settings (its `shard.index` / `shard.count` as shard_index / shard_count)."""
    cfg = OmegaConf.load(Path(CONF_DIR) / "embed.yaml")
    return {**{key: cfg[key] for key in SETTINGS}, "shard_index": cfg.shard.index, "shard_count": cfg.shard.count}


def files_source(dataset: DictConfig) -> FileSource:
    """conf/dataset/files.yaml's settings -> the shard source they describe."""
    from pipelines.sources.files import FileSource

    plain = OmegaConf.to_container(dataset, resolve=True)
    return FileSource.build(data_files=plain["data_files"], storage_options=plain["storage_options"],
                            format=plain["format"], image_extensions=plain["image_extensions"],
                            image_column=plain["image_column"], label=plain["label"],
                            keep_columns=plain["keep_columns"], retries=plain["retries"])


def run_embed(*, root: str | Path | None, splits: list[str], output_dir: str | Path, model: str,
              revision: str | None = None, runner: Runner | None = None, source: FileSource | None = None,
              **settings: Any) -> dict[str, Any]:
    """Embed `root/<split>/<class>/*` for each split into `output_dir/split=<split>/`; returns the summary.

    `settings`: conf/embed.yaml's job settings (`SETTINGS`, shard_index, shard_count); a missing one takes that
    file's value. `runner`: a `pipelines.runners.split.Runner`, e.g. `pipelines.runners.ray.run` with its
    settings bound; None: conf/runner/local.yaml's. `max_image_pixels`: larger images are error records
    (checked from their header); None = no limit; "auto" = PIL's decompression-bomb threshold. Settings, the
    device and the output folder are checked before the dataset is listed or the model loaded; the job holds
    `output_dir`'s lock for its shard until it returns. An output directory in the layout before 0.2.0 is
    refused with the command that converts it (`pipelines.upgrade`).
    """
    return run_job(root=Path(root) if root is not None else None, splits=splits, output_dir=Path(output_dir),
                   model=model, revision=revision, runner=runner, source=source, **{**defaults(), **settings})


@hydra.main(config_path=CONF_DIR, config_name="embed", version_base="1.3")
@clean_errors(FileNotFoundError, PermissionError)  # and every UserError (WeightsUnavailableError is one)
def main(cfg: DictConfig) -> None:
    check_model(cfg.model.name_or_path, cfg.model.revision)  # a model not to be had: now, before torch imports
    source = files_source(cfg.dataset) if "data_files" in cfg.dataset else None
    summary = run_embed(
        root=cfg.dataset.root, splits=list(cfg.splits), output_dir=cfg.output_dir, model=cfg.model.name_or_path,
        revision=cfg.model.revision, runner=instantiate(cfg.runner, _convert_="all"), shard_index=cfg.shard.index,
        shard_count=cfg.shard.count, source=source,
        **{key: OmegaConf.to_object(cfg[key]) if OmegaConf.is_config(cfg[key]) else cfg[key] for key in SETTINGS},
    )
    print(format_summary(summary))
    log.debug("summary %s", json.dumps(summary))


if __name__ == "__main__":
    main()
