"""README's reading recipes, run as written: pyarrow, pandas, polars and duckdb open an embed output whole and get
exactly the embedded rows with a `split` column, though the output holds an errors file, summaries and locks, and a
validation run lies beside it."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipelines import store
from pipelines.config import REPO_ROOT
from pipelines.data import list_split
from pipelines.embed import run_embed
from pipelines.validate import run_validate

pytestmark = pytest.mark.job

OUTPUT = "outputs/sample-tiny"  # the recipes' path, relative to the working directory the test gives them
PLANTED = {"valid/bag/broken.jpg": b"\xff\xd8\xff\xe0" + bytes(64), "train/trouser/empty.png": b""}
READERS = ("pyarrow", "pandas", "polars", "duckdb")


def readme_recipes() -> dict[str, str]:
    """The python blocks of the README's Output section, by the reader each imports ('store' for read_split)."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Output\n"):text.index("## Validation: 10-shot k-NN")]
    recipes = {}
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL):
        reader = next(name for name in (*READERS, "store")
                      if re.search(rf"^(import|from) [\w.]*\b{name}\b", block, flags=re.MULTILINE))
        assert reader not in recipes, f"two README recipes for {reader}"
        recipes[reader] = block
    assert sorted(recipes) == sorted((*READERS, "store"))
    return recipes


@pytest.fixture()
def output(tmp_path, image_root, monkeypatch) -> Path:
    """A real output of the tiny model under `<tmp>/outputs/sample-tiny`, the working directory `<tmp>`: two
    splits, two undecodable files recorded, and a validation run beside it."""
    for rel, data in PLANTED.items():
        (image_root / rel).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    summary = run_embed(root=image_root, splits=["train", "valid"], output_dir=OUTPUT, model="tiny", device="cpu",
                        num_workers=0, batch_size=4, rows_per_part=3, progress=False)
    assert summary["errors"] == len(PLANTED)
    run_validate(embeddings_dir=OUTPUT, k=3, dataset_root=image_root)
    out = tmp_path / OUTPUT
    (store.split_dir(out, "valid") / ".part-shard0of1-0123456789ab.parquet.tmp").write_bytes(b"PAR1 torn")  # a kill
    assert sorted(e["path"] for s in ("train", "valid") for e in store.read_errors(store.split_dir(out, s))) == sorted(
        PLANTED)
    assert (out / "_summary.json").is_file() and list(out.glob(".lock*"))
    assert (tmp_path / f"{OUTPUT}-validation" / "predictions.parquet").is_file()
    return out


def expected_paths(root: Path) -> dict[str, list[str]]:
    """Per split, the listed files that decode (all but the planted ones), sorted."""
    return {s: sorted(r.path for r in list_split(root, s) if r.path not in PLANTED) for s in ("train", "valid")}


def frame_of(reader: str, ns: dict) -> tuple[list[str], list[str]]:
    """(split of each row, path of each row) from the table a recipe left in its namespace."""
    if reader == "pyarrow":
        return [str(s) for s in ns["table"].column("split").to_pylist()], ns["table"].column("path").to_pylist()
    if reader == "polars":
        return [str(s) for s in ns["df"]["split"].to_list()], ns["df"]["path"].to_list()
    return [str(s) for s in ns["df"]["split"]], list(ns["df"]["path"])  # pandas, duckdb (a pandas frame)


def test_readme_recipes_read_exactly_the_embedded_rows(output, image_root):
    recipes, expected = readme_recipes(), expected_paths(image_root)
    n_valid = len(expected["valid"])
    counts = {}
    for reader in READERS:
        ns: dict = {}
        exec(compile(recipes[reader], f"README.md ({reader} recipe)", "exec"), ns)  # noqa: S102 - our own README
        splits, paths = frame_of(reader, ns)
        counts[reader] = dict(sorted(Counter(splits).items()))
        assert counts[reader] == {s: len(p) for s, p in expected.items()}, reader
        for split, want in expected.items():
            assert sorted(p for s, p in zip(splits, paths, strict=True) if s == split) == want, (reader, split)
        emb = np.asarray(ns["emb"])
        assert emb.shape == (n_valid, 32) and emb.dtype == np.float32, reader
        assert np.isfinite(emb).all(), reader
    assert dict(Counter(dict(exec_namespace(recipes["duckdb"])["counts"]))) == counts["duckdb"]
    print("rows per split, by reader:", counts)  # shown with -s: the figures for the docs

    split = exec_namespace(recipes["store"])["split"]
    assert split.paths == expected["valid"] and split.embeddings.shape == (n_valid, 32)


def exec_namespace(code: str) -> dict:
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - our own README
    return ns


def test_the_recipes_name_the_layout_the_store_writes():
    """The README's path and the test's agree, and the split folder is the store's (`split=<name>`)."""
    recipes = readme_recipes()
    assert all(OUTPUT in recipes[r] for r in (*READERS, "store"))
    assert store.split_dir(OUTPUT, "valid") == Path(OUTPUT) / "split=valid"
