"""Decoding in a child process: a decoder that crashes (a signal, an abort) or hangs costs one input, not its host.

`Isolated(fn)` owns one persistent child process that applies `fn` to the items it is sent, one at a time,
answering each as it is done. When the child dies, or is killed after `timeout_s` on one item, that item's
result is a `Crashed` naming the signal; a new child is started and takes the remaining items.

- `IsolatedDecoder` runs `decode` + `Preprocess.resize` on encoded blobs this way, by default in a fresh
  interpreter (`python -m pipelines.isolate`): for hosts that must not die with a decoder and may be
  multi-threaded or embedded (Triton's Python backend stub). A restart after a crash costs one interpreter start
  (importing torch: a few seconds). The Ray decode tasks fork theirs (`start_method="fork"`) from their worker,
  which has torch loaded already.
- The local runner uses a forked `Isolated` to replay its own dataset items (`start_method="fork"`), so the
  child decodes exactly as the DataLoader's forked workers do.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.data import DEFAULT_MAX_PIXELS, DecodeError, decode
from pipelines.siglip import Preprocess

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0  # one item; a large allowed image (89 Mpx) decodes and resizes in a few seconds
START_TIMEOUT_S = 300.0  # a fresh child imports torch: seconds normally, much longer on a loaded host
_STOP_WAIT_S = 5.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


@dataclass(frozen=True)
class Crashed:
    """The child died (or was killed for hanging) on this item; `reason` is one line."""

    reason: str


class ChildStartError(RuntimeError):
    """The child process could not be started (not an input's fault)."""


def exit_reason(exitcode: int | None) -> str:
    """A child's exit code -> 'decoder crashed (signal 11)' / 'decoder crashed (exit status 1)'."""
    if exitcode is None:
        return "decoder crashed"
    if exitcode < 0:
        return f"decoder crashed (signal {-exitcode})"
    return f"decoder crashed (exit status {exitcode})"


class Isolated:
    """Apply `fn` to items in a persistent child process; a crash or a hang costs the item being processed.

    `fn(item)` returns a picklable value or raises; `map` returns per item `(True, value)`, `(False, reason)`
    for an exception (one line), or `Crashed`. Thread-safe (calls are serialised). `start_method`:
    "subprocess" (default) starts `python -m pipelines.isolate`, a fresh interpreter that inherits nothing but
    the environment: safe from any host, multi-threaded or embedded (`fn` must pickle). "fork" forks this
    process, so the child runs `fn` with this process's state, exactly as a DataLoader's forked worker does
    (only from a process whose threads hold no locks the child needs, e.g. the runner's main process).
    """

    def __init__(self, fn: Callable[[Any], Any], *, start_method: str = "subprocess",
                 timeout_s: float = DEFAULT_TIMEOUT_S, start_timeout_s: float = START_TIMEOUT_S) -> None:
        if start_method not in ("subprocess", "fork"):
            raise ValueError(f"start_method={start_method!r}: 'subprocess' or 'fork'")
        self.fn, self.start_method = fn, start_method
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self._lock = threading.Lock()
        self._child: _Child | None = None
        self.restarts = 0

    def __enter__(self) -> Isolated:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the child now (otherwise the first `map` does)."""
        with self._lock:
            self._ensure_child()

    def map(self, items: Sequence[Any]) -> list[Any]:
        """Per item, in order: (True, value), (False, reason) or `Crashed`; restarts the child as needed."""
        with self._lock:
            results: list[Any] = []
            while len(results) < len(items):
                child = self._ensure_child()
                rest = list(items[len(results):])
                try:
                    child.send(rest)
                except OSError:
                    self._stop(kill=True)  # died between calls: not the fault of these items
                    continue
                for _ in rest:
                    outcome = self._receive(child)
                    results.append(outcome)
                    if isinstance(outcome, Crashed):
                        log.warning("%s; starting a new decoder process", outcome.reason)
                        self.restarts += 1
                        break
            return results

    def close(self) -> None:
        """Stop the child (it also exits on its own when this process dies: its pipe closes)."""
        with self._lock:
            if self._child is not None:
                try:
                    self._child.send(None)
                except OSError:
                    pass
            self._stop(kill=False)

    def _ensure_child(self) -> _Child:
        if self._child is not None and self._child.alive():
            return self._child
        self._stop(kill=True)
        child = _ForkChild(self.fn) if self.start_method == "fork" else _SubprocessChild(self.fn)
        self._child = child
        if not child.poll(self.start_timeout_s):
            self._stop(kill=True)
            raise ChildStartError(f"the decoder process did not start within {self.start_timeout_s:g} s")
        try:
            child.recv()  # its "ready"
        except (EOFError, OSError) as exc:
            code = self._stop(kill=False)
            raise ChildStartError(f"the decoder process failed at start: {exit_reason(code)}") from exc
        return child

    def _receive(self, child: _Child) -> Any:
        if not child.poll(self.timeout_s):
            self._stop(kill=True)
            return Crashed(f"decoder hung (killed after {self.timeout_s:g} s)")
        try:
            return child.recv()
        except (EOFError, OSError):
            return Crashed(exit_reason(self._stop(kill=False)))

    def _stop(self, *, kill: bool) -> int | None:
        child, self._child = self._child, None
        return child.stop(kill=kill) if child is not None else None


class _Child:
    """One child process: `inbox` carries answers from it, `outbox` requests to it."""

    inbox: Connection
    outbox: Connection

    def send(self, obj: Any) -> None:
        self.outbox.send(obj)

    def poll(self, timeout: float) -> bool:
        return self.inbox.poll(timeout)

    def recv(self) -> Any:
        return self.inbox.recv()

    def alive(self) -> bool:
        raise NotImplementedError

    def stop(self, *, kill: bool) -> int | None:
        """Close the connection and wait for the exit (kill first if `kill` or after a grace period)."""
        raise NotImplementedError


class _ForkChild(_Child):
    def __init__(self, fn: Callable[[Any], Any]) -> None:
        ctx = mp.get_context("fork")
        ours, theirs = ctx.Pipe(duplex=True)
        self.inbox = self.outbox = ours
        self.proc = ctx.Process(target=_serve, args=(theirs, theirs, fn), daemon=True, name="pipelines-decoder")
        self.proc.start()
        theirs.close()  # the child holds its own end; ours must close so that its death reads as EOF

    def alive(self) -> bool:
        return self.proc.is_alive()

    def stop(self, *, kill: bool) -> int | None:
        self.inbox.close()
        if kill:
            self.proc.kill()
        self.proc.join(_STOP_WAIT_S)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        code = self.proc.exitcode
        self.proc.close()
        return code


class _SubprocessChild(_Child):
    def __init__(self, fn: Callable[[Any], Any]) -> None:
        env = dict(os.environ)
        # The child must import this very package, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([_python(), "-m", "pipelines.isolate"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, close_fds=True)
        self.outbox = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self.inbox = Connection(os.dup(self.proc.stdout.fileno()), writable=False)
        self.proc.stdin.close()
        self.proc.stdout.close()
        try:
            self.outbox.send(fn)
        except OSError:
            pass  # died at once: the start-up wait reports it

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, *, kill: bool) -> int | None:
        self.outbox.close()
        self.inbox.close()
        if kill:
            self.proc.kill()
        try:
            return self.proc.wait(_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _python() -> str:
    """This interpreter; an embedding host (Triton's stub) may report its own binary as sys.executable."""
    if os.path.basename(sys.executable or "").startswith("python"):
        return sys.executable
    candidate = os.path.join(sys.exec_prefix, "bin", "python3")
    return candidate if os.access(candidate, os.X_OK) else (shutil.which("python3") or "python3")


def _serve(inbox: Connection, outbox: Connection, fn: Callable[[Any], Any] | None) -> None:
    """The child: answer each item of each request with (True, value) or (False, reason); exit on EOF or None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)  # one item at a time; the host decides the parallelism
    if fn is None:
        fn = inbox.recv()
    outbox.send(("ready", os.getpid()))
    while True:
        try:
            items = inbox.recv()
        except (EOFError, OSError):
            return
        if items is None:
            return
        for item in items:
            try:
                answer = (True, fn(item))
            except Exception as exc:  # noqa: BLE001 - reported per item: the child lives on
                answer = (False, str(exc) if isinstance(exc, DecodeError) else f"{type(exc).__name__}: {exc}")
            outbox.send(answer)


def _subprocess_main() -> None:
    """`python -m pipelines.isolate`: requests on stdin, answers on the original stdout (now private)."""
    answers = os.dup(1)
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the answers
    _serve(Connection(0, writable=False), Connection(answers, readable=False), None)


@dataclass(frozen=True)
class DecodeResize:
    """bytes -> uint8 [3, H, W] numpy: `preprocess.resize(decode(blob, max_pixels=...))` (no resize if None)."""

    preprocess: Preprocess | None
    max_pixels: int | None

    def __call__(self, blob: bytes) -> np.ndarray | dict[str, np.ndarray]:
        image = decode(blob, max_pixels=self.max_pixels)
        if self.preprocess is not None:
            image = self.preprocess.resize(image)  # a NaFlex checkpoint's: a dict of tensors
        # numpy pickles through the pipe (a tensor would go through /dev/shm)
        return {key: value.numpy() for key, value in image.items()} if isinstance(image, dict) else image.numpy()


class IsolatedDecoder:
    """Decode and resize blobs in a persistent child process; a blob that crashes or hangs it is an error.

    `decode_many(blobs)` returns per blob the uint8 [3, H, W] tensor `preprocess.resize(decode(blob))` gives,
    or the `DecodeError` (its reason, e.g. "too large: 30000x30000 (limit 89478485 pixels)", or "decoder
    crashed (signal 11)" for the blob that killed the child; the others are decoded by a new child).
    `preprocess=None` returns the decoded images unresized. The child starts in the constructor.
    """

    def __init__(self, preprocess: Preprocess | None, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 timeout_s: float = DEFAULT_TIMEOUT_S, start_method: str = "subprocess") -> None:
        self._isolated = Isolated(DecodeResize(preprocess, max_pixels), start_method=start_method,
                                  timeout_s=timeout_s)
        self._isolated.start()

    def __enter__(self) -> IsolatedDecoder:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def restarts(self) -> int:
        """How many times the child was replaced after a crash or a hang."""
        return self._isolated.restarts

    def decode_many(self, blobs: Sequence[bytes]) -> list[torch.Tensor | dict[str, torch.Tensor] | DecodeError]:
        """Per blob: uint8 [3, H, W] tensor (a NaFlex checkpoint: `NaFlexPreprocess.resize`'s dict), or the
        DecodeError saying why not."""
        out: list[torch.Tensor | DecodeError] = []
        for outcome in self._isolated.map(list(blobs)):
            if isinstance(outcome, Crashed):
                out.append(DecodeError(outcome.reason))
            elif outcome[0] and isinstance(outcome[1], dict):
                out.append({key: torch.from_numpy(value) for key, value in outcome[1].items()})
            elif outcome[0]:
                out.append(torch.from_numpy(outcome[1]))
            else:
                out.append(DecodeError(outcome[1]))
        return out

    def close(self) -> None:
        """Stop the child."""
        self._isolated.close()


if __name__ == "__main__":
    _subprocess_main()
