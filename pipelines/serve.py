"""`python -m pipelines.serve`: a real tritonserver on `serving/` (models `siglip`, `embed_image`) until Ctrl-C.

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

import hydra
from omegaconf import DictConfig

from pipelines import names, triton
from pipelines.config import CONF_DIR, clean_errors

log = logging.getLogger(__name__)

# A server that keeps dying right after it is replaced is not going to get better: give up then.
MAX_CRASHES = 3
CRASH_WINDOW_S = 600.0


def run_serve(
    *,
    model: str,
    repository: str | Path,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    num_threads: str | int = "auto",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int | None = None,
    address: str = "127.0.0.1",
    max_batch_size: int = 64,
    max_queue_delay_us: int = 2000,
    decode_instances: int = 1,
    max_pixels: int = 25_000_000,
    shm_default_mb: int = 16,
    shm_growth_mb: int = 16,
    tritonserver: str = "auto",
    run_dir: str | Path | None = None,
    ready_timeout_s: float = 900,
    exit_timeout_s: int = 5,
    echo_log: bool = True,
) -> None:
    """Start the server, wait until every model is ready, log the URLs, serve until SIGINT / SIGTERM, stop.

    While it serves, a model whose backend stub dies is reloaded (see `triton.StubWatchdog`).
    """
    if Path(model).expanduser().is_dir():  # the model instances run in other processes: no relative paths
        model = str(Path(model).expanduser().resolve())
    options = triton.ModelOptions(
        name_or_path=model, revision=revision, dtype=dtype, device=device, num_threads=str(num_threads),
        max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us, decode_instances=decode_instances,
        max_pixels=max_pixels,
    )
    triton.check_shm(max_batch_size=max_batch_size)
    temporary = run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="siglip-serve-") if temporary else run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so the server (in its own session) is always stopped on the way out.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = triton.prepare_server(
            run_dir=run_dir, repository=Path(repository), options=options, tritonserver=tritonserver,
            http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, address=address,
            shm_default_mb=shm_default_mb, shm_growth_mb=shm_growth_mb, exit_timeout_s=exit_timeout_s,
            load_timeout_s=ready_timeout_s, echo=echo_log,
        )
        with server:
            _serve(server, ready_timeout_s)
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if temporary:  # kept when the server failed: its log is named in the error
        shutil.rmtree(run_dir, ignore_errors=True)


def _serve(server: triton.TritonServer, ready_timeout_s: float) -> None:
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
                raise triton.ServerError(f"tritonserver exited on its own {len(crashes)} times in "
                                         f"{CRASH_WINDOW_S / 60:.0f} minutes, last with status "
                                         f"{server.returncode()}{server.log_tail()}")
            log.error("tritonserver exited on its own with status %s%s; starting a new one", server.returncode(),
                      server.log_tail())
            server.restart_needed.set()
        if server.restart_needed.is_set():  # or a crashed stub Triton could not let go of (StubWatchdog)
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
@clean_errors(triton.ServerError, ValueError)
def main(cfg: DictConfig) -> None:
    run_serve(
        model=cfg.model.name_or_path,
        revision=cfg.model.revision,
        repository=cfg.repository,
        device=cfg.device,
        dtype=cfg.dtype,
        num_threads=cfg.num_threads,
        http_port=cfg.http_port,
        grpc_port=cfg.grpc_port,
        metrics_port=cfg.metrics_port,
        address=cfg.address,
        max_batch_size=cfg.max_batch_size,
        max_queue_delay_us=cfg.max_queue_delay_us,
        decode_instances=cfg.decode_instances,
        max_pixels=cfg.max_pixels,
        shm_default_mb=cfg.shm_default_mb,
        shm_growth_mb=cfg.shm_growth_mb,
        tritonserver=cfg.tritonserver,
        run_dir=cfg.run_dir,
        ready_timeout_s=cfg.ready_timeout_s,
        exit_timeout_s=cfg.exit_timeout_s,
        echo_log=cfg.echo_log,
    )


if __name__ == "__main__":
    main()
