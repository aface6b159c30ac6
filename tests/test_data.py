"""pipelines/data.py: listing, sharding, decoding every format ImageNet has, and error entries."""

from __future__ import annotations

import pytest
import torch

from pipelines.data import DecodeError, ImageFolderDataset, collate, decode, list_split, take_shard
from pipelines.siglip import Preprocess

from conftest import SAMPLE


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
    with pytest.raises(ValueError, match="shard.index=3"):
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
