"""`python -m pipelines.explore embeddings_dir=DIR`: the web app over an embed output (conf/explore.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from pipelines.config import CONF_DIR, clean_errors
from pipelines.errors import UserError
from pipelines.explore.app import Limits
from pipelines.explore.server import build_explorer, check_host, serve


def limits(cfg: DictConfig) -> Limits:
    """conf/explore.yaml's `limits` block, each a whole number of at least 1 (UserError naming the key)."""
    values = OmegaConf.to_container(cfg.limits, resolve=True)
    for key, value in values.items():
        if key != "max_image_pixels" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"limits.{key}={value!r}: expected a whole number of at least 1")
    return Limits(**values)


@hydra.main(config_path=CONF_DIR, config_name="explore", version_base="1.3")
@clean_errors(FileNotFoundError, PermissionError)
def main(cfg: DictConfig) -> None:
    port = cfg.port
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise UserError(f"port={port!r}: expected a TCP port, 0 to 65535")
    host = check_host(str(cfg.host))
    splits = None if cfg.splits in (None, "", []) else (
        [str(cfg.splits)] if isinstance(cfg.splits, str) else [str(s) for s in cfg.splits])
    explorer = build_explorer(
        embeddings_dir=cfg.embeddings_dir, splits=splits, dataset_root_dir=cfg.dataset_root,
        allowed_roots=[str(p) for p in cfg.allowed_roots or []], name_or_path=cfg.model.name_or_path,
        revision=cfg.model.revision, device=cfg.device, dtype=cfg.dtype, text_server=cfg.text_server,
        index=cfg.index, index_dir=cfg.index_dir, ann_options=OmegaConf.to_container(cfg.ann, resolve=True),
        limits=limits(cfg), storage_options=OmegaConf.to_container(cfg.storage_options, resolve=True))
    serve(explorer, host=host, port=port)


if __name__ == "__main__":
    main()
