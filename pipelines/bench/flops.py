"""FLOPs: counted per image from the model, the GPU's peak, and the MFU they give."""

from __future__ import annotations

import copy

import torch

from pipelines.config import UserError

# Dense BF16/FP16 tensor-core peaks in TFLOP/s from the vendors' datasheets, matched in order in the GPU's name.
PEAK_TFLOPS = (
    ("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("RTX 4090", 165.2),
)


def count_flops(model: torch.nn.Module, *, height: int, width: int) -> int:
    """FLOPs for one image, counted by FlopCounterMode on a meta-device twin of `model` with eager attention.

    The counter misses the CPU SDPA kernel; eager attention does the same matrix products, and on the meta
    device nothing is computed.
    """
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel

    with torch.device("meta"):
        twin = AutoModel.from_config(copy.deepcopy(model.config), attn_implementation="eager")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        twin(pixel_values=torch.empty(1, 3, height, width, device="meta"))
    return int(counter.get_total_flops())


def peak_flops(device: torch.device, override: float | str | None) -> float | None:
    """The device's dense bf16/fp16 peak in FLOP/s: `override` (TFLOP/s), else from the GPU's name; None on CPU."""
    if override not in (None, "auto"):
        try:
            return float(override) * 1e12
        except ValueError:
            raise UserError(f"peak_tflops={override!r}: expected auto or a number (TFLOP/s)") from None
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in name), None)


def mfu(rate: float, flops: int | None, peak: float | None, dtype: torch.dtype) -> float | None:
    """Achieved / peak FLOP/s; only against a tensor-core peak, so only for bf16 and fp16."""
    if not peak or not flops or dtype not in (torch.bfloat16, torch.float16):
        return None
    return rate * flops / peak
