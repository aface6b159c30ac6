"""The embed job's settings: checked where they come in, before anything is listed or loaded.

`check_settings` refuses a bad value with a UserError naming the key as conf/embed.yaml spells it (one line,
exit 2); `check_device` refuses a device this host lacks. torch is imported only for a device check.
"""

from __future__ import annotations

import re
from typing import Any

from pipelines.errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(auto|cpu|cuda|mps)(:\d+)?$")


def check_settings(
    *, batch_size: Any, rows_per_part: Any, num_workers: Any, shard_index: Any, shard_count: Any, dtype: Any,
    device: Any, max_image_pixels: Any, output_dir: Any, **flags: Any,
) -> None:
    """Refuse a bad setting with a UserError naming the key and the value (before anything is loaded or listed).

    `flags`: the boolean settings (compile, overwrite, progress, ...) by name; Hydra hands strings through.
    `max_image_pixels`: a whole number, None (no limit) or 'auto' (PIL's bomb threshold).
    """
    for key, value in (("batch_size", batch_size), ("rows_per_part", rows_per_part)):
        if not _is_int(value) or value < 1:
            raise UserError(f"{key}={_show(value)}: expected a whole number of at least 1")
    if num_workers != "auto" and (not _is_int(num_workers) or num_workers < 0):
        raise UserError(f"num_workers={_show(num_workers)}: expected auto or a whole number of at least 0")
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise UserError(f"{key}={_show(value)}: expected true or false")
    if not _is_int(shard_count) or shard_count < 1:
        raise UserError(f"shard.count={_show(shard_count)}: expected a whole number of at least 1")
    if not _is_int(shard_index) or not 0 <= shard_index < shard_count:
        raise UserError(f"shard.index={_show(shard_index)}: expected 0 to {shard_count - 1} (shard.count={shard_count})")
    if dtype not in DTYPES:
        raise UserError(f"dtype={_show(dtype)}: expected one of {', '.join(DTYPES)}")
    devices = [device] if isinstance(device, str) else device
    if not isinstance(devices, (list, tuple)) or not devices or not all(map(_one_device, devices)) or (
            not isinstance(device, str) and "auto" in devices):
        raise UserError(f"device={_show(device)}: expected auto, cpu, cuda, cuda:N or mps, or a list of them "
                        "([cuda:0,cuda:2]: one encoder process each)")
    if len(devices) > 1 and len(set(devices)) < len(devices) and any(d.startswith("cuda") for d in devices):
        raise UserError(f"device={_show(device)}: a CUDA device is named twice")
    if len({d.partition(":")[0] for d in devices}) > 1:
        raise UserError(f"device={_show(device)}: one kind of device per job (the dtype and so the embeddings "
                        "would differ between them)")
    if max_image_pixels not in ("auto", None) and (not _is_int(max_image_pixels) or max_image_pixels < 1):
        raise UserError(f"max_image_pixels={_show(max_image_pixels)}: expected a whole number of at least 1, "
                        "or null for no limit")
    if flags.get("overwrite") and shard_count > 1:
        raise UserError("overwrite=true with shard.count > 1 would let shards delete each other's work; "
                        f"remove {output_dir} once, then start the shards")


def _one_device(device: Any) -> bool:
    return isinstance(device, str) and bool(_DEVICE.match(device)) and not device.startswith("auto:")


def _show(value: Any) -> str:
    """A setting's value as typed on the command line: true/false for booleans, quoted strings."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_device(device: str | list[str]) -> None:
    """Refuse a device this host does not have (UserError): `cuda` without CUDA, `cuda:3` with one GPU; each of a
    list; and `auto` on a host whose NVIDIA GPUs torch cannot use (`devices.check_gpu_host`)."""
    if not isinstance(device, str):
        for one in device:
            check_device(one)
        return
    if device == "auto":
        from pipelines.devices import check_gpu_host

        check_gpu_host(device)
        return
    kind, _, index = device.partition(":")
    if kind in ("auto", "cpu"):
        return
    import torch

    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"device={device}: this host has no MPS device; use device=cpu or device=auto")
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"device={device}: this host has no CUDA device (torch.cuda.is_available() is False); "
                        "use device=cpu or device=auto")
    if index and int(index) >= count:
        raise UserError(f"device={device}: this host has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
