"""Build data/sample from Fashion-MNIST's train split (Debian package dataset-fashion-mnist, MIT licence).

    apt-get install dataset-fashion-mnist && python data/make_sample.py

Takes, for each of the 10 classes, the first 30 images of the train split in file order: the first 10 go to
train/<class>/, the next 20 to valid/<class>/, as 28x28 grayscale PNGs named by their index in the split.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) -> uint8 array with the file's shape."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "sample")
    parser.add_argument("--train", type=int, default=10)
    parser.add_argument("--valid", type=int, default=20)
    args = parser.parse_args()
    images = read_idx(args.source / "train-images-idx3-ubyte.gz")
    labels = read_idx(args.source / "train-labels-idx1-ubyte.gz")
    for split in ("train", "valid"):
        shutil.rmtree(args.out / split, ignore_errors=True)
    for class_id, name in enumerate(CLASSES):
        indices = np.flatnonzero(labels == class_id)[: args.train + args.valid]
        for n, index in enumerate(indices):
            split = "train" if n < args.train else "valid"
            folder = args.out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index], mode="L").save(folder / f"fmnist-{index:05d}.png", optimize=True)
    print(f"wrote {len(CLASSES) * (args.train + args.valid)} images under {args.out}")


if __name__ == "__main__":
    main()
