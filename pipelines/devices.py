"""Which torch device a setting means; shared by the encoder, k-NN and the benchmarks."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
