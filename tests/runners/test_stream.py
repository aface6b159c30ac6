"""dataset=files end to end: the same images as a folder, as WebDataset tars, as img2dataset Parquet and as a
Hugging Face dataset give the same rows; kill -9 + rerun is exactly once; hostile shards cost only themselves;
HTTP and S3 through real local servers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import hostile_files, shards
from helpers.jobs import embed_cli
from helpers.shards import add_member, sample_files

import pipelines.data
from pipelines import store
from pipelines.config import REPO_ROOT
from pipelines.embed import run_embed
from pipelines.sources.files import FileSource

pytestmark = pytest.mark.job


def files_source(data_files: dict, **kwargs) -> FileSource:
    settings = {"storage_options": None, "format": "auto", "image_extensions": ["jpg", "jpeg", "png", "webp"],
                "image_column": "auto", "label": "auto", "keep_columns": [], "retries": 1}
    return FileSource.build(data_files=data_files, **{**settings, **kwargs})


def embed(source: FileSource | None, out: Path, *, root: Path | None = None, **settings) -> dict:
    settings = {"batch_size": 8, "num_workers": 2, "rows_per_part": 16, **settings}
    return run_embed(root=root, source=source, splits=["train"] if source is None else source.splits,
                     output_dir=out, model="tiny", device="cpu", progress=False, **settings)


def by_image(out: Path, key) -> pd.DataFrame:
    frame = pd.read_parquet(out)
    frame.index = [key(row) for row in frame.itertuples()]
    return frame.sort_index()


def test_folder_tars_img2dataset_parquet_and_hf_parquet_give_the_same_embeddings(tmp_path):
    files = sample_files("train")
    root = tmp_path / "folder"
    for f in files:
        (root / "train" / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / "train" / f.parent.name / f.name)
    shards.write_img2dataset_webdataset(tmp_path / "wds", files, per_shard=30)
    shards.write_img2dataset_parquet(tmp_path / "pq", files, per_shard=40, row_group_size=16)
    shards.write_hf_dataset(tmp_path / "hf", {"train": files})
    outs = {"folder": embed(None, tmp_path / "o-folder", root=root)}
    sources = {"tars": files_source({"train": str(tmp_path / "wds" / "{00000..00003}.tar")}),
               "img2dataset": files_source({"train": str(tmp_path / "pq" / "*.parquet")}, label="label_name"),
               "hf": files_source({"train": str(tmp_path / "hf" / "data" / "train-*.parquet")})}
    for name, src in sources.items():
        outs[name] = embed(src, tmp_path / f"o-{name}")
    assert {name: s["images"] for name, s in outs.items()} == dict.fromkeys(outs, len(files))
    assert {name: s["errors"] for name, s in outs.items()} == dict.fromkeys(outs, 0)
    position = {f"{f.parent.name}/{f.name}": i for i, f in enumerate(files)}
    frames = {
        "folder": by_image(tmp_path / "o-folder", lambda r: position[r.path.split("/", 1)[1]]),
        "tars": by_image(tmp_path / "o-tars", lambda r: int(r.path[-9:-4]) * 30 + int(r.path[-4:])),
        "img2dataset": by_image(tmp_path / "o-img2dataset", lambda r: int(r.path[:5]) * 40 + int(r.path.split("/")[1])),
        "hf": by_image(tmp_path / "o-hf", lambda r: int(r.path.split("/")[1])),
    }
    reference = np.stack(frames["folder"].embedding.to_numpy())
    for name, frame in frames.items():
        assert list(frame.index) == list(range(len(files))), name
        assert list(frame.label) == [f.parent.name for f in files], name
        got = np.stack(frame.embedding.to_numpy())
        cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
        assert cosine.min() > 0.99999, (name, cosine.min())


def all_paths(out: Path) -> list[str]:
    return [p for part in store.parts(store.split_dir(out, "train"))
            for p in store.read_part(part, columns=["path"]).column("path").to_pylist()]


def test_kill_9_on_tars_then_rerun_embeds_each_record_once(tmp_path):
    files = sample_files("train") + sample_files("valid")
    shards.write_img2dataset_webdataset(tmp_path / "wds", files, per_shard=50)
    out = tmp_path / "out"
    args = ["model=tiny", "dataset=files", f"dataset.data_files.train={tmp_path}/wds/{{00000..00005}}.tar",
            "splits=[train]", f"output_dir={out}", "progress=false", "batch_size=4", "rows_per_part=8",
            "num_workers=2"]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.embed", *args], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, text=True)
    deadline = time.monotonic() + 180
    while not store.parts(store.split_dir(out, "train")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = all_paths(out)
    assert 0 < len(before) < len(files), "the kill should land partway through the job"
    result = embed_cli(out, *args[1:])
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["already_done"] == len(before) and summary["images"] == len(files) - len(before)
    after = all_paths(out)
    assert len(after) == len(set(after)) == len(files)
    assert set(after) == {f"{s:05d}.tar/{s:05d}{i:04d}" for s in range(6) for i in range(50)}


def hostile_shards(folder: Path) -> tuple[int, dict[str, str]]:
    """Tars and Parquet files with every hostile kind; (good records, {error path: what its reason says})."""
    folder.mkdir(parents=True)
    good = [f.read_bytes() for f in sample_files("train")[:8]]
    with tarfile.open(folder / "a-mixed.tar", "w") as tar:
        add_member(tar, "g0.png", good[0])
        add_member(tar, "noimage.txt", b"a caption without its image")
        add_member(tar, "corrupt.jpg", b"\xff\xd8\xff\xe0 not a jpeg at all")
        add_member(tar, "text.png", b"this is text, not a png")
        add_member(tar, "big.png", hostile_files.png_header_only(20000, 20000))
        add_member(tar, "short.png", hostile_files.truncated_rows_png())
        add_member(tar, "g1.png", good[1])
    whole = folder / "b-whole.tar"
    with tarfile.open(whole, "w") as tar:
        for i, data in enumerate(good[2:6]):
            add_member(tar, f"w{i}.png", data)
    with tarfile.open(whole) as tar:
        last = tar.getmembers()[-1]
    (folder / "c-truncated.tar").write_bytes(whole.read_bytes()[: last.offset_data + last.size // 2])  # cut in w3
    whole.unlink()
    pq.write_table(pa.table({"key": ["k"], "url": ["u"]}), folder / "d-noimage.parquet")
    expected = {"a-mixed.tar/noimage": "no image member (members: txt",
                "a-mixed.tar/corrupt": "DecodeError: cannot decode image",
                "a-mixed.tar/text": "DecodeError: not an image",
                "a-mixed.tar/big": "DecodeError: too large: 20000x20000",
                "a-mixed.tar/short": "DecodeError: truncated PNG",
                "c-truncated.tar": "SourceDamage: tar damaged: truncated in member w3.png",
                "d-noimage.parquet": "SourceDamage: d-noimage.parquet: no an image column"}
    return 2 + 3, expected


def test_hostile_shards_cost_only_themselves(tmp_path):
    good, expected = hostile_shards(tmp_path / "shards")
    src = files_source({"train": [str(tmp_path / "shards" / "*.tar"), str(tmp_path / "shards" / "*.parquet")]},
                       format="auto")
    tars = embed(src, tmp_path / "out")
    errors = {e["path"]: e["error"] for e in store.read_errors(store.split_dir(tmp_path / "out", "train"))}
    tar_errors = {k: v for k, v in expected.items() if ".parquet" not in k}
    assert set(errors) == set(tar_errors)
    for path, reason in tar_errors.items():
        assert errors[path].startswith(reason), (path, errors[path])
    assert tars["images"] == good and tars["errors"] == len(tar_errors) and tars["damaged_units"] == 1
    parquet = embed(files_source({"train": str(tmp_path / "shards" / "*.parquet")}), tmp_path / "out-pq")
    errors = {e["path"]: e["error"] for e in store.read_errors(store.split_dir(tmp_path / "out-pq", "train"))}
    assert errors["d-noimage.parquet"].startswith(expected["d-noimage.parquet"])
    assert "columns: key (string), url (string)" in errors["d-noimage.parquet"]
    assert parquet["errors"] == parquet["damaged_units"] == 1 and parquet["images"] == 0
    again = embed(src, tmp_path / "out")  # recorded once: nothing to redo, nothing recorded twice
    assert again["images"] == again["errors"] == 0


def test_a_decoder_crash_inside_a_tar_costs_only_its_member(tmp_path, monkeypatch):
    monkeypatch.setattr(pipelines.data, "decode", hostile_files.torchvision_png_decode(pipelines.data.decode))
    good = [f.read_bytes() for f in sample_files("train")[:10]]
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        for i, data in enumerate(good[:5]):
            add_member(tar, f"a{i}.png", data)
        hostile_files.write_crash_png(tmp_path / "crash.png")
        add_member(tar, "crash.png", (tmp_path / "crash.png").read_bytes())
        for i, data in enumerate(good[5:]):
            add_member(tar, f"b{i}.png", data)
    summary = embed(files_source({"train": str(tmp_path / "x.tar")}), tmp_path / "out", num_workers=1)
    errors = store.read_errors(store.split_dir(tmp_path / "out", "train"))
    assert [(e["path"], e["error"]) for e in errors] == [("x.tar/crash", "DecodeError: decoder crashed (signal 11)")]
    assert sorted(all_paths(tmp_path / "out")) == sorted([f"x.tar/a{i}" for i in range(5)] +
                                                         [f"x.tar/b{i}" for i in range(5)])
    assert summary["images"] == 10


def test_the_issues_command_lines_over_http_and_s3(tmp_path):
    files = sample_files("valid")[:60]
    shards.write_img2dataset_webdataset(tmp_path / "web", files, per_shard=15)
    with shards.http_server(tmp_path / "web") as (base, _):
        out = tmp_path / "http"
        result = subprocess.run(
            [sys.executable, "-m", "pipelines.embed", "dataset=files",
             f"dataset.data_files.train={base}/{{00000..00003}}.tar", "splits=[train]", "model=tiny",
             f"output_dir={out}", "progress=false", "dataset.keep_columns=[key,caption]"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        frame = pd.read_parquet(out)
        assert len(frame) == 60 and frame.path.is_unique and list(frame.columns[:3]) == ["path", "label", "embedding"]
        assert frame.key.str.len().eq(9).all() and frame.caption.str.startswith("a ").all()
        missing = subprocess.run(
            [sys.executable, "-m", "pipelines.embed", "dataset=files",
             f"dataset.data_files.train={base}/{{00003..00004}}.tar", "splits=[train]", "model=tiny",
             f"output_dir={tmp_path / 'missing'}", "progress=false", "dataset.retries=1"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
        assert missing.returncode == 0, missing.stderr[-2000:]
        errors = store.read_errors(store.split_dir(tmp_path / "missing", "train"))
        assert [e["path"] for e in errors] == ["00004.tar"] and "SourceDamage" in errors[0]["error"]
        assert "1 shard(s) or row group(s) could not be read to their end" in missing.stdout
    import s3fs

    with shards.s3_server() as endpoint:
        options = shards.s3_options(endpoint)
        fs = s3fs.S3FileSystem(**options)
        shards.create_bucket(endpoint, "shards")
        for tar in sorted((tmp_path / "web").glob("*.tar")):
            fs.put(str(tar), f"shards/laion/{tar.name}")
        summary = embed(files_source({"train": "s3://shards/laion/{00000..00003}.tar"}, storage_options=options),
                        tmp_path / "s3")
        assert summary["images"] == 60 and summary["errors"] == 0
        s3 = pd.read_parquet(tmp_path / "s3").set_index("path").sort_index()
        local = frame.set_index("path").sort_index()
        assert list(s3.index) == list(local.index)
        assert np.allclose(np.stack(s3.embedding.to_numpy()), np.stack(local.embedding.to_numpy()), atol=1e-5)
