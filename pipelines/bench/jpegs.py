"""A generated folder of ImageNet-like JPEGs: random crops of real photos, reused while its settings hold."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines import store
from pipelines.bench import SPLIT

PHOTOS = ("china.jpg", "flower.jpg")  # scikit-learn's sample photos: real content for the generated JPEGs


def make_jpegs(folder: Path, *, count: int, size: tuple[int, int], quality: int, classes: int = 10, seed: int = 0,
               processes: int = 1) -> Path:
    """`count` JPEGs of about `size` (width, height) under `folder/train/<class>/`; returns `folder`.

    Random crops of real photos, a quarter of them portrait, heights jittered as ImageNet's are; a folder
    already made with the same settings is reused.
    """
    settings = {"count": count, "size": list(size), "quality": quality, "classes": classes, "seed": seed}
    marker = folder / "jpegs.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for label in range(classes):
        (folder / SPLIT / f"class{label:03d}").mkdir(parents=True)
    jobs = [(folder / SPLIT / f"class{i % classes:03d}" / f"image-{i:06d}.jpg", i, tuple(size), quality, seed)
            for i in range(count)]
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write_jpeg, jobs, chunksize=max(1, count // (4 * processes))))
    else:
        for job in jobs:
            _write_jpeg(job)
    store.write_json(marker, settings)
    return folder


def _write_jpeg(job: tuple[Path, int, tuple[int, int], int, int]) -> None:
    path, index, (width, height), quality, seed = job
    rng = np.random.default_rng([seed, index])
    photo = _photo(PHOTOS[index % len(PHOTOS)])
    height = round(height * rng.uniform(0.88, 1.0))
    if rng.random() < 0.25:
        width, height = height, width
    # The largest crop of the photo's with the target's aspect, scaled down at random, placed at random.
    fit = min(photo.width / width, photo.height / height) * rng.uniform(0.5, 1.0)
    box_w, box_h = width * fit, height * fit
    x, y = rng.uniform(0, photo.width - box_w), rng.uniform(0, photo.height - box_h)
    image = photo.resize((width, height), Image.Resampling.BICUBIC, box=(x, y, x + box_w, y + box_h))
    pixels = np.asarray(image, dtype=np.float32) * rng.uniform(0.8, 1.2, size=3)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=quality)


_PHOTOS: dict[str, Image.Image] = {}


def _photo(name: str) -> Image.Image:
    if name not in _PHOTOS:
        import sklearn.datasets

        _PHOTOS[name] = Image.open(Path(sklearn.datasets.__file__).parent / "images" / name).convert("RGB")
    return _PHOTOS[name]
