"""The explore app over an output embedded from shards (dataset=files): thumbnails come from the tar or Parquet
row group that holds the row; only rows of the dataset are served."""

from __future__ import annotations

import io

import pytest
import requests
from helpers import shards
from helpers.explore import running
from helpers.shards import sample_files
from PIL import Image

from pipelines.embed import run_embed
from pipelines.explore.app import Limits
from pipelines.explore.server import build_explorer
from pipelines.sources.files import FileSource

pytestmark = pytest.mark.server
ANN = {"exact_below": 50000, "hnsw_below": 200000, "ivf_nlist": "auto", "ivf_nprobe": 8, "ivf_train_rows": "auto",
       "ivf_train_iters": 10, "hnsw_m": 16, "hnsw_ef_construction": 80, "hnsw_ef_search": 64, "seed": 0}


@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_thumbnails_of_rows_embedded_from_shards(tmp_path, kind):
    files = sample_files("valid")[:30]
    if kind == "webdataset":
        shards.write_img2dataset_webdataset(tmp_path / "data", files, per_shard=12)
        pattern = str(tmp_path / "data" / "{00000..00002}.tar")
    else:
        shards.write_img2dataset_parquet(tmp_path / "data", files, per_shard=12, row_group_size=5)
        pattern = str(tmp_path / "data" / "*.parquet")
    source = FileSource.build(data_files={"valid": pattern}, storage_options=None, format="auto",
                              image_extensions=["png"], image_column="auto", label="none", keep_columns=[],
                              retries=0)
    out = tmp_path / "emb"
    run_embed(root=None, source=source, splits=["valid"], output_dir=out, model="tiny", device="cpu",
              num_workers=0, batch_size=8, progress=False)
    explorer = build_explorer(embeddings_dir=out, splits=None, dataset_root_dir=None, allowed_roots=[],
                              name_or_path="tiny", revision=None, device="cpu", dtype="float32", text_server=None,
                              index="exact", index_dir=None, ann_options=ANN, limits=Limits())
    row = "00001.tar/000010003" if kind == "webdataset" else "00001.parquet/7"  # the 16th and the 20th image
    original = Image.open(files[15 if kind == "webdataset" else 19])
    with running(explorer) as url:
        answer = requests.get(f"{url}/api/image", params={"path": row}, timeout=60)
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(answer.content)).size == original.size  # 28x28: never enlarged
        near = requests.get(f"{url}/api/search", params={"path": row, "k": 3}, timeout=60)
        assert near.status_code == 200 and len(near.json()["results"]) == 3
        for bad in ("00001.tar/nope", "00001.parquet/999", "../00001.tar/000010003", "elsewhere.tar/0"):
            refused = requests.get(f"{url}/api/image", params={"path": bad}, timeout=60)
            assert refused.status_code in (400, 404), (bad, refused.status_code)
        assert requests.get(f"{url}/api/image", params={"path": row}, timeout=60).status_code == 200
