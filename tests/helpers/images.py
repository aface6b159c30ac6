"""Image inputs the tests share: the repo's sample folder, real photos, and encoding a PIL image to bytes."""

from __future__ import annotations

import io
from pathlib import Path

import sklearn.datasets
from PIL import Image

from pipelines.config import REPO_ROOT

SAMPLE = REPO_ROOT / "data" / "sample"
PHOTOS = Path(sklearn.datasets.__file__).parent / "images"  # china.jpg, flower.jpg: real colour photos


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()
