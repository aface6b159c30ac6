"""`python -m pipelines.serve`: a real tritonserver on `serving/` (the models of `names.MODELS`) until Ctrl-C.

The model, dtype, device and batch sizes come from conf/serve.yaml (the same `model` group as the embed job)
and are written into a rendered copy of the repository; see docs/serving.md.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from pipelines.config import CONF_DIR, clean_errors
from pipelines.serve import ServerError, names
from pipelines.serve.install import check_shm
from pipelines.serve.process import TritonServer, prepare_server

log = logging.getLogger("pipelines.serve")  # run as __main__

# A server that keeps dying right after it is replaced is not going to get better: give up then.
MAX_CRASHES = 3
CRASH_WINDOW_S = 600.0


def run_serve(*, run_dir: str | Path | None, **settings: Any) -> None:
    """Start the server, wait until every model is ready, log the URLs, serve until SIGINT / SIGTERM, stop.

    `settings`: conf/serve.yaml's other keys, as `process.prepare_server` takes them. While it serves, a model
    whose backend stub dies is reloaded (see `pipelines.serve.watchdog`).
    """
    check_shm(max_batch_size=settings["max_batch_size"])
    temporary = run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="siglip-serve-") if temporary else run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so the server (in its own session) is always stopped on the way out.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = prepare_server(run_dir=run_dir, **settings)
        with server:
            _serve(server, settings["ready_timeout_s"])
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if temporary:  # kept when the server failed: its log is named in the error
        shutil.rmtree(run_dir, ignore_errors=True)


def _serve(server: TritonServer, ready_timeout_s: float) -> None:
    start = time.monotonic()
    server.wait_ready(ready_timeout_s)
    log.info("tritonserver (pid %d) ready in %.1f s: HTTP http://%s, gRPC %s; models %s at "
             "http://%s/v2/models/<model>/infer; Ctrl-C stops it", server.process.pid,
             time.monotonic() - start, server.http_url, server.grpc_url, ", ".join(names.MODELS), server.http_url)
    crashes: list[float] = []
    while True:
        if server.returncode() is not None:  # the server itself died (a signal, an abort): a new one
            crashes = [t for t in crashes if t > time.monotonic() - CRASH_WINDOW_S] + [time.monotonic()]
            if len(crashes) > MAX_CRASHES:
                raise ServerError(f"tritonserver exited on its own {len(crashes)} times in "
                                  f"{CRASH_WINDOW_S / 60:.0f} minutes, last with status "
                                  f"{server.returncode()}{server.log_tail()}")
            log.error("tritonserver exited on its own with status %s%s; starting a new one", server.returncode(),
                      server.log_tail())
            server.restart_needed.set()
        if server.restart_needed.is_set():  # or a crashed stub Triton could not let go of (watchdog)
            start = time.monotonic()
            server.restart()
            log.info("tritonserver restarted (pid %d), ready in %.1f s", server.process.pid, time.monotonic() - start)
        time.sleep(0.5)


def _interrupt(signum: int, frame) -> None:
    # Once: a second Ctrl-C must not cut the server's shutdown short and leave it running.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


@hydra.main(config_path=CONF_DIR, config_name="serve", version_base="1.3")
@clean_errors()  # ServerError is a UserError
def main(cfg: DictConfig) -> None:
    settings = OmegaConf.to_container(cfg, resolve=True)
    model = settings.pop("model")
    run_serve(model=model["name_or_path"], revision=model["revision"], **settings)


if __name__ == "__main__":
    main()
