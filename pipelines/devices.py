"""Which torch device a setting means; shared by the encoder, k-NN, the embed job and the benchmarks.

`device=auto` never falls back to the CPU in silence on a GPU host: `check_gpu_host` stops a job before anything
loads when the host has NVIDIA GPUs (device files, or `nvidia-smi` listing one) that torch cannot use, and says
why (a CPU-only torch build, `CUDA_VISIBLE_DEVICES` hiding them, a driver or CUDA mismatch).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence

import torch

from pipelines.errors import UserError


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def job_devices(device: str | Sequence[str]) -> list[str]:
    """The devices an embed job runs one encoder process on each: a list as given; 'auto' = every visible CUDA
    device when there are several (`CUDA_VISIBLE_DEVICES` respected), else the one 'auto' means."""
    if not isinstance(device, str):
        return [str(d) for d in device]
    if device == "auto" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [device]


def nvidia_gpus(*, dev_dir: str = "/dev", which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """What tells that the host has NVIDIA GPUs, whatever torch says: its device files, or `nvidia-smi -L`'s list."""
    found = sorted(p for p in glob.glob(os.path.join(dev_dir, "nvidia*")) if re.search(r"nvidia\d+$", p))
    if found:
        return found
    smi = which("nvidia-smi")
    if smi is None:
        return []
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.splitlines() if line.startswith("GPU ")]


class NoUsableGpuError(UserError):
    """device=auto on a host with NVIDIA GPUs that torch cannot use."""


def check_gpu_host(device: str | Sequence[str], *, dev_dir: str = "/dev",
                   which: Callable[[str], str | None] = shutil.which) -> None:
    """Refuse `device=auto` (NoUsableGpuError, one line with the cause) where the host has NVIDIA GPUs but torch
    cannot reach them; any explicit device (device=cpu included) is the user's choice and passes."""
    if device != "auto" or torch.cuda.is_available():
        return
    gpus = nvidia_gpus(dev_dir=dev_dir, which=which)
    if not gpus:
        return
    raise NoUsableGpuError(f"device=auto: this host has NVIDIA GPUs ({_shown(gpus)}) but torch cannot use them: "
                           f"{_cause()}; fix that, or pass device=cpu to run on the CPU on purpose")


def _cause() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.version.cuda is None:
        return f"this torch is a CPU-only build (torch {torch.__version__}); install a CUDA build of torch"
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    try:
        torch.cuda.init()
        reason = "no device visible to CUDA"
    except Exception as exc:  # noqa: BLE001 - torch's own words for why CUDA does not start
        reason = " ".join(str(exc).split())[:300]
    return (f"the NVIDIA driver is missing or does not match this torch (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}: {reason})")


def _shown(gpus: list[str]) -> str:
    return ", ".join(gpus[:2]) + (f" and {len(gpus) - 2} more" if len(gpus) > 2 else "")
