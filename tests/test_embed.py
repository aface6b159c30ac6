"""pipelines/embed.py end to end: the CLI on data/sample, parity with transformers, bad files, kill -9 + resume,
shards, refusal of another model."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import SiglipImageProcessor, SiglipModel

from pipelines import store
from pipelines.config import REPO_ROOT
from pipelines.data import list_split
from pipelines.embed import run_embed

pytestmark = pytest.mark.job


def embed_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.embed", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=False, **kwargs)


def run(root: Path, out: Path, model: str = "tiny", **kwargs) -> dict:
    settings = {"splits": ["train", "valid"], "num_workers": 0, "batch_size": 4, "progress": False}
    return run_embed(root=root, output_dir=out, model=model, device="cpu", **{**settings, **kwargs})


def all_paths(out: Path, split: str) -> list[str]:
    return [p for part in store.parts(store.split_dir(out, split))
            for p in pq.read_table(part, columns=["path"])["path"].to_pylist()]


def test_cli_embeds_the_sample(tmp_path):
    result = embed_cli("model=tiny", f"output_dir={tmp_path}", "progress=false")
    assert result.returncode == 0, result.stderr
    assert "300 images embedded, 0 errors" in result.stdout
    for split, n in (("train", 100), ("valid", 200)):
        data = store.read_split(tmp_path, split)
        assert len(data.paths) == len(set(data.paths)) == n
        assert data.embeddings.shape == (n, 32) and np.isfinite(data.embeddings).all()
        assert data.paths == [r.path for r in list_split(REPO_ROOT / "data" / "sample", split)]
        assert data.metadata["model"] == "tiny"
    summary = json.loads((tmp_path / store.SUMMARY).read_text())
    assert summary["images"] == 300 and summary["errors"] == 0 and summary["images_per_s"] > 0
    assert {"read_s", "model_s", "write_s"} <= summary.keys()


def test_job_equals_transformers_reference(tmp_path, image_root, tiny_checkpoint):
    run(image_root, tmp_path / "out", model=str(tiny_checkpoint), rows_per_part=5)
    reference_model = SiglipModel.from_pretrained(tiny_checkpoint).eval()
    processor = SiglipImageProcessor.from_pretrained(tiny_checkpoint)
    for split in ("train", "valid"):
        data = store.read_split(tmp_path / "out", split)
        assert data.paths == [r.path for r in list_split(image_root, split)]
        assert data.labels == [p.split("/")[1] for p in data.paths]
        images = [Image.open(io.BytesIO((image_root / p).read_bytes())).convert("RGB") for p in data.paths]
        with torch.no_grad():
            out = reference_model.get_image_features(**processor(images=images, return_tensors="pt"))
        reference = getattr(out, "pooler_output", out).numpy()
        cos = (data.embeddings * reference).sum(1) / np.linalg.norm(data.embeddings, axis=1) / np.linalg.norm(
            reference, axis=1)
        assert cos.min() >= 0.9999, split
    assert data.metadata["model"] == str(tiny_checkpoint) and data.metadata["embedding_dim"] == 32


def test_bad_files_are_recorded_and_skipped(tmp_path, image_root, photo_bytes):
    bad = {"valid/bag/corrupt.JPEG": photo_bytes["rgb.jpg"][:5000], "valid/bag/empty.JPEG": b"",
           "valid/trouser/notes.txt": b"not an image\n"}
    for rel, data in bad.items():
        (image_root / rel).write_bytes(data)
    summary = run(image_root, tmp_path / "out")
    errors = store.read_errors(store.split_dir(tmp_path / "out", "valid"))
    assert sorted(e["path"] for e in errors) == sorted(bad)
    assert all(e["error"] for e in errors) and {e["label"] for e in errors} == {"bag", "trouser"}
    listed = len(list_split(image_root, "train")) + len(list_split(image_root, "valid"))
    assert summary["errors"] == 3 and summary["images"] == listed - 3
    assert not set(bad) & set(all_paths(tmp_path / "out", "valid"))
    again = run(image_root, tmp_path / "out")  # recorded files are done, not retried
    assert again["images"] == 0 and again["errors"] == 0 and again["already_done"] == listed
    assert len((tmp_path / "out" / "split=valid" / "_errors.jsonl").read_text().splitlines()) == 3


def test_a_file_name_that_is_not_utf8_is_recorded_once_and_the_rest_embedded(tmp_path, image_root):
    bad = image_root / "valid" / "bag" / os.fsdecode(b"caf\xe9.png")
    shutil.copy(next((image_root / "valid" / "bag").glob("*.png")), bad)
    summary = run(image_root, tmp_path / "out")
    errors = store.read_errors(store.split_dir(tmp_path / "out", "valid"))
    assert [(e["path"], e["label"]) for e in errors] == [("valid/bag/caf\\xe9.png", "bag")]
    assert "UTF-8" in errors[0]["error"] and summary["errors"] == 1
    listed = len(list_split(image_root, "train")) + len(list_split(image_root, "valid"))
    assert summary["images"] == listed and summary["listing"]["valid"]["invalid_names"] == [errors[0]["path"]]
    again = run(image_root, tmp_path / "out")  # recorded once, not again
    assert again["images"] == 0 and again["errors"] == 0
    assert len((tmp_path / "out" / "split=valid" / "_errors.jsonl").read_text().splitlines()) == 1


def test_kill_9_then_resume_embeds_each_image_once(tmp_path):
    out = tmp_path / "out"
    args = ["model=tiny", f"output_dir={out}", "progress=false", "batch_size=4", "rows_per_part=8", "num_workers=1"]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.embed", *args], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not store.parts(store.split_dir(out, "train")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = all_paths(out, "train") + all_paths(out, "valid")
    assert 0 < len(before) < 300, "the kill should land partway through the job"
    result = embed_cli(*args)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["already_done"] == len(before) and summary["images"] == 300 - len(before)
    after = all_paths(out, "train") + all_paths(out, "valid")
    assert len(after) == len(set(after)) == 300
    assert not list(out.glob("*/.*.tmp"))


def test_another_model_into_the_same_directory_is_refused(tmp_path, image_root, tiny_checkpoint):
    run(image_root, tmp_path / "out", splits=["valid"])
    with pytest.raises(store.StoreMismatchError, match="model: 'tiny' there"):
        run(image_root, tmp_path / "out", model=str(tiny_checkpoint), splits=["valid"])
    with pytest.raises(store.StoreMismatchError, match="dtype"):
        run(image_root, tmp_path / "out", dtype="bfloat16", splits=["valid"])
    summary = run(image_root, tmp_path / "out", model=str(tiny_checkpoint), splits=["valid"], overwrite=True)
    assert summary["images"] == len(list_split(image_root, "valid"))
    assert store.read_split(tmp_path / "out", "valid").metadata["model"] == str(tiny_checkpoint)


def test_shards_fill_one_directory(tmp_path, image_root):
    for index in range(3):
        summary = run(image_root, tmp_path / "out", shard_index=index, shard_count=3)
        assert (tmp_path / "out" / f"_summary-shard{index}of3.json").exists()
        assert summary["settings"]["shard_index"] == index
    for split in ("train", "valid"):
        paths = all_paths(tmp_path / "out", split)
        assert sorted(paths) == [r.path for r in list_split(image_root, split)]


def test_cli_errors_are_one_line(tmp_path):
    result = embed_cli("model.name_or_path=/nonexistent/siglip", f"output_dir={tmp_path}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: model.name_or_path='/nonexistent/siglip': no such directory" in result.stderr
    result = embed_cli("model=tiny", "dataset=imagenet", f"dataset.root={tmp_path / 'missing'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "missing/train does not exist" in result.stderr
    result = embed_cli("model=tiny", "dataset=imagenet")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: dataset.root is required" in result.stderr


def test_an_output_in_the_old_layout_is_refused_then_converted(tmp_path, image_root):
    """An output of pipelines 0.1 gets one line naming the conversion, before anything is written; converted,
    the same command resumes it (nothing embedded twice)."""
    out = tmp_path / "out"
    run(image_root, out, splits=["valid"])
    for split_folder in out.glob("split=*"):  # back to the layout before 0.2.0
        split_folder.rename(out / split_folder.name.removeprefix("split="))
    (out / store.MANIFEST).rename(out / "embeddings.json")
    (out / store.SUMMARY).rename(out / "summary.json")
    before = sorted(p.relative_to(out) for p in out.rglob("*") if not p.name.startswith(".lock"))
    result = embed_cli("model=tiny", f"dataset.root={image_root}", "splits=[valid]", f"output_dir={out}",
                       "progress=false", "num_workers=0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {out} is in the layout before version 0.2 (embeddings.json, summary.json, valid/); convert it in "
        f"place with `python -m pipelines.upgrade {out}` (renames only), then rerun")
    assert sorted(p.relative_to(out) for p in out.rglob("*") if not p.name.startswith(".lock")) == before
    converted = subprocess.run([sys.executable, "-m", "pipelines.upgrade", str(out)], check=False, capture_output=True,
                               text=True, timeout=120)
    assert converted.returncode == 0, converted.stderr
    again = run(image_root, out, splits=["valid"])
    assert again["images"] == 0 and again["already_done"] == len(list_split(image_root, "valid"))
    assert sorted(all_paths(out, "valid")) == [r.path for r in list_split(image_root, "valid")]
