"""`python -m pipelines.bench`: where the embed job's time goes, measured side by side in one run.

(a) preprocess: decode + preprocess on one core, ours vs transformers' `SiglipImageProcessor`, outputs compared;
(b) model: the encoder alone on random uint8 batches for each dtype x batch size x compile setting, with the
    FLOPs per image counted from the model and, on CUDA, the MFU;
(c) embed: the embed job (DataLoader -> encoder -> Parquet) on a generated folder of ImageNet-like JPEGs, next
    to the data path alone (the same DataLoader, no model) and the bound min((a) x workers, (b));
(d) writer: the Parquet writer alone.
Prints a report and writes the figures as JSON after each part, so a run cut short keeps what it measured.
Settings: conf/bench.yaml.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from pipelines.bench.report import format_report
from pipelines.bench.run import bench_options, run_bench
from pipelines.config import CONF_DIR, clean_errors
from pipelines.siglip import WeightsUnavailableError


@hydra.main(config_path=CONF_DIR, config_name="bench", version_base="1.3")
@clean_errors(WeightsUnavailableError, FileNotFoundError)
def main(cfg: DictConfig) -> None:
    results = run_bench(**bench_options(OmegaConf.to_container(cfg, resolve=True)),
                        command=" ".join(["python -m pipelines.bench", *sys.argv[1:]]))
    print(format_report(results))
    print(f"figures: {cfg.output}")


if __name__ == "__main__":
    main()
