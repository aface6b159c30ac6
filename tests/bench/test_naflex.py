"""pipelines/bench/naflex.py: NaFlex against fixed resolution, and padded against trimmed batches, on tiny models."""

from __future__ import annotations

import pytest

from pipelines.bench import naflex
from pipelines.errors import UserError


def test_naflex_bench_on_tiny_models(naflex_checkpoint, tiny_checkpoint):
    results = naflex.run(fixres=str(tiny_checkpoint), naflex=str(naflex_checkpoint), device="cpu", dtype="float32",
                         batch_size=2, iters=1)
    assert results["fixres"]["patches"] == 576 and results["naflex"]["patches"] == 256
    assert results["naflex_vs_fixres"] == results["naflex"]["images_per_s"] / results["fixres"]["images_per_s"] > 0
    filled = {row["image"]: row["patches"] for row in results["padding"]}
    assert len(filled) == len(naflex.SHAPES) and all(0 < n <= 256 for n in filled.values())
    assert filled["500x500"] == 256 and filled["500x375"] == 252  # a 14 x 18 grid
    trim = results["padded_vs_trimmed"]
    # cutting the padding off changes no embedding: the model masks it
    assert trim["longest"] == max(n for n in filled.values() if n < 256) and trim["max_abs_difference"] < 1e-4
    assert "500x500" not in trim["images"] and "500x375" in trim["images"]
    assert "NaFlex" in naflex.report(results)
    with pytest.raises(UserError, match="--naflex .*: not a NaFlex checkpoint"):
        naflex.run(fixres=str(tiny_checkpoint), naflex=str(tiny_checkpoint), device="cpu", dtype="float32",
                   batch_size=1, iters=1)
