"""Writers for the hostile files found in scraped image folders, and a mixed folder built from data/sample.

    python tests/helpers/hostile_files.py DIR      # DIR/train, DIR/valid: sample images plus one of each hostile kind

Each `write_*` writes one file (or link) and returns its path. `HOSTILE` says what the embed job must record
for each bad file (a regular expression matched against the reason in _errors.jsonl); `GOOD_EXTRA` names the
odd-but-valid files that must be embedded.
"""

from __future__ import annotations

import io
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, idat: bytes, *, bit_depth: int = 8, color_type: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return PNG_MAGIC + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def crash_png_bytes() -> bytes:
    """A ~70-byte RGB PNG declaring 8x64 whose IDAT holds one row, its zlib stream unfinished.

    libpng reports "Not enough image data"; torchvision 0.29's decode_image then segfaults. PIL raises.
    """
    rows = b"\x00" + bytes([200]) * 8 * 3
    stream = zlib.compressobj()
    return _png(8, 64, stream.compress(rows) + stream.flush(zlib.Z_SYNC_FLUSH))


def truncated_rows_png(width: int = 64, height: int = 64) -> bytes:
    """A well-formed RGB PNG (finished zlib stream, IEND) whose IDAT holds half the rows its header declares.

    PIL decodes it without a word, the missing rows black; it must be an error."""
    rows = b"".join(b"\x00" + bytes([200]) * width * 3 for _ in range(height // 2))
    return _png(width, height, zlib.compress(rows))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height RGB with one row of data: refused from its header by the pixel limit."""
    return _png(width, height, zlib.compress(b"\x00" + bytes(3 * min(width, 16))))


def write_short_rows_png(path: Path) -> Path:
    path.write_bytes(truncated_rows_png())
    return path


def write_gray_filled_jpeg(path: Path, source: Path) -> Path:
    """A JPEG whose entropy-coded data stops half-way, then its end marker: libjpeg fills the rest with gray and
    reports success (a warning on stderr only)."""
    data = _jpeg_of(source)
    scan = data.index(b"\xff\xda")
    path.write_bytes(data[: scan + (len(data) - scan) // 2] + b"\xff\xd9")
    return path


def torchvision_png_decode(real):
    """`pipelines.data.decode` with 8-bit PNGs sent to torchvision's decode_image, which segfaults on the crash PNG
    (`real`: the decode it stands in for; the pixel limit still holds). For tests that monkeypatch the module in
    this process, whose forked workers inherit it."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    import pipelines.data

    def decode(data: bytes, *, max_pixels=pipelines.data.DEFAULT_MAX_PIXELS) -> torch.Tensor:
        if data[:8] == PNG_MAGIC and data[24:25] == b"\x08":
            pipelines.data.check_size(*pipelines.data.open_header(data).size, max_pixels)
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return real(data, max_pixels=max_pixels)

    return decode


def write_crash_png(path: Path) -> Path:
    path.write_bytes(crash_png_bytes())
    return path


def write_bomb_png(path: Path, *, side: int = 30000) -> Path:
    """A PNG declaring side x side RGB of black rows (2.7 GB of pixels for 30000), ~2.6 MB on disk.

    The pixels are never held in memory: a block of rows is compressed once after a full flush (which resets
    the compressor, so every later identical block compresses to the same bytes), and those bytes repeated.
    """
    row = bytes(1 + 3 * side)  # filter byte 0, then black pixels
    block_rows = next(k for k in range(min(side, 300), 0, -1) if side % k == 0)
    block = row * block_rows
    stream = zlib.compressobj(9)
    first = stream.compress(block) + stream.flush(zlib.Z_FULL_FLUSH)  # carries the zlib header
    repeat = stream.compress(block) + stream.flush(zlib.Z_FULL_FLUSH)
    last_block = stream.flush()[:-4]  # the final (empty) block; its checksum covers two blocks only
    # Adler-32 of n zero bytes: a stays 1 and b adds it n times.
    checksum = ((side * len(row)) % 65521) << 16 | 1
    with open(path, "wb") as f:
        f.write(PNG_MAGIC + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)))
        f.write(_chunk(b"IDAT", first))
        f.writelines(_chunk(b"IDAT", repeat) for _ in range(side // block_rows - 1))
        f.write(_chunk(b"IDAT", last_block + struct.pack(">I", checksum)) + _chunk(b"IEND", b""))
    return path


def gray16_gradient() -> np.ndarray:
    """uint16 [64, 256]: column x holds x * 257 (0 ... 65535), so each 8-bit level appears once per row."""
    return np.tile((np.arange(256, dtype=np.uint16) * 257)[None, :], (64, 1))


def write_gray16_png(path: Path) -> Path:
    """A real 16-bit grayscale PNG (PIL mode I;16): a horizontal gradient from 0 to 65535."""
    Image.fromarray(gray16_gradient()).save(path, "PNG")
    return path


def rgb16_png_bytes(values: np.ndarray) -> bytes:
    """uint16 [H, W, 3] -> a 16-bit-per-sample RGB PNG (PIL cannot write these; written chunk by chunk)."""
    height, width, _ = values.shape
    big_endian = values.astype(">u2")
    raw = b"".join(b"\x00" + big_endian[y].tobytes() for y in range(height))
    return _png(width, height, zlib.compress(raw), bit_depth=16, color_type=2)


def write_rgb16_png(path: Path) -> Path:
    gray = gray16_gradient()
    path.write_bytes(rgb16_png_bytes(np.stack([gray, gray[:, ::-1], np.full_like(gray, 32768)], axis=-1)))
    return path


def write_truncated_jpeg(path: Path, source: Path) -> Path:
    """The first half of a real JPEG (a download cut short)."""
    data = _jpeg_of(source)
    path.write_bytes(data[: len(data) // 2])
    return path


def write_empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_text(path: Path) -> Path:
    path.write_text("<html><body>404 Not Found</body></html>\n")
    return path


def write_png_named_jpeg(path: Path, source: Path) -> Path:
    """A valid PNG whose name says .JPEG (ImageNet has one)."""
    Image.open(source).convert("RGB").save(path, "PNG")
    return path


def write_cmyk_jpeg(path: Path, source: Path) -> Path:
    """A valid CMYK JPEG (ImageNet has 22)."""
    Image.open(source).convert("CMYK").save(path, "JPEG", quality=90)
    return path


def write_symlink_loops(class_dir: Path) -> list[Path]:
    """`self -> .` and `up -> ..` inside a class folder: a walk following links never ends without a guard."""
    links = [class_dir / "self", class_dir / "up"]
    links[0].symlink_to(".", target_is_directory=True)
    links[1].symlink_to("..", target_is_directory=True)
    return links


def write_crash_hook(folder: Path) -> Path:
    """A `sitecustomize.py` in `folder` that makes every Python process decode 8-bit PNGs with torchvision.

    With `folder` on PYTHONPATH, each process of a job (the job, its DataLoader workers, Ray workers, decoder
    children) replaces `pipelines.data.decode` as soon as that module is imported, so the crash PNG really
    segfaults whichever process decodes it: the honest way to test crash recovery now that PNGs go to PIL.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_HOOK)
    return folder / "sitecustomize.py"


_HOOK = '''
import importlib.abc
import importlib.util
import sys


def _patch(module):
    import torch
    from torchvision.io import ImageReadMode, decode_image

    real = module.decode

    def decode(data, *, max_pixels=module.DEFAULT_MAX_PIXELS):
        if data[:8] == b"\\x89PNG\\r\\n\\x1a\\n" and data[24:25] == b"\\x08":  # 8-bit PNG: torchvision, raw
            module.check_size(*module.open_header(data).size, max_pixels)  # the pixel limit still holds
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return real(data, max_pixels=max_pixels)

    module.decode = decode


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "pipelines.data":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder())
'''


def _jpeg_of(source: Path) -> bytes:
    data = source.read_bytes()
    if data[:3] == b"\xff\xd8\xff":
        return data
    buf = io.BytesIO()
    Image.open(source).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


# What the job records for each bad file: file name -> regular expression the reason must match.
HOSTILE = {
    "crash.png": r"truncated|decoder crashed \(signal 11\)",
    "bomb.png": r"too large: 30000x30000 \(limit \d+ pixels\)",
    "truncated.JPEG": r"truncated|cannot decode",
    "empty.JPEG": r"empty file",
    "notes.txt": r"not an image",
    "short_rows.png": r"truncated PNG: its image data holds \d+ of the \d+ bytes|decoder crashed \(signal 11\)",
    "gray_filled.JPEG": r"truncated JPEG: .*premature end of data segment",
}
# Odd but valid files: embedded like any other image.
GOOD_EXTRA = ["gray16.png", "rgb16.png", "png_named.JPEG", "cmyk.JPEG"]


def build_mixed_folder(root: Path, *, sample: Path = SAMPLE, per_class: int = 3, bomb: bool = True) -> dict:
    """root/{train,valid}/<class>/: `per_class` sample images per class and split, plus in train/<first class>/
    one file of each hostile kind, symlink loops, a stray file in train/ and an empty class folder in valid/.

    Returns {"good": [relative paths that must be embedded], "bad": {relative path: reason regex},
    "stray": [...], "empty_classes": [...]}.
    """
    good: list[str] = []
    for split in ("train", "valid"):
        for class_dir in sorted(p for p in (sample / split).iterdir() if p.is_dir())[:2]:
            target = root / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for src in sorted(class_dir.iterdir())[:per_class]:
                shutil.copy(src, target / src.name)
                good.append(f"{split}/{class_dir.name}/{src.name}")
    hostile_dir = min((root / "train").iterdir())
    source = min(hostile_dir.iterdir())
    rel = f"train/{hostile_dir.name}"
    write_crash_png(hostile_dir / "crash.png")
    if bomb:
        write_bomb_png(hostile_dir / "bomb.png")
    write_truncated_jpeg(hostile_dir / "truncated.JPEG", source)
    write_short_rows_png(hostile_dir / "short_rows.png")
    write_gray_filled_jpeg(hostile_dir / "gray_filled.JPEG", source)
    write_empty(hostile_dir / "empty.JPEG")
    write_text(hostile_dir / "notes.txt")
    write_gray16_png(hostile_dir / "gray16.png")
    write_rgb16_png(hostile_dir / "rgb16.png")
    write_png_named_jpeg(hostile_dir / "png_named.JPEG", source)
    write_cmyk_jpeg(hostile_dir / "cmyk.JPEG", source)
    write_symlink_loops(hostile_dir)
    # A file link (the subset builder makes these): followed, embedded under its own name.
    (hostile_dir / "linked.png").symlink_to(source)
    (root / "train" / "stray.jpg").write_bytes(source.read_bytes())
    (root / "valid" / "empty_class").mkdir()
    bad = {f"{rel}/{name}": reason for name, reason in HOSTILE.items() if bomb or name != "bomb.png"}
    good += [f"{rel}/{name}" for name in GOOD_EXTRA] + [f"{rel}/linked.png"]
    return {"good": sorted(good), "bad": bad, "stray": ["train/stray.jpg"], "empty_classes": ["valid/empty_class"]}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/helpers/hostile_files.py DIR")
    out = Path(sys.argv[1])
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} exists and is not empty")
    made = build_mixed_folder(out)
    print(f"{out}: {len(made['good'])} good images, {len(made['bad'])} bad files "
          f"({', '.join(sorted(Path(p).name for p in made['bad']))}), symlink loops, a stray file, an empty class")
