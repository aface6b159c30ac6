"""conf/: every primary config and every option of every config group composes and resolves."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from pipelines.config import CONF_DIR

CONF = Path(CONF_DIR)


def test_every_config_composes(compose_cfg):
    primaries = sorted(p.stem for p in CONF.glob("*.yaml"))
    groups = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in CONF.iterdir() if d.is_dir()}
    assert "embed" in primaries and {"dataset", "model"} <= groups.keys()
    covered = set()
    for primary in primaries:
        cfg = compose_cfg(primary)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        chosen = compose_cfg(primary, return_hydra_config=True).hydra.runtime.choices
        for group, options in groups.items():
            if group not in chosen:  # a group of another entry point (or a plain key of the same name)
                continue
            for option in options:
                composed = compose_cfg(primary, [f"{group}={option}"])
                OmegaConf.to_container(composed, resolve=True, throw_on_missing=False)
                covered.add((group, option))
    assert covered == {(g, o) for g, options in groups.items() for o in options}


def test_embed_defaults_are_the_real_model_on_the_sample(compose_cfg):
    cfg = compose_cfg("embed")
    assert cfg.model.name_or_path == "google/siglip-so400m-patch14-384"
    assert cfg.device == "auto" and cfg.dtype == "auto"
    assert Path(cfg.dataset.root).is_dir() and list(cfg.splits) == ["train", "valid"]
    tiny = compose_cfg("embed", ["model=tiny", "dataset=imagenet", "dataset.root=/data/in"])
    assert tiny.model.name_or_path == "tiny" and tiny.output_dir == "outputs/imagenet-tiny"


def test_multirun_goes_under_outputs_for_every_entry_point(compose_cfg):
    for primary in sorted(p.stem for p in CONF.glob("*.yaml")):
        hydra_cfg = compose_cfg(primary, return_hydra_config=True).hydra
        assert hydra_cfg.sweep.dir.startswith("outputs/multirun/"), primary  # Hydra writes multirun.yaml there
        assert hydra_cfg.run.dir == "." and hydra_cfg.output_subdir is None, primary
