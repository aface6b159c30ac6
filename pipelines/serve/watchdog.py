"""Python backend stubs: finding a server's stubs, telling how one ended, and reloading a model whose stub died.

Triton 2.51 neither restarts a dead stub nor stops reporting its model ready (see StubWatchdog).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.serve import ServerError
from pipelines.serve.install import STUB

if TYPE_CHECKING:
    from pipelines.serve.process import TritonServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stub:
    """One Python backend stub process: pid, start time (tells a reused pid apart), model, /dev/shm region."""

    pid: int
    start_time: int
    model: str
    shm_region: str


def list_stubs(server_pid: int) -> list[Stub]:
    """The live Python backend stubs that are children of `server_pid` (a stub's own children are not)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # A stub's command line: the stub, <repository>/<model>/<version>/model.py, its shm region name, ...
        if int(fields[1]) != server_pid or len(argv) < 3 or Path(os.fsdecode(argv[0])).name != STUB:
            continue
        found.append(Stub(pid=int(entry.name), start_time=int(fields[19]),
                          model=Path(os.fsdecode(argv[1])).parent.parent.name, shm_region=os.fsdecode(argv[2])))
    return found


def stub_exit(stub: Stub) -> str | None:
    """None while `stub` lives; else how it ended ('killed by signal 9', 'exited with status 1', 'ended')."""
    try:
        fields = Path(f"/proc/{stub.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return "ended"
    if int(fields[19]) != stub.start_time:
        return "ended"  # the pid belongs to another process now
    if fields[0] not in ("Z", "X"):
        return None
    status = int(fields[49]) if len(fields) > 49 else 0  # a zombie's wait status (Linux 3.5+)
    return f"killed by signal {status & 0x7F}" if status & 0x7F else f"exited with status {status >> 8}"


class StubWatchdog:
    """Reloads a model whose Python backend stub died: Triton 2.51 neither restarts the stub nor stops
    reporting the model ready; every request to it fails with "Stub process ... is not healthy" until then.

    Every `poll_s` it looks at the stubs the server had when the model was last (re)loaded. When one of them
    is dead it unloads the model (readiness turns false at once). If Triton ends the instance within
    `unload_timeout_s` (the dead stub reaped, its /dev/shm region freed), it loads the model again, retrying
    every `retry_s` if that fails. If not (a stub killed in the middle of a request can leave Triton waiting
    on it for good), it sets `server.restart_needed`: the launcher then replaces the server process.
    """

    def __init__(self, server: TritonServer, *, poll_s: float = 0.5, retry_s: float = 5.0,
                 unload_timeout_s: float = 5.0) -> None:
        self.server, self.poll_s, self.retry_s, self.unload_timeout_s = server, poll_s, retry_s, unload_timeout_s
        self.known: dict[str, list[Stub]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tritonserver-watchdog", daemon=True)

    def start(self) -> None:
        self.known = self._by_model(self.server.stubs())
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s) and self.server.returncode() is None:
            for model, stubs in list(self.known.items()):
                ended = {stub.pid: how for stub in stubs if (how := stub_exit(stub))}
                dead = [stub for stub in stubs if stub.pid in ended]
                if dead and not self._stop.is_set() and not self._heal(model, dead, ended):
                    return  # the server is to be replaced; its next watchdog takes over

    def _heal(self, model: str, dead: list[Stub], ended: dict[int, str]) -> bool:
        """Unload and reload `model`; False when the server itself must be restarted."""
        found = time.monotonic()
        for stub in dead:
            log.warning("model %s: its Triton backend stub (pid %d) %s; reloading the model", model, stub.pid,
                        ended[stub.pid])
        if not self._unload(model, dead):
            log.warning("model %s: Triton did not release the dead stub within %.0f s; restarting tritonserver",
                        model, self.unload_timeout_s)
            self.server.restart_needed.set()
            return False
        while not self._stop.is_set() and self.server.returncode() is None:
            try:
                self.server.load(model)
            except ServerError as exc:
                log.error("model %s: reload failed, retrying in %.0f s: %s", model, self.retry_s, exc)
                self._stop.wait(self.retry_s)
                continue
            self.known[model] = self._by_model(self.server.stubs()).get(model, [])
            log.info("model %s: ready again %.1f s after its stub was found dead", model, time.monotonic() - found)
            return True
        return True

    def _unload(self, model: str, dead: list[Stub]) -> bool:
        """Unload `model`; True once Triton has destroyed the instances: the model unavailable, the dead stubs
        reaped (Triton waits for a stub when it destroys its instance) and their regions gone."""
        deadline = time.monotonic() + self.unload_timeout_s
        try:
            self.server.control(f"repository/models/{model}/unload")
            while self.server.model_states().get(model) in ("READY", "UNLOADING") or any(
                    stub_exit(stub) != "ended" or (Path("/dev/shm") / stub.shm_region).exists()
                    for stub in dead):
                if time.monotonic() > deadline or self._stop.is_set():
                    return False
                time.sleep(0.1)
        except ServerError as exc:
            log.warning("model %s: unload failed: %s", model, exc)
            return False
        return True

    @staticmethod
    def _by_model(stubs: list[Stub]) -> dict[str, list[Stub]]:
        models: dict[str, list[Stub]] = {}
        for stub in stubs:
            models.setdefault(stub.model, []).append(stub)
        return models
