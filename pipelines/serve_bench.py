"""`python -m pipelines.serve_bench`: the serving figures of docs/serving.md, measured side by side in one run.

Starts tritonserver on the repository (model=tiny by default), then measures `siglip` with the load generator
(HTTP/JSON, HTTP binary, gRPC at each concurrency), with perf_analyzer (the seed's command, a shorter window),
and the same model in-process (`Encoder.embed`, no server) at batch 1 and at the batch sizes the server formed.
Prints a Markdown table and writes it to `output`.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from pipelines import loadgen, names, triton
from pipelines.config import CONF_DIR, REPO_ROOT, clean_errors
from pipelines.siglip import WeightsUnavailableError, load_encoder

log = logging.getLogger(__name__)


def run_bench(*, model: str, concurrency: list[int], protocols: list[str], duration_s: float, warmup_s: float,
              perf_protocols: list[str], perf_interval_ms: int, pixel_values: str, num_threads: int,
              max_batch_size: int, output: str | Path | None) -> list[dict[str, Any]]:
    """All three measurements against one server and one in-process encoder; returns the table's rows."""
    payload = loadgen.load_pixel_values(pixel_values)
    options = triton.ModelOptions(name_or_path=model, device="cpu", num_threads=str(num_threads),
                                  max_batch_size=max_batch_size)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="siglip-bench-") as run_dir:
        server = triton.prepare_server(run_dir=Path(run_dir), repository=REPO_ROOT / "serving", options=options,
                                       http_port=0, grpc_port=0, address="127.0.0.1")
        with server:
            server.wait_ready()
            ports = {"host": "localhost", "http_port": server.http_port, "grpc_port": server.grpc_port}
            for protocol in protocols:
                for n in concurrency:
                    result = loadgen.run_load(model=names.SIGLIP, protocol=protocol, concurrency=n,
                                              duration_s=duration_s, warmup_s=warmup_s, payload=payload, **ports)
                    log.info("%s", result.report())
                    rows.append({"source": "loadgen", **result.summary()})
            for protocol in perf_protocols:
                for n in concurrency:
                    rows.append(run_perf_analyzer(server, protocol=protocol, concurrency=n,
                                                  interval_ms=perf_interval_ms, input_data=pixel_values))
    formed = [r["server_inferences"] / r["server_executions"] for r in rows
              if r.get("server_executions") and r["concurrency"] == max(concurrency)]
    batches = sorted({1, round(float(np.median(formed))) if formed else max_batch_size})
    rows += in_process(model, payload=torch.from_numpy(payload), batch_sizes=batches, num_threads=num_threads,
                       duration_s=min(duration_s, 5.0))
    table = loadgen.format_table(rows)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(table + "\n")
    return rows


def perf_analyzer_command(*, url: str, protocol: str, concurrency: int, interval_ms: int, input_data: str) -> list[str]:
    """The seed's perf_analyzer command with the server's URL, a protocol, a concurrency and a window length."""
    return [sys.executable, "-m", "pipelines.perf_analyzer", "-m", names.SIGLIP, "-u", url, "-i", protocol, "-v",
            "--input-data", str(input_data), "--measurement-mode=time_windows",
            f"--measurement-interval={interval_ms}", f"--concurrency-range={concurrency}",
            "--latency-threshold=1000"]


def run_perf_analyzer(server: triton.TritonServer, *, protocol: str, concurrency: int, interval_ms: int,
                      input_data: str) -> dict[str, Any]:
    """One perf_analyzer run -> a table row of its client-side figures."""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    command = perf_analyzer_command(url=url, protocol=protocol, concurrency=concurrency, interval_ms=interval_ms,
                                    input_data=input_data)
    log.info("running %s", " ".join(command[2:]))
    out = subprocess.run(command, check=False, capture_output=True, text=True,
                         timeout=interval_ms / 1000 * 12 + 120).stdout
    row = parse_perf_analyzer(out)
    if isinstance(row["infer_per_s"], str):
        log.warning("perf_analyzer found no stable measurement:\n%s", out[-2000:])
    return {"source": "perf_analyzer", "protocol": protocol, "concurrency": concurrency, **row}


def parse_perf_analyzer(out: str) -> dict[str, Any]:
    """perf_analyzer's -v output -> infer_per_s, avg/p50/p90/p95/p99 ms, server inferences and executions.

    Without a stable measurement (no three windows within 10% of each other, as on a busy machine),
    infer_per_s is "<mean of the last three windows> (unstable)", with their mean latency.
    """
    found = {key: re.search(pattern, out) for key, pattern in _PERF_FIGURES.items()}
    if found["infer_per_s"] is None:
        passes = re.findall(r"throughput: ([\d.]+) infer/sec. Avg latency: (\d+) usec", out)[-3:]
        if not passes:
            return {"infer_per_s": "failed"}
        mean = np.array(passes, dtype=float).mean(0)
        return {"infer_per_s": f"{mean[0]:.2f} (unstable)", "avg_ms": round(mean[1] / 1000, 2)}
    row: dict[str, Any] = {"infer_per_s": float(found.pop("infer_per_s")[1])}
    row.update({key: round(int(match[1]) / 1000, 2) for key, match in found.items() if match})
    if counts := re.search(r"Inference count: (\d+)\s+Execution count: (\d+)", out):
        row.update(server_inferences=int(counts[1]), server_executions=int(counts[2]))
    return row


_PERF_FIGURES = {
    "infer_per_s": r"Client:[\s\S]*?Throughput: ([\d.]+) infer/sec",
    "avg_ms": r"Client:[\s\S]*?Avg latency: (\d+) usec",
    "p50_ms": r"p50 latency: (\d+) usec", "p90_ms": r"p90 latency: (\d+) usec",
    "p95_ms": r"p95 latency: (\d+) usec", "p99_ms": r"p99 latency: (\d+) usec",
}


def in_process(model: str, *, payload: torch.Tensor, batch_sizes: list[int], num_threads: int,
               duration_s: float) -> list[dict[str, Any]]:
    """`Encoder.embed` on float32 [B, 3, H, W] copies of `payload` for `duration_s` per batch size B."""
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)  # as many as the server's siglip instance has
    try:
        encoder = load_encoder(model, device="cpu", dtype="float32")
        rows = []
        for batch in batch_sizes:
            pixels = payload.expand(batch, -1, -1, -1).contiguous()
            encoder.embed(pixels)  # warm-up
            calls, latencies, start = 0, [], time.perf_counter()
            while time.perf_counter() - start < duration_s:
                tick = time.perf_counter()
                encoder.embed(pixels)
                latencies.append(time.perf_counter() - tick)
                calls += 1
            elapsed = time.perf_counter() - start
            rows.append({"source": "in-process", "protocol": f"Encoder.embed, batch {batch}", "concurrency": "",
                         "infer_per_s": round(calls * batch / elapsed, 2),
                         "avg_ms": round(elapsed / calls * 1000, 2),
                         "p50_ms": round(float(np.median(latencies)) * 1000, 2), "requests": calls})
        return rows
    finally:
        torch.set_num_threads(threads)


@hydra.main(config_path=CONF_DIR, config_name="serve_bench", version_base="1.3")
@clean_errors(triton.ServerError, WeightsUnavailableError)
def main(cfg: DictConfig) -> None:
    rows = run_bench(
        model=cfg.model.name_or_path, concurrency=list(cfg.concurrency), protocols=list(cfg.protocols),
        duration_s=cfg.duration_s, warmup_s=cfg.warmup_s, perf_protocols=list(cfg.perf_protocols),
        perf_interval_ms=cfg.perf_interval_ms, pixel_values=cfg.pixel_values, num_threads=cfg.num_threads,
        max_batch_size=cfg.max_batch_size, output=cfg.output,
    )
    print(loadgen.format_table(rows))
    if cfg.output:
        print(f"written to {cfg.output}")


if __name__ == "__main__":
    main()
