"""TorchCodec against the project's image decoder: exactness and speed on one core.

Usage (TorchCodec in a separate folder, so that the project's environment is left as it is):
    pip install --no-deps --target /tmp/torchcodec 'torchcodec==0.17.0'
    PYTHONPATH=/tmp/torchcodec python scripts/torchcodec_check.py [seconds per timing]

Prints, per photo (the real photos and encodings of tests/conftest.py's `photo_bytes`): the largest absolute pixel
difference of `torchcodec.decoders.decode_image(mode="RGB")` against torchvision's `decode_image(mode=RGB)` and
against `pipelines.data.decode`, then images/s of each on one thread (same bytes; the median of 7
interleaved rounds).
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import sklearn.datasets
import torch
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as tv_decode_image

from pipelines.data import decode as pipelines_decode

PHOTOS = Path(sklearn.datasets.__file__).parent / "images"


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def photos() -> dict[str, bytes]:
    china, flower = Image.open(PHOTOS / "china.jpg"), Image.open(PHOTOS / "flower.jpg")
    return {
        "rgb.jpg": (PHOTOS / "china.jpg").read_bytes(),
        "flower.jpg": (PHOTOS / "flower.jpg").read_bytes(),
        "imagenet-like.jpg": encode(china.resize((500, 375)), "JPEG", quality=90),
        "gray.jpg": encode(china.convert("L"), "JPEG", quality=90),
        "cmyk.jpg": encode(flower.convert("CMYK"), "JPEG", quality=90),
        "flower.png": encode(flower, "PNG"),
        "png_named.JPEG": encode(china.resize((500, 375)), "PNG"),
        "rgba.png": encode(flower.convert("RGBA"), "PNG"),
    }


def rates(decoders: dict[str, Callable[[bytes], torch.Tensor]], data: bytes, seconds: float,
          rounds: int = 7) -> dict[str, float]:
    """images/s of each decoder on `data`: the median of `rounds` short runs, interleaved (load hits all alike)."""
    runs: dict[str, list[float]] = {label: [] for label in decoders}
    for _ in range(rounds):
        for label, fn in decoders.items():
            fn(data)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                fn(data)
                n += 1
            runs[label].append(n / (time.perf_counter() - start))
    return {label: sorted(r)[len(r) // 2] for label, r in runs.items()}


def max_diff(out: dict[str, torch.Tensor | str], other: str) -> str:
    """Largest absolute pixel difference of TorchCodec's image against `other`'s, or why there is none."""
    a, b = out["torchcodec"], out[other]
    if isinstance(a, str) or isinstance(b, str):
        return "error"
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)}"
    return str(int((a.int() - b.int()).abs().max()))


def main(seconds: float) -> None:
    import torchcodec
    from torchcodec.decoders import decode_image as tc_decode_image

    torch.set_num_threads(1)
    decoders = {
        "torchvision": lambda b: tv_decode_image(torch.frombuffer(bytearray(b), dtype=torch.uint8), ImageReadMode.RGB),
        "pipelines.data.decode": pipelines_decode,
        "torchcodec": lambda b: tc_decode_image(b, mode="RGB"),
    }
    print(f"torch {torch.__version__}, torchcodec {torchcodec.__version__}, 1 thread, {seconds:g} s per timing")
    print(f"{'photo':18} {'size':>9} {'max|tc-tv|':>10} {'max|tc-pl|':>10} "
          + " ".join(f"{name + ' img/s':>24}" for name in decoders))
    for name, data in photos().items():
        out: dict[str, torch.Tensor | str] = {}
        for label, fn in decoders.items():
            try:
                out[label] = fn(data)
            except (RuntimeError, ValueError) as exc:  # a decoder that refuses the photo: say so in the table
                out[label] = f"error: {exc}"
        size = "x".join(map(str, out["torchvision"].shape[1:])) if isinstance(out["torchvision"], torch.Tensor) else "?"
        working = {label: fn for label, fn in decoders.items() if isinstance(out[label], torch.Tensor)}
        speed = rates(working, data, seconds)
        print(f"{name:18} {size:>9} {max_diff(out, 'torchvision'):>10} {max_diff(out, 'pipelines.data.decode'):>10} "
              + " ".join(f"{speed.get(label, float('nan')):>24.0f}" for label in decoders))


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)
