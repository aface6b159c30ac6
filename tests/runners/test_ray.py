"""The Ray runner against the local one: same rows and errors, exact resume after a kill, no Ray left behind.

One local Ray (2 CPUs, 200 MB object store) serves the in-process tests and a killed subprocess that joins it;
one more starts and stops inside a CLI run. Every Ray started here gets its own RAY_TMPDIR, which all of its
processes inherit, so the tests can find and check each process it started.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
from helpers import hostile_files
from helpers.jobs import LOCAL_RAY, ray_cli_env, ray_embed_args, runner_job
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipelines import store
from pipelines.config import CONF_DIR, REPO_ROOT, UserError
from pipelines.data import list_split
from pipelines.embed import run_embed
from pipelines.runners import ray as ray_runner
from pipelines.siglip import EncoderSpec

SAMPLE = REPO_ROOT / "data" / "sample"
SPLITS = ["train", "valid"]
JOB = {"model": "tiny", "device": "cpu", "batch_size": 16, "num_workers": 1, "progress": False}


def ray_processes(marker: str) -> list[psutil.Process]:
    """Live processes, other than this one, whose environment has RAY_TMPDIR=marker."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE \
                    and proc.environ().get("RAY_TMPDIR") == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def assert_all_stopped(marker: str, *, timeout: float = 20.0) -> None:
    """Wait for every process of the Ray at `marker` to exit; kill and fail on any that outlive `timeout`."""
    deadline = time.monotonic() + timeout
    while (left := ray_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    names = [f"{p.pid} {p.name()}" for p in left]
    for proc in left:
        proc.kill()
    assert not names, f"Ray processes still running after the job: {names}"


def short_tmpdir() -> str:
    # Ray's Unix socket paths live under RAY_TMPDIR and must fit in 107 bytes.
    return tempfile.mkdtemp(prefix="rt-", dir="/tmp")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray started by the runner's own `connect`; yields its address, then stops it and checks."""
    import ray

    marker = short_tmpdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", marker)
        patch.delenv("RAY_ADDRESS", raising=False)
        ray_runner.connect(address=None, **LOCAL_RAY)
        try:
            assert {"raylet", "gcs_server"} <= {p.name() for p in ray_processes(marker)}  # the check below can see them
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()
            assert_all_stopped(marker)
            shutil.rmtree(marker, ignore_errors=True)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory, photo_bytes) -> Path:
    """data/sample (300 PNGs), the real photos in ImageNet's formats, and two files that cannot be decoded."""
    root = tmp_path_factory.mktemp("ray-data") / "images"
    shutil.copytree(SAMPLE, root, ignore=shutil.ignore_patterns("*.md"))
    for i, (name, data) in enumerate(sorted(photo_bytes.items())):
        (root / SPLITS[i % 2] / "bag" / name).write_bytes(data)
    first_png = min((SAMPLE / "train" / "coat").glob("*.png"))
    (root / "train" / "coat" / "truncated.png").write_bytes(first_png.read_bytes()[:40])
    (root / "valid" / "sandal" / "empty.jpg").write_bytes(b"")
    return root


def ray_runner_for_tests(**settings):
    """conf/runner/ray.yaml's runner: one CPU actor, on the shared local Ray (LOCAL_RAY's size)."""
    config = OmegaConf.load(Path(CONF_DIR) / "runner" / "ray.yaml")
    return instantiate(config, _convert_="all", **{"num_actors": 1, "num_gpus_per_actor": 0, **LOCAL_RAY, **settings})


def sorted_errors(output_dir: Path, split: str) -> list[dict[str, str]]:
    return sorted(store.read_errors(store.split_dir(output_dir, split)), key=lambda e: e["path"])


@pytest.mark.job
def test_cli_starts_a_local_ray_and_stops_it(image_root, tmp_path):
    # First in the file: it runs before the shared Ray below starts, so two never share the 2 cores.
    marker = short_tmpdir()
    env = ray_cli_env(marker)
    command = ray_embed_args(image_root, tmp_path / "out")
    try:
        done = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "images embedded, 0 errors" in done.stdout
        for split in SPLITS:
            assert store.read_split(tmp_path / "out", split).paths == [r.path for r in list_split(image_root, split)]
        assert_all_stopped(marker)
    finally:
        shutil.rmtree(marker, ignore_errors=True)


@pytest.mark.job
def test_a_file_that_segfaults_the_decoder_is_an_error_record_on_ray(image_root, tmp_path):
    # Every process of the job decodes 8-bit PNGs with torchvision's raw decoder (hostile_files.write_crash_hook),
    # which really segfaults on the crash PNG: the decode task's child dies, the task and the job go on.
    hostile_files.write_crash_png(image_root / "train" / "bag" / "crash.png")
    hostile_files.write_crash_hook(tmp_path / "hook")
    marker = short_tmpdir()
    env = ray_cli_env(marker, pythonpath=tmp_path / "hook")
    command = ray_embed_args(image_root, tmp_path / "out")
    try:
        done = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        out = tmp_path / "out"
        errors = store.read_errors(store.split_dir(out, "train"))
        assert errors == [{"path": "train/bag/crash.png", "label": "bag",
                           "error": "DecodeError: decoder crashed (signal 11)"}]
        listed = {r.path for r in list_split(image_root, "train")}
        assert sorted(store.read_split(tmp_path / "out", "train").paths) == sorted(listed - {"train/bag/crash.png"})
        assert_all_stopped(marker)  # the decoder children too: they exit with their worker
    finally:
        shutil.rmtree(marker, ignore_errors=True)


@pytest.mark.job
def test_ray_writes_what_the_local_runner_writes(ray_cluster, dataset_root, tmp_path, monkeypatch):
    local = run_embed(root=dataset_root, splits=SPLITS, output_dir=tmp_path / "local", **JOB)
    with monkeypatch.context() as patch:  # the driver never loads weights; the actors (other processes) do
        patch.setattr(EncoderSpec, "load", lambda spec: pytest.fail(f"the Ray driver loaded {spec}"))
        on_ray = run_embed(root=dataset_root, splits=SPLITS, output_dir=tmp_path / "ray",
                           runner=ray_runner_for_tests(), **JOB)

    assert on_ray["images"] == local["images"] > 300 and on_ray["errors"] == local["errors"] == 2
    assert json.loads((tmp_path / "ray" / store.MANIFEST).read_text()) == json.loads(
        (tmp_path / "local" / store.MANIFEST).read_text())
    for split in SPLITS:
        a, b = store.read_split(tmp_path / "local", split), store.read_split(tmp_path / "ray", split)
        assert b.paths == a.paths and b.labels == a.labels and b.metadata == a.metadata
        cosine = np.sum(a.embeddings * b.embeddings, 1) / (
            np.linalg.norm(a.embeddings, axis=1) * np.linalg.norm(b.embeddings, axis=1))
        assert cosine.min() >= 0.9999
        assert sorted_errors(tmp_path / "ray", split) == sorted_errors(tmp_path / "local", split)
        # Same schema and footer in every part, whichever runner wrote it.
        schemas = {pq.read_schema(p) for d in ("local", "ray")
                   for p in store.parts(store.split_dir(tmp_path / d, split))}
        assert len({(s.to_string(show_schema_metadata=False), s.metadata[store.METADATA_KEY]) for s in schemas}) == 1
    planted = {e["path"] for split in SPLITS for e in store.read_errors(store.split_dir(tmp_path / "ray", split))}
    assert planted == {"train/coat/truncated.png", "valid/sandal/empty.jpg"}


@pytest.mark.job
def test_rerun_after_kill_embeds_only_what_is_missing(ray_cluster, dataset_root, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipelines.embed", "model=tiny", "device=cpu", "runner=ray",
               f"runner.address={ray_cluster}", "runner.num_actors=1", f"dataset.root={dataset_root}",
               f"output_dir={out}", "batch_size=8", "rows_per_part=8", "progress=false"]
    job = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not store.parts(store.split_dir(out, "train")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    _, stderr = job.communicate(timeout=30)
    assert job.returncode == -signal.SIGKILL, stderr.decode()[-2000:]

    summary = run_embed(root=dataset_root, splits=SPLITS, output_dir=out, runner=ray_runner_for_tests(), **JOB)

    assert summary["already_done"] > 0 and summary["images"] > 0  # some work was kept, the rest was done now
    for split in SPLITS:
        listed = {r.path for r in list_split(dataset_root, split)}
        embedded = store.read_split(out, split).paths
        error_lines = (store.split_dir(out, split) / store.ERRORS).read_text().splitlines()
        errors = [json.loads(line)["path"] for line in error_lines]
        assert len(embedded) == len(set(embedded)) and len(errors) == len(set(errors)) == 1
        assert set(embedded) | set(errors) == listed and not set(embedded) & set(errors)
        assert not list(store.split_dir(out, split).glob(".*.tmp"))


@pytest.mark.job
def test_actors_default_to_cpu_without_gpus_and_a_gpu_request_is_refused(ray_cluster):
    assert ray_runner.resolve_actors(num_actors="auto", num_gpus_per_actor="auto", num_cpus_per_actor=1) == (0.0, 1)
    assert ray_runner.resolve_actors(num_actors=3, num_gpus_per_actor=0, num_cpus_per_actor=1) == (0.0, 3)
    with pytest.raises(UserError, match="num_gpus_per_actor=1.0: the Ray cluster has 0 GPU"):
        ray_runner.resolve_actors(num_actors="auto", num_gpus_per_actor=1, num_cpus_per_actor=1)
    with pytest.raises(UserError, match="num_actors=0"):
        ray_runner.resolve_actors(num_actors=0, num_gpus_per_actor=0, num_cpus_per_actor=1)


@pytest.mark.job
def test_a_local_ray_works_at_the_jobs_priority_and_cpu_actors_share_out_the_cpus(ray_cluster):
    import ray

    # Ray's default would start the workers at nice 15: the job's work would yield to anything else on the host.
    assert ray.get(ray.remote(num_cpus=1)(lambda: os.nice(0)).remote()) == os.nice(0)
    assert ray_runner.actor_threads(num_actors=1, num_cpus_per_actor=1) == 2  # LOCAL_RAY: 2 CPUs
    assert ray_runner.actor_threads(num_actors=2, num_cpus_per_actor=1) == 1
    assert ray_runner.actor_threads(num_actors=1, num_cpus_per_actor=4) == 4


@pytest.mark.job
def test_num_workers_caps_the_decode_tasks_and_0_is_refused(ray_cluster, tmp_path):
    records = list_split(SAMPLE, "train")
    for num_workers, tasks in (("auto", None), (3, 3)):
        job = runner_job(SAMPLE, tmp_path, num_workers=num_workers)
        embedded = ray_runner.build_dataset({"train": records}, job=job, preprocess=job.encoder.preprocess(),
                                            metadata=job.encoder.metadata(), num_actors=1, num_gpus_per_actor=0,
                                            num_cpus_per_actor=1)
        decode = embedded._logical_plan.dag.input_dependencies[0]  # the stage before the actors'
        assert decode.compute.size == tasks
    with pytest.raises(UserError, match="^num_workers=0: runner=ray decodes in Ray tasks; expected auto or"):
        ray_runner_for_tests()(runner_job(SAMPLE, tmp_path / "out", num_workers=0), {"train": records})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("choice, target", [(None, "pipelines.runners.local"), ("ray", "pipelines.runners.ray")])
def test_runner_config_group_binds_plain_settings(compose_cfg, choice, target):
    cfg = compose_cfg("embed", [f"runner={choice}"] if choice else [])
    runner = instantiate(cfg.runner, _convert_="all")
    assert isinstance(runner, functools.partial) and runner.func.__module__ == target
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in runner.keywords.values())


@pytest.mark.job
def test_ray_reads_shards_as_the_local_runner_does(ray_cluster, tmp_path):
    from helpers import shards
    from helpers.shards import add_member, sample_files

    from pipelines.sources.files import FileSource

    files = sample_files("valid")[:60]
    shards.write_img2dataset_webdataset(tmp_path / "wds", files, per_shard=25)
    with tarfile.open(tmp_path / "wds" / "00003.tar", "w") as tar:  # a hostile shard: one good, one not an image
        add_member(tar, "good.png", files[0].read_bytes())
        add_member(tar, "bad.png", b"not a png")
    source = FileSource.build(data_files={"train": str(tmp_path / "wds" / "*.tar")}, storage_options=None,
                              format="auto", image_extensions=["png"], image_column="auto", label="auto",
                              keep_columns=["key", "caption"], retries=1)
    settings = {**JOB, "splits": ["train"], "source": source, "root": None}
    local = run_embed(output_dir=tmp_path / "local", **settings)
    on_ray = run_embed(output_dir=tmp_path / "ray", runner=ray_runner_for_tests(), **settings)
    assert on_ray["images"] == local["images"] == 61 and on_ray["errors"] == local["errors"] == 1
    a, b = pd.read_parquet(tmp_path / "local"), pd.read_parquet(tmp_path / "ray")
    a, b = a.set_index("path").sort_index(), b.set_index("path").sort_index()
    assert list(a.index) == list(b.index)
    assert a[["label", "key", "caption"]].fillna("-").equals(b[["label", "key", "caption"]].fillna("-"))
    assert pd.isna(a.loc["00003.tar/good"].label) and a.label.notna().sum() == 60  # a shard without cls members
    assert np.allclose(np.stack(a.embedding.to_numpy()), np.stack(b.embedding.to_numpy()), atol=1e-5)
    assert sorted_errors(tmp_path / "ray", "train") == sorted_errors(tmp_path / "local", "train")
    again = run_embed(output_dir=tmp_path / "ray", runner=ray_runner_for_tests(), **settings)
    assert again["images"] == again["errors"] == 0
