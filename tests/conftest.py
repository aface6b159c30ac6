"""Shared fixtures: a tiny SigLIP saved as a real checkpoint, real photos in several formats, image folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers.images import PHOTOS, SAMPLE, encode
from hydra import compose, initialize_config_dir
from PIL import Image

from pipelines.config import CONF_DIR
from pipelines.presets import save_tiny, save_tiny_siglip2


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A full SiglipModel checkpoint (vision + text towers, SentencePiece tokenizer), as the hub ships one, with
    random weights and a tokenizer trained on generated captions."""
    return save_tiny(tmp_path_factory.mktemp("tiny-full"), full=True)


@pytest.fixture(scope="session")
def tiny_vision_checkpoint(tmp_path_factory) -> Path:
    """A vision-only SiglipVisionModel checkpoint (no tokenizer) with the same weights as the `tiny` preset."""
    return save_tiny(tmp_path_factory.mktemp("tiny-vision"), full=False)


@pytest.fixture(scope="session")
def naflex_checkpoint(tmp_path_factory) -> Path:
    """A tiny SigLIP 2 NaFlex checkpoint (Siglip2Model, Siglip2ImageProcessor's config, a Gemma-style tokenizer)."""
    return save_tiny_siglip2(tmp_path_factory.mktemp("tiny-naflex"), naflex=True)


@pytest.fixture(scope="session")
def siglip2_fixres_checkpoint(tmp_path_factory) -> Path:
    """A tiny SigLIP 2 fixed-resolution checkpoint: a SiglipModel at 384 px with a Gemma-style tokenizer."""
    return save_tiny_siglip2(tmp_path_factory.mktemp("tiny-siglip2-fixres"), naflex=False)


@pytest.fixture(scope="session")
def photo_bytes() -> dict[str, bytes]:
    """Real photos as ImageNet has them: RGB JPEG, PNG, grayscale JPEG, CMYK JPEG, and a PNG named .JPEG."""
    china = Image.open(PHOTOS / "china.jpg")
    flower = Image.open(PHOTOS / "flower.jpg")
    return {
        "rgb.jpg": (PHOTOS / "china.jpg").read_bytes(),
        "flower.png": encode(flower, "PNG"),
        "gray.jpg": encode(china.convert("L"), "JPEG", quality=90),
        "cmyk.jpg": encode(flower.convert("CMYK"), "JPEG", quality=90),
        "png_named.JPEG": encode(china.resize((500, 375)), "PNG"),
        "rgba.png": encode(flower.convert("RGBA"), "PNG"),
        "photo.bmp": encode(china.resize((320, 240)), "BMP"),
    }


@pytest.fixture()
def image_root(tmp_path, photo_bytes) -> Path:
    """`train/` and `valid/` of two classes each: the sample's PNGs plus the photos above."""
    root = tmp_path / "images"
    for split, n in (("train", 3), ("valid", 2)):
        for label in ("bag", "trouser"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for src in sorted((SAMPLE / split / label).iterdir())[:n]:
                shutil.copy(src, folder / src.name)
    for i, (name, data) in enumerate(sorted(photo_bytes.items())):
        (root / ("train" if i % 2 else "valid") / "bag" / name).write_bytes(data)
    return root


@pytest.fixture()
def compose_cfg():
    """Compose a config from conf/ with overrides, as the entry points see it."""

    def _compose(config_name: str, overrides: list[str] | None = None, return_hydra_config: bool = False):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides or [],
                           return_hydra_config=return_hydra_config)

    return _compose
