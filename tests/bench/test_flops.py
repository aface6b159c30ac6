"""pipelines/bench/flops.py: the peak a run's MFU is measured against."""

from __future__ import annotations

import pytest
import torch

from pipelines.bench.flops import peak_flops
from pipelines.config import UserError


def test_peak_flops():
    assert peak_flops(torch.device("cpu"), "auto") is None
    assert peak_flops(torch.device("cpu"), 100) == 100e12
    with pytest.raises(UserError, match="peak_tflops='fast'"):
        peak_flops(torch.device("cpu"), "fast")
