"""The package as a user installs it: a wheel built from this repository, installed into a fresh folder and run from
a working directory outside the checkout (embed, validate, serve); and the extras' dependency sets."""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers.server import READY, session_processes
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipelines.config import REPO_ROOT
from pipelines.errors import UserError

# What a wheel build must not see: environments, outputs and caches of this checkout.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "outputs", "multirun", "build", "dist", "*.egg-info",
                                    "__pycache__", ".pytest_cache", ".ipynb_checkpoints")


def pip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], check=False, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so that the build leaves no build/ or egg-info in the checkout
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCE, symlinks=True)
    # No build isolation: setuptools from this environment (the test extra), so that no index is needed.
    built = pip("wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(root / "wheels"))
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = (root / "wheels").glob("siglip_pipelines-*.whl")
    return found


@pytest.fixture(scope="module")
def fresh(wheel, tmp_path_factory) -> Path:
    """The wheel installed (no dependencies) into an empty folder: the folder."""
    target = tmp_path_factory.mktemp("install") / "fresh"
    installed = pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return target


def fresh_env(target: Path) -> dict[str, str]:
    # PYTHONPATH first on sys.path: `pipelines` comes from the target, not from this checkout's editable install.
    return {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}


def run_module(target: Path, cwd: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], check=False, cwd=cwd, env=fresh_env(target),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.job
def test_the_wheel_runs_embed_and_validate_from_any_directory(fresh, tmp_path):
    # Which copy of the package a plain import finds, and where it looks for the shipped folders.
    probe = ("import json, pipelines, pipelines.config as c; print(json.dumps("
             "[pipelines.__file__, c.CONF_DIR, c.repo_path('data/sample'), c.repo_path('out/x')]))")
    where = subprocess.run([sys.executable, "-c", probe], check=False, cwd=tmp_path, env=fresh_env(fresh), capture_output=True, text=True,
                           timeout=120)
    assert where.returncode == 0, where.stderr
    module, conf, sample, output = map(Path, json.loads(where.stdout))
    assert module.is_relative_to(fresh) and conf.is_relative_to(fresh) and sample.is_relative_to(fresh)
    assert (conf / "embed.yaml").is_file() and len(list(sample.glob("*/*/*.png"))) == 300
    assert output == tmp_path / "out" / "x"  # outputs go to the working directory, never into the install

    shown = run_module(fresh, tmp_path, "pipelines.embed", "model=tiny", "--cfg", "job")
    assert shown.returncode == 0, shown.stderr
    assert f"root: {sample}" in shown.stdout and "${" not in shown.stdout

    output_dir = tmp_path / "embeddings"
    embedded = run_module(fresh, tmp_path, "pipelines.embed", "model=tiny", f"output_dir={output_dir}",
                          "progress=false", "num_workers=1")
    assert embedded.returncode == 0, embedded.stdout + embedded.stderr
    assert "300 images embedded, 0 errors" in embedded.stdout
    validated = run_module(fresh, tmp_path, "pipelines.validate", "model=tiny", f"embeddings_dir={output_dir}")
    assert validated.returncode == 0, validated.stdout + validated.stderr
    report = json.loads(output_dir.with_name(output_dir.name + "-validation").joinpath("report.json").read_text())
    assert report["num_train"] == 100 and report["num_query"] == 200
    assert not list(fresh.rglob("outputs")) and not (tmp_path / "multirun.yaml").exists()


@pytest.mark.job
@pytest.mark.server
def test_the_wheel_serves_from_any_directory(fresh, tmp_path, photo_bytes):
    import tritonclient.http as httpclient

    # A canary in the installed copy: every process that imports `pipelines` from it leaves its pid in `imported`.
    imported = tmp_path / "imported"
    imported.mkdir()
    init = fresh / "pipelines" / "__init__.py"
    init.write_text(init.read_text() + f"\nimport os as _os\nopen(_os.path.join({str(imported)!r}, str(_os.getpid())), 'w').close()\n")
    log = tmp_path / "serve.out"
    with open(log, "wb") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "pipelines.serve", "model=tiny", "http_port=0", "grpc_port=0",
             "address=127.0.0.1", "echo_log=false", "num_threads=1", f"run_dir={tmp_path / 'run'}"],
            cwd=tmp_path, env=fresh_env(fresh), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        match = wait_ready(launcher, log)
        server_pid, http_port = int(match.group(1)), int(match.group(2))
        # The Python backend stubs (and their decoder children) import `pipelines` from the installed copy too.
        python = [pid for pid in session_processes(server_pid) if pid != server_pid]
        assert len(python) >= 2, python  # one stub per model
        assert str(launcher.pid) in os.listdir(imported)
        assert {str(pid) for pid in python} <= set(os.listdir(imported)), (python, os.listdir(imported))
        client = httpclient.InferenceServerClient(f"localhost:{http_port}")
        image = httpclient.InferInput("IMAGE", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[photo_bytes["flower.png"]]], dtype=object))
        embedding = client.infer("embed_image", [image]).as_numpy("EMBEDDING")
        assert embedding.shape == (1, 32) and np.isfinite(embedding).all()
    finally:
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(120)
    assert code == 0, log.read_text(errors="replace")


def wait_ready(launcher: subprocess.Popen, log: Path, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = READY.search(log.read_text(errors="replace"))
        if match:
            return match
        if launcher.poll() is not None:
            pytest.fail(f"serve exited ({launcher.returncode}) before ready:\n{log.read_text(errors='replace')}")
        time.sleep(0.2)
    pytest.fail(f"serve not ready after {timeout} s:\n{log.read_text(errors='replace')}")


# ---------------------------------------------------------------- what each extra installs


def wheel_requirements(wheel: Path) -> dict[str, list[Requirement]]:
    """The wheel's requirements per extra ('' = the core), its own extras expanded (dev = test + serve + ...)."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.HeaderParser().parsestr(archive.read(name).decode())
    listed = [Requirement(line) for line in metadata.get_all("Requires-Dist")]
    extras = metadata.get_all("Provides-Extra")

    def of(extra: str) -> list[Requirement]:
        direct = [r for r in listed if (r.marker is None) == (extra == "")
                  and (r.marker is None or r.marker.evaluate({"extra": extra}))]
        own = [r for r in direct if canonicalize_name(r.name) == "siglip-pipelines"]
        return [r for r in direct if r not in own] + [x for r in own for e in sorted(r.extras) for x in of(e)]

    return {extra: of(extra) for extra in ["", *extras]}


def faiss_of(requirements: list[Requirement]) -> set[str]:
    return {canonicalize_name(r.name) for r in requirements if canonicalize_name(r.name).startswith("faiss")}


def test_each_extra_brings_at_most_one_faiss(wheel):
    requirements = wheel_requirements(wheel)
    core = requirements[""]
    assert faiss_of(core) == set()  # so that the gpu extra replaces the CPU wheel instead of landing beside it
    assert faiss_of(requirements["cpu"]) == {"faiss-cpu"}
    assert faiss_of(requirements["gpu"]) == {"faiss-gpu-cu12"}
    for extra, extra_requirements in requirements.items():
        if extra not in ("cpu", "gpu"):
            assert len(faiss_of(core + extra_requirements)) <= 1, extra


def test_torch_and_torchvision_bounds_admit_only_matching_pairs(wheel):
    core = {canonicalize_name(r.name): r.specifier for r in wheel_requirements(wheel)[""]}
    torch_minors = {m for m in range(40) if core["torch"].contains(f"2.{m}.0")}
    vision_minors = {m for m in range(60) if core["torchvision"].contains(f"0.{m}.0")}
    assert len(torch_minors) == 1, core["torch"]  # torchvision's metadata only asks for torch>=2.N: one pair
    assert vision_minors == {m + 15 for m in torch_minors}, (core["torch"], core["torchvision"])
    (minor,) = torch_minors
    assert core["torch"].contains(f"2.{minor}.9") and core["torchvision"].contains(f"0.{minor + 15}.9")


def test_faiss_missing_is_one_line_naming_the_extra(monkeypatch):
    from pipelines import knn

    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError, as without the wheel
    with pytest.raises(UserError, match=r"knn=faiss needs FAISS .*siglip-pipelines\[cpu\]") as raised:
        knn.make_backend("faiss")
    assert "\n" not in str(raised.value)


def test_two_faiss_wheels_are_refused_in_one_line(monkeypatch, tmp_path):
    from pipelines import knn

    # What pip leaves when both wheels went in: two distributions' records (the shared files are not needed).
    for name, version in (("faiss_cpu", "1.15.1"), ("faiss_gpu_cu12", "1.12.0")):
        record = tmp_path / f"{name}-{version}.dist-info"
        record.mkdir()
        (record / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"faiss-cpu 1\.15\.1 and faiss-gpu-cu12 1\.12\.0 are both installed") as raised:
        knn.make_backend("faiss")
    assert "\n" not in str(raised.value) and "pip uninstall" in str(raised.value)


@pytest.mark.network
def test_the_gpu_extra_resolves_to_one_faiss_that_imports(tmp_path):
    """Resolve `.[gpu,serve]` from the index as a CUDA host would, then import FAISS from the GPU wheel alone."""
    report = tmp_path / "report.json"
    resolved = pip("install", "--dry-run", "--ignore-installed", "--no-build-isolation", "--quiet",
                   "-c", str(REPO_ROOT / ".ci" / "constraints.txt"), "--report", str(report),
                   f"{REPO_ROOT}[gpu,serve]", timeout=600)
    assert resolved.returncode == 0, resolved.stderr
    install = {canonicalize_name(item["metadata"]["name"]): item for item in json.loads(report.read_text())["install"]}
    assert {name for name in install if name.startswith("faiss")} == {"faiss-gpu-cu12"}
    # The GPU wheel with the CUDA libraries it names (not torch's): enough to import it and search on the CPU.
    faiss_gpu = install["faiss-gpu-cu12"]
    needs = {canonicalize_name(Requirement(r).name) for r in faiss_gpu["metadata"].get("requires_dist", [])
             if Requirement(r).marker is None or Requirement(r).marker.evaluate({"extra": ""})}
    urls = [faiss_gpu["download_info"]["url"], *(install[n]["download_info"]["url"] for n in sorted(needs)
                                                  if n.startswith("nvidia-"))]
    target = tmp_path / "faiss-gpu"
    installed = pip("install", "--no-deps", "--quiet", "--target", str(target), *urls, timeout=600)
    assert installed.returncode == 0, installed.stderr
    probe = ("import faiss, numpy as np; x = np.eye(4, 8, dtype='float32'); i = faiss.IndexFlatL2(8); i.add(x); "
             "print(faiss.__file__, hasattr(faiss, 'StandardGpuResources'), i.search(x, 1)[1].ravel().tolist())")
    imported = subprocess.run([sys.executable, "-c", probe], check=False, cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(target)})
    assert imported.returncode == 0, imported.stderr
    where, gpu, found = imported.stdout.split(maxsplit=2)
    assert Path(where).is_relative_to(target) and gpu == "True" and json.loads(found) == [0, 1, 2, 3]
