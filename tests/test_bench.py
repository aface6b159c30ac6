"""pipelines/bench.py: generated JPEGs, each measured part, the JSON and report, clear errors; small and on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import store
from pipelines.bench import (
    EmbedSettings,
    PreprocessSettings,
    SweepSettings,
    WriterSettings,
    bench_writer,
    count_flops,
    format_report,
    make_jpegs,
    peak_flops,
    run_bench,
)
from pipelines.config import REPO_ROOT, UserError
from pipelines.data import decode, list_split
from pipelines.siglip import load_encoder


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


def small_settings(**embed) -> dict:
    return {
        "preprocess": PreprocessSettings(images=6, rounds=1),
        "sweep": SweepSettings(dtypes=["float32"], batch_sizes=[4, 8], compile=[False], warmup=1, iters=1, repeats=1),
        "embed": EmbedSettings(**{"images": 20, "batch_size": 8, "num_workers": 1, "device_decode": [False, True],
                                  "rounds": 1, **embed}),
        "writer": WriterSettings(rows=50, batch_size=8, rows_per_part=20),
    }


@pytest.mark.job
def test_run_bench_measures_every_part(tmp_path):
    output = tmp_path / "bench.json"
    results = run_bench(model="tiny", device="cpu", output=output, work_dir=tmp_path / "work", **small_settings())
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    assert results["machine"]["cores"] >= 1 and results["peak_tflops"] is None

    pre = results["preprocess"]
    assert pre["max_abs_diff"] <= 1e-5 and pre["device_decode_max_abs_diff"] == 0.0
    rates = pre["images_per_s"]
    assert set(rates) == {"ours", "ours_worker", "processor_pil", "processor_tensor"} and min(rates.values()) > 0
    assert pre["speedup_vs_processor"] == pytest.approx(rates["ours"] / max(rates["processor_pil"],
                                                                            rates["processor_tensor"]))

    assert results["flops_per_image"] == count_flops(load_encoder("tiny", device="cpu").model, height=384, width=384)
    runs = results["model_alone"]
    assert [(r["dtype"], r["batch_size"], r["compile"]) for r in runs] == [("float32", 4, False), ("float32", 8, False)]
    for r in runs:
        assert r["images_per_s"] > 0 and r["mfu"] is None
        assert r["tflops"] == pytest.approx(r["images_per_s"] * results["flops_per_image"] / 1e12)

    jobs = results["embed"]
    assert [j["device_decode"] for j in jobs] == [False, True]
    for job in jobs:
        assert job["images"] == 20 and job["last_run"]["embedded"] == 20 and job["num_workers"] == 1
        assert job["vs_data_path"] == pytest.approx(job["images_per_s"] / job["data_path_images_per_s"])
        bound = min(job["model_alone_images_per_s"], rates["ours_worker"] * 1)
        assert job["bound_images_per_s"] == pytest.approx(bound)
    written = store.read_split(tmp_path / "work" / "embed-out", "train")
    assert len(written.paths) == 20 and np.isfinite(written.embeddings).all()

    assert results["writer"]["rows"] == 50 and results["writer"]["parts"] == 3
    report = format_report(results)
    for heading in ("(a) decode + preprocess", "(b) model alone", "(c) embed job", "(d) Parquet writer"):
        assert heading in report


@pytest.mark.job
def test_job_embeddings_are_the_models(tmp_path):
    """The job timed in (c) is the real job: its Parquet holds the encoder's embeddings of the generated files."""
    settings = small_settings(device_decode=[False])
    run_bench(model="tiny", device="cpu", parts=["embed"], output=tmp_path / "b.json", work_dir=tmp_path, **settings)
    written = store.read_split(tmp_path / "embed-out", "train")
    encoder = load_encoder("tiny", device="cpu", dtype="float32")
    folder = next(tmp_path.glob("jpegs-*"))
    pixels = torch.stack([encoder.preprocess.resize(decode((folder / p).read_bytes())) for p in written.paths])
    np.testing.assert_allclose(written.embeddings, encoder.embed_uint8(pixels).numpy(), rtol=1e-4, atol=1e-5)


def test_writer_alone_writes_what_it_was_given(tmp_path):
    metadata = {"model": "x", "embedding_dim": 16}
    figures = bench_writer(out_dir=tmp_path, dim=16, metadata=metadata,
                           settings=WriterSettings(rows=30, batch_size=7, rows_per_part=10))
    assert figures["rows"] == 30 and figures["parts"] == 3 and figures["rows_per_s"] > 0
    split = store.read_split(tmp_path, "train")
    assert split.embeddings.shape == (30, 16) and split.metadata == metadata
    expected = np.random.default_rng(0).standard_normal((30, 16), dtype=np.float32)
    order = np.argsort([int(p.rsplit("-", 1)[1].split(".")[0]) for p in split.paths])
    np.testing.assert_array_equal(split.embeddings[order], expected)


def test_peak_flops():
    assert peak_flops(torch.device("cpu"), "auto") is None
    assert peak_flops(torch.device("cpu"), 100) == 100e12
    with pytest.raises(UserError, match="peak_tflops='fast'"):
        peak_flops(torch.device("cpu"), "fast")


@pytest.mark.parametrize(
    ("change", "message"),
    [({"parts": ["model", "gpu"]}, "parts="), ({"embed": EmbedSettings(batch_size=0)}, "embed.batch_size=0"),
     ({"sweep": SweepSettings(batch_sizes=[8, -1])}, r"sweep.batch_sizes\[1\]=-1"),
     ({"embed": EmbedSettings(image_size=[500])}, "embed.image_size")],
)
def test_bad_settings_are_named(tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        run_bench(model="tiny", device="cpu", output=tmp_path / "b.json", work_dir=tmp_path, **change)
    assert not (tmp_path / "b.json").exists()


def bench_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.bench", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.job
def test_cli_prints_the_report_and_writes_json(tmp_path):
    result = bench_cli(f"work_dir={tmp_path}", "parts=[preprocess,model,writer]", "device=cpu",
                       "preprocess.images=4", "preprocess.rounds=1", "sweep.iters=1", "sweep.repeats=1",
                       "sweep.batch_sizes=[2]", "writer.rows=20")
    assert result.returncode == 0, result.stderr
    assert "(a) decode + preprocess" in result.stdout and "(b) model alone" in result.stdout
    figures = json.loads((tmp_path / "bench-tiny.json").read_text())
    assert figures["model_alone"][0]["batch_size"] == 2 and "embed" not in figures
    assert figures["command"].startswith("python -m pipelines.bench work_dir=")


def test_cli_bad_value_is_one_line(tmp_path):
    result = bench_cli(f"work_dir={tmp_path}", "parts=[model,gpu]")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: parts=['model', 'gpu']: choose from preprocess, model, embed, writer"]
