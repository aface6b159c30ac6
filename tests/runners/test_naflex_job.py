"""The embed job on a SigLIP 2 NaFlex checkpoint: the data path stacks NaFlex's dicts (pixels, mask, grid) key
by key, in workers, in the crash-safe child (num_workers=0) and from tars, and stores what the encoder gives for
each image alone."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from helpers import shards
from helpers.jobs import runner_job
from helpers.shards import sample_files

from pipelines import store
from pipelines.config import REPO_ROOT
from pipelines.data import decode, list_split
from pipelines.embed import run_embed
from pipelines.errors import UserError
from pipelines.runners.local import run
from pipelines.siglip import EncoderSpec, load_encoder
from pipelines.sources.files import FileSource

pytestmark = pytest.mark.job


def expected(encoder, blobs: dict[str, bytes]) -> dict[str, np.ndarray]:
    return {path: encoder.embed_uint8({k: v.unsqueeze(0) for k, v in encoder.preprocess.resize(decode(data)).items()})
            [0].numpy() for path, data in blobs.items()}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_naflex_job_stores_each_images_own_embedding(naflex_checkpoint, tmp_path, num_workers):
    encoder = load_encoder(str(naflex_checkpoint), device="cpu")
    root = REPO_ROOT / "data" / "sample"
    run_embed(root=root, splits=["valid"], output_dir=tmp_path / "out", model=str(naflex_checkpoint), device="cpu",
              num_workers=num_workers, batch_size=7, progress=False)
    stored = store.read_split(tmp_path / "out", "valid")
    assert len(stored.paths) == 200 and stored.metadata["image_size"] is None
    want = expected(encoder, {p: (root / p).read_bytes() for p in stored.paths[:20]})
    got = stored.embeddings[:20]
    cosine = [float(np.dot(g, want[p]) / np.linalg.norm(g) / np.linalg.norm(want[p]))
              for p, g in zip(stored.paths, got)]
    assert min(cosine) > 0.9999


def test_naflex_from_tars_and_its_refusals(naflex_checkpoint, tmp_path):
    files = sample_files("train")[:24]
    shards.write_img2dataset_webdataset(tmp_path / "wds", files, per_shard=10)
    source = FileSource.build(data_files={"train": str(tmp_path / "wds" / "*.tar")}, storage_options=None,
                              format="auto", image_extensions=["png"], image_column="auto", label="auto",
                              keep_columns=[], retries=0)
    summary = run_embed(root=None, source=source, splits=["train"], output_dir=tmp_path / "out",
                        model=str(naflex_checkpoint), device="cpu", num_workers=1, batch_size=5, progress=False)
    assert summary["images"] == 24 and summary["errors"] == 0
    job = runner_job(REPO_ROOT / "data" / "sample", tmp_path / "dd")
    job = replace(job, encoder=EncoderSpec(str(naflex_checkpoint), None, "cpu", "float32"))
    with pytest.raises(UserError, match="a NaFlex checkpoint keeps each image's aspect ratio"):
        run(job, {"valid": list_split(REPO_ROOT / "data" / "sample", "valid")}, device_decode=True)
