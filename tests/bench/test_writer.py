"""pipelines/bench/writer.py: the Parquet writer alone writes exactly the random rows it timed."""

from __future__ import annotations

import numpy as np

from pipelines import store
from pipelines.bench.writer import WriterSettings, bench_writer


def test_writer_alone_writes_what_it_was_given(tmp_path):
    metadata = {"model": "x", "embedding_dim": 16}
    figures = bench_writer(out_dir=tmp_path, dim=16, metadata=metadata,
                           settings=WriterSettings(rows=30, batch_size=7, rows_per_part=10))
    assert figures["rows"] == 30 and figures["parts"] == 3 and figures["rows_per_s"] > 0
    split = store.read_split(tmp_path, "train")
    assert split.embeddings.shape == (30, 16) and split.metadata == metadata
    expected = np.random.default_rng(0).standard_normal((30, 16), dtype=np.float32)
    order = np.argsort([int(p.rsplit("-", 1)[1].split(".")[0]) for p in split.paths])
    np.testing.assert_array_equal(split.embeddings[order], expected)
