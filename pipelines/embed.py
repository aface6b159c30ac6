"""`python -m pipelines.embed`: every image of a dataset's splits -> a SigLIP embedding in Parquet."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from pipelines import store
from pipelines.config import CONF_DIR, UserError, clean_errors
from pipelines.data import list_split, take_shard
from pipelines.runner import SplitStats, default_workers, embed_split
from pipelines.siglip import WeightsUnavailableError, load_encoder

log = logging.getLogger(__name__)


def run_embed(
    *,
    root: str | Path,
    splits: list[str],
    output_dir: str | Path,
    model: str,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 64,
    num_workers: int | str = "auto",
    rows_per_part: int = 4096,
    shard_index: int = 0,
    shard_count: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    runner: Callable[..., SplitStats] = embed_split,
    compile: bool = False,
) -> dict[str, Any]:
    """Embed `root/<split>/<class>/*` for each split into `output_dir/<split>/`; returns the summary.

    `runner` embeds one split: the local `pipelines.runner.embed_split` (default) or another with the same
    keyword arguments, e.g. `pipelines.ray_runner.embed_split` with its settings bound. `compile`:
    torch.compile the model for `batch_size` (the last, smaller batch is padded, so nothing recompiles).
    """
    root, output_dir = Path(root), Path(output_dir)
    if overwrite and shard_count > 1:
        raise UserError("overwrite=true with shard.count > 1 would let shards delete each other's work; "
                        f"remove {output_dir} once, then start the shards")
    listings = {split: take_shard(list_split(root, split), index=shard_index, count=shard_count) for split in splits}
    workers = default_workers() if num_workers == "auto" else int(num_workers)
    encoder = load_encoder(model, device=device, dtype=dtype, revision=revision)
    if compile:
        encoder.compile(batch_size=batch_size)
    # The root is recorded for readers (validate, notebooks) that look for the images; it is not an identity key.
    store.prepare_output(output_dir, {**encoder.metadata(), "dataset_root": str(root.resolve())}, overwrite=overwrite)
    prefix = f"shard{shard_index}of{shard_count}"
    start = time.perf_counter()
    results: list[SplitStats] = []
    for split, records in listings.items():
        results.append(runner(
            encoder=encoder, root=root, split=split, records=records, output_dir=output_dir,
            batch_size=batch_size, num_workers=workers, rows_per_part=rows_per_part, prefix=prefix,
            progress=progress,
        ))
    summary = _summary(results, time.perf_counter() - start, encoder.metadata(), output_dir,
                       dataset_root=str(root.resolve()), splits=list(splits),
                       runner=getattr(runner, "func", runner).__module__, shard_index=shard_index,
                       shard_count=shard_count, num_workers=workers, batch_size=batch_size, compile=compile)
    name = "summary.json" if shard_count == 1 else f"summary-{prefix}.json"
    store.write_json(output_dir / name, summary)
    return summary


def _summary(results: list[SplitStats], wall_s: float, metadata: dict[str, Any], output_dir: Path,
             **settings: Any) -> dict[str, Any]:
    embedded = sum(r.embedded for r in results)
    return {
        "output_dir": str(output_dir),
        "model": metadata,
        "settings": settings,
        "images": embedded,
        "errors": sum(r.errors for r in results),
        "already_done": sum(r.already_done for r in results),
        "wall_s": round(wall_s, 3),
        "images_per_s": round(embedded / wall_s, 2) if wall_s > 0 else 0.0,
        "read_s": round(sum(r.read_s for r in results), 3),
        "model_s": round(sum(r.model_s for r in results), 3),
        "write_s": round(sum(r.write_s for r in results), 3),
        "splits": [r.to_dict() for r in results],
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = [f"{'split':<10}{'listed':>8}{'done before':>13}{'embedded':>10}{'errors':>8}{'img/s':>10}"]
    for s in summary["splits"]:
        lines.append(f"{s['split']:<10}{s['listed']:>8}{s['already_done']:>13}{s['embedded']:>10}"
                     f"{s['errors']:>8}{s['images_per_s']:>10.1f}")
    lines.append(
        f"{summary['images']} images embedded, {summary['errors']} errors, {summary['images_per_s']:.1f} img/s "
        f"in {summary['wall_s']:.1f} s (waiting on reads {summary['read_s']:.1f} s, model {summary['model_s']:.1f} s, "
        f"writing {summary['write_s']:.1f} s in background) -> {summary['output_dir']}"
    )
    if summary["errors"]:
        lines.append(f"undecodable files are listed in {summary['output_dir']}/<split>/{store.ERRORS}")
    return "\n".join(lines)


@hydra.main(config_path=CONF_DIR, config_name="embed", version_base="1.3")
@clean_errors(WeightsUnavailableError, store.StoreMismatchError, FileNotFoundError, ValueError)
def main(cfg: DictConfig) -> None:
    summary = run_embed(
        root=cfg.dataset.root,
        splits=list(cfg.splits),
        output_dir=cfg.output_dir,
        model=cfg.model.name_or_path,
        revision=cfg.model.revision,
        device=cfg.device,
        dtype=cfg.dtype,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        rows_per_part=cfg.rows_per_part,
        shard_index=cfg.shard.index,
        shard_count=cfg.shard.count,
        overwrite=cfg.overwrite,
        progress=cfg.progress,
        runner=instantiate(cfg.runner, _convert_="all"),
        compile=cfg.compile,
    )
    print(format_summary(summary))
    log.debug("summary %s", json.dumps(summary))


if __name__ == "__main__":
    main()
