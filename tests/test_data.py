"""pipelines/data.py: listing, sharding, decoding every format ImageNet has, and error entries."""

from __future__ import annotations

import pytest
import torch
from helpers.images import SAMPLE

from pipelines.data import DecodeError, ImageFolderDataset, collate, decode, list_split, take_shard
from pipelines.errors import UserError
from pipelines.siglip import Preprocess


def test_decode_formats(photo_bytes):
    for name, data in photo_bytes.items():
        image = decode(data)
        assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3, name
    assert decode(photo_bytes["rgb.jpg"]).shape == (3, 427, 640)
    gray = decode(photo_bytes["gray.jpg"])
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "empty file"), (b"this is a text file, not an image\n", "not an image"),
     (b"\xff\xd8\xff\xe0" + bytes(64), "cannot decode|not an image")],
    ids=["empty", "text", "jpeg-header-only"],
)
def test_decode_refuses_bad_bytes(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode(data)


def test_decode_refuses_truncated_jpeg(photo_bytes):
    data = photo_bytes["rgb.jpg"]
    with pytest.raises(DecodeError, match="truncated"):
        decode(data[: len(data) // 2])


def test_list_split_sample():
    records = list_split(SAMPLE, "valid")
    assert len(records) == 200
    assert records == sorted(records, key=lambda r: r.path)
    assert len({r.label for r in records}) == 10
    assert all(r.path.startswith(f"valid/{r.label}/") for r in records)


def test_list_split_skips_hidden_and_walks_subfolders(tmp_path):
    (tmp_path / "train" / "cat" / "more").mkdir(parents=True)
    (tmp_path / "train" / ".cache").mkdir()
    (tmp_path / "train" / "cat" / "a.jpg").write_bytes(b"x")
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "train" / "cat" / "more" / "b.jpg").write_bytes(b"x")
    (tmp_path / "train" / ".cache" / "c.jpg").write_bytes(b"x")
    (tmp_path / "train" / "stray.jpg").write_bytes(b"x")
    records = list_split(tmp_path, "train")
    assert [(r.path, r.label) for r in records] == [("train/cat/a.jpg", "cat"), ("train/cat/more/b.jpg", "cat")]
    with pytest.raises(FileNotFoundError, match="valid"):
        list_split(tmp_path, "valid")


def test_shards_partition_the_files_deterministically():
    records = list_split(SAMPLE, "valid")
    shards = [take_shard(records, index=i, count=3) for i in range(3)]
    paths = [r.path for shard in shards for r in shard]
    assert sorted(paths) == [r.path for r in records]  # every file once
    assert all(30 < len(shard) < 110 for shard in shards)
    assert take_shard(list(reversed(records)), index=1, count=3) == list(reversed(shards[1]))
    with pytest.raises(UserError, match="shard.index=3"):  # a setting, not a bug: one line at the entry point
        take_shard(records, index=3, count=3)


def test_dataset_turns_failures_into_entries(tmp_path, photo_bytes):
    (tmp_path / "train" / "x").mkdir(parents=True)
    (tmp_path / "train" / "x" / "good.jpg").write_bytes(photo_bytes["rgb.jpg"])
    (tmp_path / "train" / "x" / "empty.jpg").write_bytes(b"")
    records = list_split(tmp_path, "train")
    records.append(records[0].__class__(path="train/x/gone.jpg", label="x"))
    dataset = ImageFolderDataset(tmp_path, records, Preprocess())
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch.indices == [1]
    assert batch.pixels.shape == (1, 3, 384, 384) and batch.pixels.dtype == torch.uint8
    reasons = dict(batch.failed)
    assert "empty file" in reasons[0] and "FileNotFoundError" in reasons[2]
    empty = collate([dataset[0]])
    assert empty.indices == [] and empty.pixels.shape[0] == 0


# -- hostile inputs: pixel limit, 16 bits, exact lossless decoding, crash-safe PNG, listing ----------------------

import faulthandler
import io
import os
import signal
import time

import numpy as np
from helpers import hostile_files
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from pipelines.data import DEFAULT_MAX_PIXELS, bmff_size, scan_split
from pipelines.isolate import Crashed, Isolated, IsolatedDecoder


def torchvision_decode(data: bytes) -> torch.Tensor:
    image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return image[0] if image.ndim == 4 else image


def test_bomb_is_refused_from_its_header(tmp_path):
    bomb = hostile_files.write_bomb_png(tmp_path / "bomb.png").read_bytes()
    assert len(bomb) < 4_000_000  # 2.7 GB of pixels declared
    with pytest.raises(DecodeError, match=rf"^too large: 30000x30000 \(limit {DEFAULT_MAX_PIXELS} pixels\)$"):
        decode(bomb)
    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS


def test_pixel_limit_is_a_setting(photo_bytes):
    data = photo_bytes["rgb.jpg"]  # 640x427
    with pytest.raises(DecodeError, match=r"too large: 640x427 \(limit 1000 pixels\)"):
        decode(data, max_pixels=1000)
    assert decode(data, max_pixels=640 * 427).shape == (3, 427, 640)
    assert decode(data, max_pixels=None).shape == (3, 427, 640)


def test_eps_is_refused_not_handed_to_ghostscript():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"
    with pytest.raises(DecodeError, match="EPS is not decoded"):
        decode(eps)


def test_iso_bmff_size_is_read_from_its_ispe_box():
    def box(kind: bytes, payload: bytes) -> bytes:
        return (8 + len(payload)).to_bytes(4, "big") + kind + payload

    ispe = box(b"ispe", bytes(4) + (30000).to_bytes(4, "big") + (20000).to_bytes(4, "big"))
    heic_bomb = box(b"ftyp", b"heic" + bytes(4) + b"mif1heic") + box(b"meta", bytes(4) + ispe)
    assert bmff_size(heic_bomb) == (30000, 20000)
    with pytest.raises(DecodeError, match=r"too large: 30000x20000"):
        decode(heic_bomb)
    assert bmff_size(box(b"ftyp", b"heic")) is None


def test_crash_png_is_an_error_not_a_crash():
    # torchvision's decode_image segfaults on these bytes (test_isolated_decoder_survives_a_segfault); ours raises.
    with pytest.raises(DecodeError, match="truncated"):
        decode(hostile_files.crash_png_bytes())


def _lossless_variants(image: Image.Image) -> dict[str, bytes]:
    palette = image.convert("P", palette=Image.ADAPTIVE)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    return {
        "png-rgb": hostile_files_encode(image, "PNG"), "png-rgba": hostile_files_encode(image.convert("RGBA"), "PNG"),
        "png-gray": hostile_files_encode(image.convert("L"), "PNG"),
        "png-gray-alpha": hostile_files_encode(image.convert("LA"), "PNG"),
        "png-palette": hostile_files_encode(palette, "PNG"), "png-palette-trns": hostile_files_encode(transparent, "PNG"),
        "png-1bit": hostile_files_encode(image.convert("1"), "PNG"), "gif": hostile_files_encode(palette, "GIF"),
        "webp-lossless": hostile_files_encode(image, "WEBP", lossless=True),
    }


def hostile_files_encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_lossless_formats_decode_exactly_as_torchvision_did(photo_bytes):
    photo = Image.open(io.BytesIO(photo_bytes["rgb.jpg"])).resize((320, 240))
    for name, data in _lossless_variants(photo).items():
        ours, theirs = decode(data), torchvision_decode(data)
        assert ours.dtype == torch.uint8 and ours.shape == theirs.shape == (3, 240, 320), name
        assert torch.equal(ours, theirs), name
    for src in sorted((SAMPLE / "valid").rglob("*.png"))[:20]:
        assert torch.equal(decode(src.read_bytes()), torchvision_decode(src.read_bytes())), src


def test_jpeg_still_goes_through_torchvision(photo_bytes):
    for name in ("rgb.jpg", "gray.jpg"):
        assert torch.equal(decode(photo_bytes[name]), torchvision_decode(photo_bytes[name])), name


def test_16_bit_gray_png_is_scaled_not_clipped(tmp_path):
    path = hostile_files.write_gray16_png(tmp_path / "g16.png")
    assert Image.open(path).mode == "I;16"
    image = decode(path.read_bytes())
    assert image.shape == (3, 64, 256)
    # Column x holds x * 257: the 8-bit level x, from black to white, in every channel.
    assert torch.equal(image[0, 0], torch.arange(256, dtype=torch.uint8))
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_16_bit_rgb_png_keeps_the_high_byte(tmp_path):
    values = np.random.default_rng(0).integers(0, 65536, size=(16, 24, 3), dtype=np.uint16)
    image = decode(hostile_files.rgb16_png_bytes(values))
    assert torch.equal(image, torch.from_numpy((values >> 8).astype(np.uint8)).permute(2, 0, 1))


def test_32_bit_int_and_float_tiffs_are_scaled():
    gray16 = hostile_files.gray16_gradient()
    as_int32 = hostile_files_encode(Image.fromarray(gray16.astype(np.int32)), "TIFF")
    assert Image.open(io.BytesIO(as_int32)).mode == "I"
    assert torch.equal(decode(as_int32)[0, 0], torch.arange(256, dtype=torch.uint8))
    floats = (np.arange(256, dtype=np.float32) / 255)[None, :].repeat(4, 0)
    floats[0, 0] = np.nan
    image = decode(hostile_files_encode(Image.fromarray(floats), "TIFF"))
    assert image[0, 1, 0] == 0 and image[0, 0, 0] == 0 and image[0, 1, 255] == 255 and image[0, 1, 128] == 128


# -- listing ----------------------------------------------------------------------------------------------------


def test_scan_split_ends_symlink_loops_and_reports_what_it_skips(tmp_path):
    cat = tmp_path / "train" / "cat"
    (cat / "sub").mkdir(parents=True)
    (cat / "a.png").write_bytes(b"x")
    (cat / "sub" / "b.png").write_bytes(b"x")
    hostile_files.write_symlink_loops(cat)  # self -> ., up -> ..
    (cat / "sub" / "again").symlink_to("..", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "linked-target.png").write_bytes(b"x")
    (cat / "linked.png").symlink_to(tmp_path / "elsewhere" / "linked-target.png")  # a file link: followed
    (tmp_path / "train" / "dog").symlink_to("cat", target_is_directory=True)  # a second name for one folder
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "stray.jpg").write_bytes(b"x")

    listing = scan_split(tmp_path, "train")

    assert [(r.path, r.label) for r in listing.records] == [
        ("train/cat/a.png", "cat"), ("train/cat/linked.png", "cat"), ("train/cat/sub/b.png", "cat")]
    assert listing.stray_files == ["train/stray.jpg"]
    assert listing.empty_classes == ["train/empty"]
    assert sorted(listing.skipped_dirs) == ["train/cat/self", "train/cat/sub/again", "train/cat/up", "train/dog"]
    assert list_split(tmp_path, "train") == listing.records


def test_scan_split_sets_aside_names_that_are_not_utf8(tmp_path):
    cat = tmp_path / "train" / "cat"
    cat.mkdir(parents=True)
    for name in (b"ok.png", b"new\nline.png", "\u00fcn\u00ef c\u00f6d\u00e9.png".encode(), b"bad\xff\xfe.png"):
        (cat / os.fsdecode(name)).write_bytes(b"x")
    (tmp_path / "train" / os.fsdecode(b"cl\xe9ss")).mkdir()
    (tmp_path / "train" / os.fsdecode(b"cl\xe9ss") / "a.png").write_bytes(b"x")

    listing = scan_split(tmp_path, "train")

    assert [r.path for r in listing.records] == ["train/cat/new\nline.png", "train/cat/ok.png",
                                                 "train/cat/\u00fcn\u00ef c\u00f6d\u00e9.png"]
    assert [(r.path, r.label) for r in listing.invalid_names] == [
        ("train/cat/bad\\xff\\xfe.png", "cat"), ("train/cl\\xe9ss", "cl\\xe9ss")]
    for record in listing.invalid_names:  # what the errors file and the summary can hold
        record.path.encode("utf-8")


def test_scan_split_logs_stray_files_and_empty_classes(tmp_path, caplog):
    (tmp_path / "valid" / "cat").mkdir(parents=True)
    (tmp_path / "valid" / "cat" / "a.png").write_bytes(b"x")
    (tmp_path / "valid" / "dog").mkdir()
    (tmp_path / "valid" / "loose.png").write_bytes(b"x")
    with caplog.at_level("WARNING", logger="pipelines.data"):
        scan_split(tmp_path, "valid")
    assert "valid/loose.png" in caplog.text and "valid/dog" in caplog.text


# -- isolation: a real segfault, a real abort, a real hang --------------------------------------------------------


def test_isolated_decoder_matches_in_process_decoding(photo_bytes):
    preprocess = Preprocess()
    blobs = [photo_bytes["rgb.jpg"], b"", photo_bytes["flower.png"], hostile_files.crash_png_bytes()]
    with IsolatedDecoder(preprocess, max_pixels=DEFAULT_MAX_PIXELS) as decoder:
        out = decoder.decode_many(blobs)
        assert torch.equal(out[0], preprocess.resize(decode(blobs[0])))
        assert isinstance(out[1], DecodeError) and str(out[1]) == "empty file"
        assert torch.equal(out[2], preprocess.resize(decode(blobs[2])))
        assert isinstance(out[3], DecodeError) and "truncated" in str(out[3])
        assert decoder.restarts == 0


def test_isolated_decoder_survives_a_segfault(tmp_path, monkeypatch, photo_bytes):
    # The child decodes 8-bit PNGs with torchvision's raw decoder (tests/helpers/hostile_files.write_crash_hook), which
    # segfaults on the crash PNG: the blob costs only itself, the next ones are decoded by a new child.
    hostile_files.write_crash_hook(tmp_path / "hook")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")]))
    preprocess = Preprocess()
    crash, good = hostile_files.crash_png_bytes(), photo_bytes["flower.png"]
    with IsolatedDecoder(preprocess) as decoder:
        out = decoder.decode_many([good, crash, good, crash])
        assert [str(o) if isinstance(o, DecodeError) else "ok" for o in out] == [
            "ok", "decoder crashed (signal 11)", "ok", "decoder crashed (signal 11)"]
        assert torch.equal(out[2], preprocess.resize(torchvision_decode(good)))
        assert decoder.restarts == 2
        assert torch.equal(decoder.decode_many([good])[0], out[0])  # and it keeps serving


def _abort_or_hang(item: str) -> str:
    if item == "abort":
        faulthandler.disable()  # pytest's fault handler, inherited by the fork, would print a traceback
        os.abort()
    if item == "hang":
        time.sleep(3600)
    return item.upper()


def test_isolated_child_abort_and_hang_cost_one_item():
    with Isolated(_abort_or_hang, start_method="fork", timeout_s=600) as child:
        out = child.map(["a", "abort", "b"])
        child.timeout_s = 2  # only the hanging item meets this deadline: no other answer is timed
        out += child.map(["hang"])
        child.timeout_s = 600
        out += child.map(["c"])
    assert out[0] == (True, "A") and out[2] == (True, "B") and out[4] == (True, "C")
    assert out[1] == Crashed(f"decoder crashed (signal {signal.SIGABRT.value})")
    assert out[3] == Crashed("decoder hung (killed after 2 s)")


def test_jpeg_bomb_is_refused_from_its_frame_header(photo_bytes):
    data = bytearray(photo_bytes["rgb.jpg"])
    sof = next(i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5:sof + 9] = (30000).to_bytes(2, "big") * 2  # height, width
    with pytest.raises(DecodeError, match=r"too large: 30000x30000"):
        decode(bytes(data))
    from pipelines.data import EncodedImageDataset, jpeg_size

    assert jpeg_size(photo_bytes["rgb.jpg"]) == (640, 427) and jpeg_size(b"\xff\xd8\xff") is None
    with pytest.raises(DecodeError, match=r"too large: 30000x30000"):  # the device-decode path checks it too
        EncodedImageDataset(".", [], Preprocess()).load(bytes(data))
