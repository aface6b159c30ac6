"""pipelines/bench/jpegs.py: the generated folder is ImageNet-like, varied, and reused while its settings hold."""

from __future__ import annotations

from PIL import Image

from pipelines.bench.jpegs import make_jpegs
from pipelines.data import list_split


def test_make_jpegs_are_imagenet_like_and_reused(tmp_path):
    folder = make_jpegs(tmp_path / "jpegs", count=12, size=(500, 375), quality=90, classes=3)
    records = list_split(folder, "train")
    assert len(records) == 12 and {r.label for r in records} == {"class000", "class001", "class002"}
    sizes = []
    for record in records:
        with Image.open(folder / record.path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            sizes.append(image.size)
    assert all(max(s) == 500 and 330 <= min(s) <= 375 for s in sizes)
    assert any(w < h for w, h in sizes) and any(w > h for w, h in sizes)  # portrait and landscape
    first = [(folder / r.path).read_bytes() for r in records]
    assert len(set(first)) == 12  # all different
    mtimes = [(folder / r.path).stat().st_mtime_ns for r in records]
    make_jpegs(folder, count=12, size=(500, 375), quality=90, classes=3)
    assert [(folder / r.path).stat().st_mtime_ns for r in records] == mtimes  # same settings: reused
    make_jpegs(folder, count=12, size=(500, 375), quality=60, classes=3)
    assert sum((folder / r.path).stat().st_size for r in records) < sum(len(d) for d in first)
