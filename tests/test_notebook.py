"""notebooks/results.ipynb: up to date with its generator, and it runs end to end on the sample data."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from pipelines.config import REPO_ROOT

NOTEBOOKS = REPO_ROOT / "notebooks"


def generator():
    spec = importlib.util.spec_from_file_location("make_results", NOTEBOOKS / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebook_matches_its_generator():
    committed = nbformat.read(NOTEBOOKS / "results.ipynb", as_version=4)
    built = generator().build()
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells]
    nbformat.validate(committed)


@pytest.mark.job
def test_notebook_executes_on_the_sample(tmp_path, monkeypatch):
    """Embeds data/sample with the tiny model, validates, draws every figure, and leaves no temporary folder;
    the kernel is this interpreter."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's temporary embeddings land here
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # no display: render with Agg
    nb = nbformat.read(NOTEBOOKS / "results.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('kernel:', sys.executable)"))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "top-1" in text and "worst classes by top-1" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # the saved per-class figure, the neighbour grid, the PCA scatter
    # The demo's embeddings went to a temporary folder under TMPDIR, gone once the kernel stopped.
    (embeddings,) = (Path(line.split(": ", 1)[1]) for line in text.splitlines() if line.startswith("embeddings: "))
    assert embeddings.is_relative_to(tmp_path) and embeddings.name == "sample-tiny"
    assert not embeddings.parent.exists() and not list(tmp_path.glob("siglip-notebook-*"))
    assert f"kernel: {sys.executable}" in text  # the project's interpreter, not whatever `python` is on PATH
