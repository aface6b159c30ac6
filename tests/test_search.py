"""pipelines/search.py: an image query is embedded as the embed job does and finds itself first; the CLI prints a
table or JSON alone on stdout; bad queries, files and models are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers.images import SAMPLE
from helpers.jobs import embed_sample_subset

from pipelines import store
from pipelines.config import REPO_ROOT, UserError
from pipelines.search import ModelMismatchError, check_query, run_search

ANN = {"exact_below": 50000, "hnsw_below": 1000000, "ivf_nlist": "auto", "ivf_nprobe": 32,
       "ivf_train_rows": "auto", "ivf_train_iters": 10, "hnsw_m": 32, "hnsw_ef_construction": 80,
       "hnsw_ef_search": 128, "seed": 0}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Three classes x (3 train + 2 valid) of data/sample, embedded with the tiny model."""
    return embed_sample_subset(tmp_path_factory, labels=("bag", "sneaker", "trouser"),
                               per_split={"train": 3, "valid": 2})


def search(out, **kw):
    args = {"embeddings_dir": out, "splits": None, "query": None, "image": None, "k": 5, "index": "exact",
            "rebuild": False, "index_dir": None, "name_or_path": "tiny", "revision": None, "device": "cpu",
            "dtype": "float32", "max_image_pixels": 89478485, "ann_options": ANN, "dataset_root": None}
    return run_search(**{**args, **kw})


@pytest.mark.job
def test_image_query_finds_itself_with_the_stored_embedding(embedded):
    root, out = embedded
    target = min((root / "valid" / "sneaker").iterdir())
    result = search(out, image=target)
    first = result["results"][0]
    assert first["path"] == f"valid/sneaker/{target.name}" and first["split"] == "valid"
    assert first["score"] == pytest.approx(1.0, abs=1e-5)  # the same decode + preprocess + model as the job
    scores = [r["score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 5 and result["rows"] == 15
    # the scores are the cosine similarities to the stored embeddings
    split = store.read_split(out, "valid")
    x = split.embeddings / np.linalg.norm(split.embeddings, axis=1, keepdims=True)
    me = x[split.paths.index(first["path"])]
    for r in result["results"]:
        if r["split"] == "valid":
            assert r["score"] == pytest.approx(float(x[split.paths.index(r["path"])] @ me), abs=1e-4)


@pytest.mark.job
def test_one_split_and_an_approximate_index_beside_the_embeddings(embedded, tmp_path):
    root, out = embedded
    target = sorted((root / "train" / "bag").iterdir())[1]
    result = search(out, image=target, splits=["train"], index="hnsw", k=100)
    assert {r["split"] for r in result["results"]} == {"train"} and len(result["results"]) == 9
    assert result["results"][0]["path"] == f"train/bag/{target.name}"
    assert result["index"]["file"] == str(out.parent / "sample-tiny-index" / "train-hnsw.faiss")
    assert search(out, image=target, splits=["train"], index="hnsw")["index"]["loaded"] is True


def test_exactly_one_query():
    assert check_query(query="a dog", image=None) == "text" and check_query(query=None, image="x.jpg") == "image"
    for query, image, word in (("a dog", "x.jpg", "both"), (None, None, "neither"), ("", "", "neither")):
        with pytest.raises(UserError, match=f"exactly one of query=TEXT and image=FILE \\({word} given\\)"):
            check_query(query=query, image=image)


@pytest.mark.job
def test_bad_files_and_another_model_are_refused_before_the_model_loads(embedded, tmp_path, tiny_vision_checkpoint):
    _, out = embedded
    with pytest.raises(UserError, match="image=.*nope.jpg: no such file"):
        search(out, image=tmp_path / "nope.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(UserError, match="junk.jpg: not an image"):
        search(out, image=tmp_path / "junk.jpg")
    photo = next((SAMPLE / "valid" / "bag").iterdir())
    with pytest.raises(ModelMismatchError, match="model: 'tiny' stored, .* for the query.*model.name_or_path=tiny"):
        search(out, image=photo, name_or_path=str(tiny_vision_checkpoint))
    with pytest.raises(UserError, match="k=0"):
        search(out, image=photo, k=0)


@pytest.mark.job
def test_cli_json_alone_on_stdout_and_errors_in_one_line(embedded, tmp_path):
    root, out = embedded
    photo = min((root / "valid" / "trouser").iterdir())
    cmd = [sys.executable, "-m", "pipelines.search", "model=tiny", f"embeddings_dir={out}", "device=cpu"]
    run = subprocess.run([*cmd, f"image={photo}", "format=json", "k=3", f"output={tmp_path}/r.json"],
                         check=False, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)  # nothing else on stdout: the log goes to stderr
    assert printed == json.loads((tmp_path / "r.json").read_text())
    assert printed["results"][0]["path"] == f"valid/trouser/{photo.name}" and len(printed["results"]) == 3
    table = subprocess.run([*cmd, f"image={photo}", "k=2"], check=False, capture_output=True, text=True, cwd=REPO_ROOT,
                           timeout=300)
    assert table.returncode == 0 and f"valid/trouser/{photo.name}" in table.stdout.splitlines()[3]
    bad = subprocess.run([*cmd, "query=a bag", f"image={photo}"], check=False, capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        ("error: give exactly one of query=TEXT and image=FILE (both given), e.g. query='a dog on a sofa' or "
        "image=photo.jpg")]


@pytest.mark.job
def test_text_query_ranks_by_the_text_towers_cosine(embedded):
    from pipelines.text import load_text_encoder

    _, out = embedded
    result = search(out, query="a photo of a bag", k=15)
    text = load_text_encoder("tiny", revision=None, device="cpu", dtype="float32")
    q = text.embed(["a photo of a bag"]).numpy()[0]
    q /= np.linalg.norm(q)
    want = {}
    for split in ("train", "valid"):
        s = store.read_split(out, split)
        for path, e in zip(s.paths, s.embeddings, strict=True):
            want[path] = float(e @ q / np.linalg.norm(e))
    assert len(result["results"]) == 15 and result["query"] == {"text": "a photo of a bag"}
    for r in result["results"]:
        assert r["score"] == pytest.approx(want[r["path"]], abs=1e-4)
    assert [r["path"] for r in result["results"]] == sorted(want, key=lambda p: -want[p])
