"""One embed job on several devices: one encoder process per device, each with its own decode workers (the
cores split between them), all writing into one output.

Each device takes a deterministic share of this job's work (by a hash of each file's path, or each shard unit's
name, salted so that it spreads evenly inside a `shard.*` share) and writes parts under its own prefix, so every
image is written once; a rerun skips what any device stored, whatever the device count. The processes die with the
job (a kill -9 of the job stops them too). One progress bar counts every device's rows. A device whose process
dies (out of memory, a GPU fault) costs only its unfinished share: the others finish, and the job ends with one
line naming the device, the cause and what was saved.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from tqdm import tqdm

from pipelines.data import shard_of
from pipelines.errors import UserError
from pipelines.runners import split as split_module
from pipelines.runners.split import Job, SplitStats

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class DeviceFailedError(UserError):
    """A device's encoder process died or failed; the others finished. The message says which and what to do."""


@dataclass(frozen=True)
class DeviceResult:
    """What one device's process did: its splits' stats, or why it failed (`error`)."""

    device: str
    stats: list[SplitStats]
    error: str | None = None


def device_share(work: Any, index: int, count: int) -> Any:
    """The part of a split's work that device `index` of `count` embeds: records by path, units by name."""
    from pipelines.runners.stream import Units

    if isinstance(work, Units):
        return Units(work.source, [u for u in work.units if _device_of(u.id, count) == index])
    return [r for r in work if _device_of(r.path, count) == index]


def _device_of(name: str, count: int) -> int:
    # Salted: the user's shard.* already took names by the same hash, which would leave devices uneven.
    return shard_of(f"{name}\0device", count)


def run_on_devices(job: Job, splits: Mapping[str, Any], *, devices: list[str], workers_each: int | str,
                   runner: Callable[..., list[SplitStats]]) -> tuple[list[SplitStats], list[DeviceResult]]:
    """Run `runner` (the local runner, settings bound) once per device in its own process; returns the splits'
    stats summed over devices and each device's result. Raises DeviceFailedError after the others finish when a
    device's process failed."""
    import torch

    # A forked child starts in a moment; CUDA only works in one when this process never initialised it.
    context = mp.get_context("spawn" if torch.cuda.is_initialized() else "fork")
    counter, results = context.Value("q", 0), context.Queue()
    processes = []
    for index, device in enumerate(devices):
        share = {split: device_share(work, index, len(devices)) for split, work in splits.items()}
        sub = replace(job, encoder=replace(job.encoder, device=device), num_workers=workers_each,
                      prefix=f"{job.prefix}-dev{index}of{len(devices)}", progress=False)
        process = context.Process(target=_device_main, args=(sub, share, runner, counter, results),
                                  name=f"embed-device{index}", daemon=False)
        process.start()
        processes.append((device, process))
    done = _watch(processes, counter, results, job.progress)
    outcome = [replace(done[index], device=_label(devices, index)) if index in done
               else DeviceResult(_label(devices, index), [], _death(process))
               for index, (_, process) in enumerate(processes)]
    return _merge([r.stats for r in outcome], list(splits)), outcome


def _watch(processes: list, counter: Any, results: Any, progress: bool) -> dict[int, DeviceResult]:
    """Draw one bar for every device's rows until all processes have ended; collect their results."""
    done: dict[int, DeviceResult] = {}
    bar = tqdm(desc=f"embed on {len(processes)} devices", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        while True:
            _drain(results, processes, done)
            bar.update(counter.value - bar.n)
            if all(not p.is_alive() for _, p in processes):
                _drain(results, processes, done, wait_s=1.0)
                return done
            time.sleep(0.2)
    except BaseException:
        for _, process in processes:  # Ctrl-C / SIGTERM: each device flushes what it embedded, then we report
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        for _, process in processes:
            process.join()
        raise
    finally:
        bar.close()


def _drain(results: Any, processes: list, done: dict[int, DeviceResult], wait_s: float = 0.0) -> None:
    names = {p.name: i for i, (_, p) in enumerate(processes)}
    deadline = time.monotonic() + wait_s
    while True:
        try:
            name, result = results.get(timeout=max(0.0, deadline - time.monotonic()) or 0.01)
        except queue.Empty:
            return
        done[names[name]] = result


def _label(devices: list[str], index: int) -> str:
    """A device's name in messages: `cuda:1`, or `cpu#0` where a device is named more than once."""
    return devices[index] if devices.count(devices[index]) == 1 else f"{devices[index]}#{index}"


def _death(process: Any) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        return f"its process was killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"its process exited with status {code}"


def _merge(per_device: list[list[SplitStats]], splits: list[str]) -> list[SplitStats]:
    """Each split's stats summed over devices; times are the slowest device's."""
    merged = []
    for split in splits:
        parts = [s for stats in per_device for s in stats if s.split == split]
        total = SplitStats(split=split)
        for field in fields(SplitStats):
            if field.name == "split":
                continue
            values = [getattr(s, field.name) for s in parts]
            combine = max if field.name.endswith("_s") else sum
            setattr(total, field.name, combine(values) if values else getattr(total, field.name))
        merged.append(total)
    return merged


def _device_main(job: Job, splits: Mapping[str, Any], runner: Callable[..., list[SplitStats]], counter: Any,
                 results: Any) -> None:
    """One device's process: die with the job, count rows into the shared bar, run the runner, report."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the process still ends when its work is done
    if os.getppid() == 1:  # the job died before the line above took effect
        os._exit(1)
    split_module.PROGRESS_COUNTER = counter
    name = mp.current_process().name
    device = job.encoder.device
    try:
        stats = runner(job, splits)
    except KeyboardInterrupt:
        results.put((name, DeviceResult(device, [], "interrupted")))
        return
    except BaseException as exc:  # noqa: BLE001 - the job reports it with the device's name
        log.debug("device %s failed:\n%s", device, traceback.format_exc())
        results.put((name, DeviceResult(device, [], f"{type(exc).__name__}: {' '.join(str(exc).split())}")))
        return
    results.put((name, DeviceResult(device, stats)))
