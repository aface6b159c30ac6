"""`runner=ray` on a three-node Ray cluster made on this machine (a head and two worker nodes, each its own raylet,
started by Ray's `cluster_utils.Cluster`): the CLI joins it with `runner.address`, the worker node running the
encoder actor is removed mid-job, and every image is still embedded exactly once.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time

import psutil
import pytest
from helpers.jobs import embed_args

from pipelines import store
from pipelines.config import REPO_ROOT
from pipelines.data import list_split

SPLITS = ["train", "valid"]
# Quick to notice a dead node: the default takes about 30 s.
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                      "health_check_timeout_ms": 1000, "health_check_failure_threshold": 2}


@pytest.fixture()
def cluster(monkeypatch):
    """A head without CPUs (it only holds the driver, as on a real cluster) and two worker nodes of 2 CPUs each."""
    from ray.cluster_utils import Cluster

    marker = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # Ray's socket paths must stay short
    monkeypatch.setenv("RAY_TMPDIR", marker)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    nodes = {"num_cpus": 2, "object_store_memory": 100 * 2**20}
    made = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 100 * 2**20, "include_dashboard": False,
        "_system_config": FAST_HEALTH_CHECKS})
    try:
        made.add_node(**nodes)
        made.add_node(**nodes)
        made.wait_for_nodes()
        yield made
    finally:
        made.shutdown()
        shutil.rmtree(marker, ignore_errors=True)


def actor_node(cluster, job: subprocess.Popen, *, timeout: float = 120.0):
    """The worker node whose raylet runs the encoder actor (found by its process title) once it runs."""
    raylets = {node.all_processes["raylet"][0].process.pid: node for node in cluster.worker_nodes}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.poll() is None:
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if "EmbedActor" in " ".join(proc.info["cmdline"] or ()):
                    parents = {p.pid for p in proc.parents()}
                    found = [node for pid, node in raylets.items() if pid in parents]
                    if found:
                        return found[0]
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError("the encoder actor did not start on a worker node")


@pytest.mark.job
def test_a_worker_node_lost_mid_job_costs_no_image_and_writes_none_twice(cluster, tmp_path):
    root = REPO_ROOT / "data" / "sample"
    out = tmp_path / "out"
    command = embed_args(out, "device=cpu", "runner=ray", f"runner.address={cluster.address}", "runner.num_actors=1",
                         "runner.log_to_driver=false", f"dataset.root={root}", "batch_size=8", "rows_per_part=8",
                         "num_workers=2")
    job = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = actor_node(cluster, job)
        deadline = time.monotonic() + 120
        while not store.parts(store.split_dir(out, "train")) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.poll() is None, "the job ended before a node could be removed"
        cluster.remove_node(victim, allow_graceful=False)  # the actor and the decode tasks on it die with it
        stdout, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr[-3000:]
    assert len(cluster.worker_nodes) == 1
    for split in SPLITS:
        embedded = store.read_split(out, split).paths
        assert sorted(embedded) == sorted(r.path for r in list_split(root, split))  # each once, none missing
        assert not store.read_errors(store.split_dir(out, split))
    assert "images embedded, 0 errors" in stdout
