"""The shard sources on their own: patterns, the tar reader, WebDataset samples, Parquet image columns, HF
datasets, remote reads that fail mid-way (real local servers, no mocks)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import shards
from helpers.shards import add_member, sample_files

from pipelines.errors import UserError
from pipelines.sources import SourceDamage
from pipelines.sources.files import FileSource
from pipelines.sources.storage import ReadFailedError, Storage, expand_braces, fixed_prefix, relative_names
from pipelines.sources.webdataset import iter_members, split_key


def source(data_files, **kwargs) -> FileSource:
    settings = {"storage_options": None, "format": "auto", "image_extensions": ["jpg", "jpeg", "png", "webp"],
                "image_column": "auto", "label": "auto", "keep_columns": [], "retries": 2}
    return FileSource.build(data_files=data_files, **{**settings, **kwargs})


def records(src: FileSource, split: str = "train") -> list:
    return [r for unit in src.list(split).units for r in src.read(unit)]


def test_brace_patterns_expand_as_a_shell_does():
    assert expand_braces("/d/{00008..00011}.tar") == [f"/d/{n:05d}.tar" for n in range(8, 12)]
    assert expand_braces("/d/{a,b}-{0..1}.tar") == ["/d/a-0.tar", "/d/a-1.tar", "/d/b-0.tar", "/d/b-1.tar"]
    assert expand_braces("/d/{x}.tar") == ["/d/{x}.tar"]
    assert fixed_prefix("s3://b/laion/{00000..00127}.tar") == "s3://b/laion/"
    assert fixed_prefix("/data/hf/data/train-*.parquet") == "/data/hf/data/"
    names = relative_names(["/a/b/x/1.tar", "/a/b/y/2.tar"], ["/a/b/x/{1..1}.tar", "/a/b/y/*.tar"])
    assert names == {"/a/b/x/1.tar": "x/1.tar", "/a/b/y/2.tar": "y/2.tar"}


def test_a_pattern_matching_nothing_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"dataset.data_files.train: .*nothing.*\.tar matches no file"):
        source({"train": str(tmp_path / "nothing" / "{0..3}.tar")}).list("train")
    with pytest.raises(UserError, match="dataset.format='zip'"):
        source({"train": str(tmp_path)}, format="zip")


def test_webdataset_keys_follow_the_first_dot_of_the_file_name():
    assert split_key("dir/000012.seg.png") == ("dir/000012", "seg.png")
    assert split_key("a.b.c.png") == ("a", "b.c.png")
    assert split_key("noext") == ("noext", "")


def test_img2dataset_folder_reads_as_it_is(tmp_path):
    files = sample_files("train")[:30]
    shards.write_img2dataset_webdataset(tmp_path / "out", files, per_shard=12)
    src = source({"train": str(tmp_path / "out" / "*")}, keep_columns=["key", "caption", "url"])
    listing = src.list("train")
    assert [u.id for u in listing.units] == ["00000.tar", "00001.tar", "00002.tar"]
    assert len(listing.ignored) == 6  # the .parquet and _stats.json beside each tar: metadata, not shards
    got = records(src)
    assert [r.path for r in got][:2] == ["00000.tar/000000000", "00000.tar/000000001"]
    assert [r.data for r in got] == [f.read_bytes() for f in files]
    assert [r.label for r in got] == [f.parent.name for f in files]
    assert got[0].extra == {"key": "000000000", "caption": f"a {files[0].parent.name}",
                            "url": f"https://example.org/{files[0].parent.name}/{files[0].name}"}


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return path


def test_image_member_by_extension_order_and_label_from_json(tmp_path, photo_bytes):
    png = sample_files("train")[0].read_bytes()
    _tar(tmp_path / "a.tar", [("k1.json", json.dumps({"label": 7}).encode()), ("k1.webp", b"not webp"),
                              ("k1.png", png), ("k2.txt", b"caption only"), ("k3.JPG", photo_bytes["rgb.jpg"])])
    src = source({"train": str(tmp_path / "a.tar")}, label="json.label", image_extensions=["png", "jpg", "webp"])
    got = {r.path: r for r in records(src)}
    assert got["a.tar/k1"].data == png and got["a.tar/k1"].label == "7"
    assert got["a.tar/k2"].data is None and got["a.tar/k2"].error.startswith("no image member (members: txt")
    assert got["a.tar/k3"].data == photo_bytes["rgb.jpg"]  # extensions match whatever their case


def test_a_key_met_twice_gets_a_path_of_its_own(tmp_path):
    png = sample_files("train")[0].read_bytes()
    _tar(tmp_path / "a.tar", [("k.png", png), ("j.png", png), ("k.png", png)])
    assert [r.path for r in records(source({"train": str(tmp_path / "a.tar")}))] == ["a.tar/k", "a.tar/j",
                                                                                      "a.tar/k@2"]


def test_a_truncated_or_corrupt_tar_keeps_what_came_before(tmp_path):
    png = sample_files("train")[0].read_bytes()
    whole = _tar(tmp_path / "whole.tar", [(f"{k}.png", png) for k in range(6)]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 2])
    corrupt = bytearray(whole)
    corrupt[3 * (512 + 512 * -(-len(png) // 512)) + 10] ^= 0xFF  # the 4th member's header
    (tmp_path / "bad.tar").write_bytes(bytes(corrupt))
    for name, kept in (("cut.tar", 2), ("bad.tar", 3)):
        src = source({"train": str(tmp_path / name)})
        unit = src.list("train").units[0]
        got = []
        with pytest.raises(SourceDamage, match="tar damaged: (truncated|corrupt header)") as err:
            got.extend(src.read(unit))
        assert len([r for r in got if r.data == png]) >= kept, name
        assert "the rest of the shard is lost" in str(err.value)
    members = list(iter_members(io.BytesIO(whole)))
    assert [m.name for m in members] == [f"{k}.png" for k in range(6)]


def test_parquet_binary_column_by_row_group(tmp_path):
    files = sample_files("valid")[:40]
    shards.write_img2dataset_parquet(tmp_path / "pq", files, per_shard=25, row_group_size=10)
    src = source({"train": str(tmp_path / "pq" / "*.parquet")}, label="label_name", keep_columns=["key", "url"])
    listing = src.list("train")
    assert [u.id for u in listing.units] == [f"00000.parquet/row_group={g}" for g in range(3)] + \
        [f"00001.parquet/row_group={g}" for g in range(2)]
    got = records(src)
    assert [r.path for r in got][:2] == ["00000.parquet/0", "00000.parquet/1"]
    assert got[25].path == "00001.parquet/0"
    assert [r.data for r in got] == [f.read_bytes() for f in files]
    assert [r.label for r in got] == [f.parent.name for f in files]
    assert got[3].extra["key"] == "000000003"


def test_parquet_without_an_image_column_is_one_record_naming_the_columns(tmp_path):
    pq.write_table(pa.table({"key": ["a"], "url": ["u"], "n": [1]}), tmp_path / "meta.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    listing = source({"train": str(tmp_path / "*.parquet")}).list("train")
    failed = {f.id: f.error for f in listing.failed}
    assert not listing.units
    assert failed["meta.parquet"] == ("meta.parquet: no an image column (binary, or an Image struct of bytes and "
                                      "path); columns: key (string), url (string), n (int64)")
    assert failed["junk.parquet"].startswith("not a readable Parquet file")


def test_a_corrupt_row_group_costs_only_itself(tmp_path):
    files = sample_files("valid")[:30]
    shards.write_img2dataset_parquet(tmp_path / "pq", files, per_shard=30, row_group_size=10)
    path = tmp_path / "pq" / "00000.parquet"
    meta = pq.ParquetFile(path).metadata.row_group(1).column(1)
    data = bytearray(path.read_bytes())
    start = meta.data_page_offset
    data[start:start + 64] = b"\xff" * 64  # the image column's page header of row group 1
    path.write_bytes(bytes(data))
    src = source({"train": str(path)})
    got, damaged = [], []
    for unit in src.list("train").units:
        try:
            got.extend(src.read(unit))
        except SourceDamage as exc:
            damaged.append((unit.id, str(exc)))
    assert [u for u, _ in damaged] == ["00000.parquet/row_group=1"]
    assert damaged[0][1].startswith("row group 1 (rows 10-19) unreadable")
    assert [r.path for r in got] == [f"00000.parquet/{i}" for i in [*range(10), *range(20, 30)]]


def test_hf_dataset_image_feature_and_class_label(tmp_path):
    files = sample_files("train")[:12]
    names = shards.write_hf_dataset(tmp_path / "repo", {"train": files})
    src = source({"train": str(tmp_path / "repo" / "data" / "train-*.parquet")})
    got = records(src)
    assert [r.path for r in got] == [f"train-00000-of-00001.parquet/{i}" for i in range(12)]
    assert [r.label for r in got] == [f.parent.name for f in files]  # ClassLabel names, not integers
    assert set(names) >= {r.label for r in got}
    assert [r.data for r in got] == [f.read_bytes() for f in files]


def test_hf_image_struct_with_a_path_and_no_bytes(tmp_path):
    files = sample_files("train")[:3]
    (tmp_path / "img").mkdir()
    for f in files:
        (tmp_path / "img" / f.name).write_bytes(f.read_bytes())
    rows = [{"bytes": None, "path": f"img/{f.name}"} for f in files] + [{"bytes": None, "path": "img/gone.png"}]
    image = pa.array(rows, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    meta = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()}
    pq.write_table(pa.table({"image": image}).replace_schema_metadata(meta), tmp_path / "x.parquet")
    got = records(source({"train": str(tmp_path / "x.parquet")}))
    assert [r.data for r in got[:3]] == [f.read_bytes() for f in files]
    assert got[3].data is None and "img/gone.png" in got[3].error and got[3].label is None


def test_http_reads_resume_after_a_connection_breaks_mid_shard(tmp_path):
    files = sample_files("train")[:20]
    shards.write_img2dataset_webdataset(tmp_path / "web", files, per_shard=20)
    with shards.http_server(tmp_path / "web") as (base, handler):
        src = source({"train": f"{base}/{{00000..00000}}.tar"}, storage_options={"block_size": 4096})
        unit = src.list("train").units[0]
        handler.fail["/00000.tar"] = 3000  # the first response breaks off after 3000 bytes
        got = list(src.read(unit))
        assert [r.data for r in got] == [f.read_bytes() for f in files]
        assert len(handler.requests) >= 2


def test_a_remote_read_that_keeps_failing_names_the_shard_and_the_byte(tmp_path):
    def opener():
        raise ConnectionResetError("peer reset")

    from pipelines.sources.storage import RetryingReader

    with pytest.raises(ReadFailedError, match=r"s3://b/x.tar: read failed at byte 0 \(after 2 retries\): "
                                              "ConnectionResetError: peer reset"):
        RetryingReader("s3://b/x.tar", opener, retries=2, backoff_s=0.01)
    assert Storage.of(None).retries == 3
