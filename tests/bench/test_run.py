"""pipelines/bench/run.py and `python -m pipelines.bench`: each measured part, the JSON and report, clear errors;
small and on CPU, with conf/bench.yaml's settings."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pipelines import store
from pipelines.bench.flops import count_flops
from pipelines.bench.report import format_report
from pipelines.bench.run import bench_options, run_bench
from pipelines.config import REPO_ROOT, UserError
from pipelines.data import decode
from pipelines.siglip import load_encoder

SMALL = ["preprocess.images=6", "preprocess.rounds=1", "sweep.dtypes=[float32]", "sweep.batch_sizes=[4,8]",
         "sweep.compile=[false]", "sweep.warmup=1", "sweep.iters=1", "sweep.repeats=1", "embed.images=20",
         "embed.batch_size=8", "embed.num_workers=1", "embed.device_decode=[false,true]", "embed.rounds=1",
         "writer.rows=50", "writer.batch_size=8", "writer.rows_per_part=20"]


@pytest.fixture()
def settings(compose_cfg):
    """conf/bench.yaml with `overrides` (on the CPU), as `run_bench`'s keyword arguments."""

    def make(*overrides: str) -> dict:
        cfg = compose_cfg("bench", ["device=cpu", *overrides])
        return bench_options(OmegaConf.to_container(cfg, resolve=True))

    return make


@pytest.mark.job
def test_run_bench_measures_every_part(tmp_path, settings):
    output = tmp_path / "bench.json"
    results = run_bench(**settings(*SMALL, f"output={output}", f"work_dir={tmp_path / 'work'}"))
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
def test_job_embeddings_are_the_models(tmp_path, settings):
    """The job timed in (c) is the real job: its Parquet holds the encoder's embeddings of the generated files."""
    run_bench(**settings(*SMALL, "embed.device_decode=[false]", "parts=[embed]", f"output={tmp_path / 'b.json'}",
                         f"work_dir={tmp_path}"))
    written = store.read_split(tmp_path / "embed-out", "train")
    encoder = load_encoder("tiny", device="cpu", dtype="float32")
    folder = next(tmp_path.glob("jpegs-*"))
    pixels = torch.stack([encoder.preprocess.resize(decode((folder / p).read_bytes())) for p in written.paths])
    np.testing.assert_allclose(written.embeddings, encoder.embed_uint8(pixels).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [("parts=[model,gpu]", "parts="), ("embed.batch_size=0", "embed.batch_size=0"),
     ("sweep.batch_sizes=[8,-1]", r"sweep.batch_sizes\[1\]=-1"), ("embed.image_size=[500]", "embed.image_size"),
     ("embed.num_workers=many", "embed.num_workers='many'"), ("sweep.dtypes=[banana]", "dtype='banana'")],
)
def test_bad_settings_are_named(tmp_path, settings, change, message):
    with pytest.raises(UserError, match=message):
        run_bench(**settings(change, f"output={tmp_path / 'b.json'}", f"work_dir={tmp_path}"))
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
