"""explore's `text_server=`: text queries through a real Triton `embed_text` (started by `python -m pipelines.serve`)
answer exactly what the in-process text tower answers; a server started with another checkpoint is refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import requests
from explore.conftest import make_explorer
from helpers.explore import running
from helpers.images import SAMPLE
from helpers.server import launch, server_args

from pipelines.embed import run_embed
from pipelines.index import ModelMismatchError

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def embedded_with_checkpoint(tiny_checkpoint, tmp_path_factory):
    """Two classes of data/sample embedded with the tiny checkpoint folder (the name the server reports)."""
    root = tmp_path_factory.mktemp("ts-data")
    for split, n in (("train", 3), ("valid", 2)):
        for label in ("bag", "sneaker"):
            (root / split / label).mkdir(parents=True)
            for src in sorted((SAMPLE / split / label).iterdir())[:n]:
                shutil.copy(src, root / split / label / src.name)
    out = tmp_path_factory.mktemp("ts-emb") / "emb"
    run_embed(root=root, splits=["train", "valid"], output_dir=out, model=str(tiny_checkpoint), device="cpu",
              num_workers=0, batch_size=8, progress=False)
    return out


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    launched = launch(tmp_path_factory.mktemp("ts-serve"), *server_args(tiny_checkpoint))
    yield launched
    launched.stop()


def test_triton_text_queries_equal_the_local_text_tower(embedded_with_checkpoint, tiny_checkpoint, server):
    local = make_explorer(embedded_with_checkpoint, name_or_path=str(tiny_checkpoint))
    remote = make_explorer(embedded_with_checkpoint, name_or_path=str(tiny_checkpoint),
                           text_server=f"localhost:{server.grpc_port}")
    assert remote.info["text_search"] == f"triton localhost:{server.grpc_port}"
    answers = []
    for explorer in (local, remote):
        with running(explorer) as url:
            answers.append([requests.get(f"{url}/api/search", params={"text": text, "k": 10}, timeout=60).json()
                            for text in ("a photo of a bag", "a sneaker")])
    for mine, theirs in zip(*answers, strict=True):
        assert [r["path"] for r in mine["results"]] == [r["path"] for r in theirs["results"]]
        np.testing.assert_allclose([r["score"] for r in mine["results"]], [r["score"] for r in theirs["results"]],
                                   atol=1e-5)


def test_a_server_of_another_checkpoint_is_refused(explored, server):
    with pytest.raises(ModelMismatchError, match="model: 'tiny' stored"):
        make_explorer(explored["out"], text_server=f"localhost:{server.grpc_port}")
