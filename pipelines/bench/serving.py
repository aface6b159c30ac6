"""`python -m pipelines.bench.serving`: the serving figures of docs/serving.md, measured side by side in one run.

Starts tritonserver on the repository (model=tiny by default, the other server settings from conf/serve.yaml),
then measures `siglip` with the load generator (HTTP/JSON, HTTP binary, gRPC at each concurrency), with
perf_analyzer (the seed's command, a shorter window, its figures read from its `-f` CSV report), and the same
model in-process (`Encoder.embed`, no server) at batch 1 and at the batch sizes the server formed. Prints a
Markdown table and writes it to `output`.
"""

from __future__ import annotations

import csv
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
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from pipelines.config import CONF_DIR, UserError, clean_errors
from pipelines.serve import loadgen, names
from pipelines.serve.process import prepare_server
from pipelines.siglip import WeightsUnavailableError, load_encoder

log = logging.getLogger(__name__)

# perf_analyzer's -i for each protocol, and the tensor format flags (http-json: the seed's JSON request).
PERF_PROTOCOLS = {
    "http": ["-i", "http"],
    "grpc": ["-i", "grpc"],
    "http-json": ["-i", "http", "--input-tensor-format=json", "--output-tensor-format=json"],
}


def run_bench(*, concurrency: list[int], protocols: list[str], duration_s: float, warmup_s: float,
              perf_protocols: list[str], perf_interval_ms: int, pixel_values: str, num_threads: int,
              output: str | Path | None, server: dict[str, Any]) -> list[dict[str, Any]]:
    """All three measurements against one server and one in-process encoder; returns the table's rows.

    `server`: the launcher's settings (conf/serve.yaml's keys, as `prepare_server` takes them).
    """
    payload = loadgen.load_pixel_values(pixel_values)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="siglip-bench-") as run_dir:
        started = prepare_server(run_dir=Path(run_dir), **server)
        with started:
            started.wait_ready(server["ready_timeout_s"])
            ports = {"host": "localhost", "http_port": started.http_port, "grpc_port": started.grpc_port}
            for protocol in protocols:
                for n in concurrency:
                    result = loadgen.run_load(model=names.SIGLIP, protocol=protocol, concurrency=n,
                                              duration_s=duration_s, warmup_s=warmup_s, payload=payload, **ports)
                    log.info("%s", result.report())
                    rows.append({"source": "loadgen", **result.summary()})
            for protocol in perf_protocols:
                for n in concurrency:
                    rows.append(run_perf_analyzer(protocol=protocol, concurrency=n, interval_ms=perf_interval_ms,
                                                  input_data=pixel_values, **ports))
    formed = [r["server_inferences"] / r["server_executions"] for r in rows
              if r.get("server_executions") and r["concurrency"] == max(concurrency)]
    batches = sorted({1, round(float(np.median(formed))) if formed else server["max_batch_size"]})
    rows += in_process(server["model"], payload=torch.from_numpy(payload), batch_sizes=batches,
                       num_threads=num_threads, duration_s=min(duration_s, 5.0))
    table = loadgen.format_table(rows)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(table + "\n")
    return rows


def perf_analyzer_command(*, url: str, protocol: str, concurrency: int, interval_ms: int, input_data: str,
                          report: str | Path) -> list[str]:
    """The seed's perf_analyzer command with the server's URL, a protocol, a concurrency, a window length, and
    its CSV report (`-f`, with the average latency: `--verbose-csv`) written to `report`."""
    if protocol not in PERF_PROTOCOLS:
        raise ServerBenchError(f"perf_protocols: {protocol!r}: expected one of {', '.join(PERF_PROTOCOLS)}")
    return [sys.executable, "-m", "pipelines.serve.perf_analyzer", "-m", names.SIGLIP, "-u", url,
            *PERF_PROTOCOLS[protocol], "-v", "--input-data", str(input_data), "--measurement-mode=time_windows",
            f"--measurement-interval={interval_ms}", f"--concurrency-range={concurrency}",
            "--latency-threshold=1000", "-f", str(report), "--verbose-csv"]


def run_perf_analyzer(*, protocol: str, concurrency: int, interval_ms: int, input_data: str, host: str,
                      http_port: int, grpc_port: int) -> dict[str, Any]:
    """One perf_analyzer run -> a table row of its client-side figures and the server's counts during the run."""
    url = f"{host}:{grpc_port if protocol == 'grpc' else http_port}"
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as folder:
        report = Path(folder) / "report.csv"
        command = perf_analyzer_command(url=url, protocol=protocol, concurrency=concurrency,
                                        interval_ms=interval_ms, input_data=input_data, report=report)
        log.info("running %s", " ".join(command[2:]))
        before = loadgen.server_counts(names.SIGLIP, host=host, http_port=http_port)
        out = subprocess.run(command, check=False, capture_output=True, text=True,
                             timeout=interval_ms / 1000 * 12 + 120).stdout
        after = loadgen.server_counts(names.SIGLIP, host=host, http_port=http_port)
        row = read_perf_report(report) if report.is_file() else unstable_figures(out)
    if isinstance(row["infer_per_s"], str):
        log.warning("perf_analyzer found no stable measurement:\n%s", out[-2000:])
    else:
        row.update(server_inferences=after[0] - before[0], server_executions=after[1] - before[1])
    return {"source": "perf_analyzer", "protocol": protocol, "concurrency": concurrency, **row}


def read_perf_report(path: str | Path) -> dict[str, Any]:
    """perf_analyzer's `-f` CSV report (one concurrency) -> infer_per_s and avg/p50/p90/p95/p99 latency in ms."""
    with open(path, newline="") as report:
        [measured] = list(csv.DictReader(report))
    row: dict[str, Any] = {"infer_per_s": float(measured["Inferences/Second"])}
    columns = {"avg_ms": "Avg latency", **{f"p{q}_ms": f"p{q} latency" for q in loadgen.PERCENTILES}}
    row.update({key: round(int(measured[column]) / 1000, 2) for key, column in columns.items()
                if measured.get(column)})
    return row


def unstable_figures(out: str) -> dict[str, Any]:
    """Without a stable measurement (no three windows within 10% of each other, as on a busy machine),
    perf_analyzer writes no report: "<mean of the last three windows' throughput> (unstable)" and their mean
    latency, from its -v output; "failed" when it measured nothing."""
    passes = re.findall(r"throughput: ([\d.]+) infer/sec. Avg latency: (\d+) usec", out)[-3:]
    if not passes:
        return {"infer_per_s": "failed"}
    mean = np.array(passes, dtype=float).mean(0)
    return {"infer_per_s": f"{mean[0]:.2f} (unstable)", "avg_ms": round(mean[1] / 1000, 2)}


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


class ServerBenchError(UserError):
    """A setting of the serving benchmark that cannot be measured."""


@hydra.main(config_path=CONF_DIR, config_name="serve_bench", version_base="1.3")
@clean_errors(WeightsUnavailableError)  # and ServerError, a UserError
def main(cfg: DictConfig) -> None:
    # The server as `python -m pipelines.serve` would start it, but on CPU, on free ports, quietly.
    server = OmegaConf.to_container(compose(config_name="serve"), resolve=True)
    del server["model"], server["run_dir"]  # the run folder is the benchmark's own temporary one
    server.update(model=cfg.model.name_or_path, revision=cfg.model.revision, device="cpu",
                  num_threads=cfg.num_threads, max_batch_size=cfg.max_batch_size, http_port=0, grpc_port=0,
                  address="127.0.0.1", echo_log=False)
    rows = run_bench(
        concurrency=list(cfg.concurrency), protocols=list(cfg.protocols), duration_s=cfg.duration_s,
        warmup_s=cfg.warmup_s, perf_protocols=list(cfg.perf_protocols), perf_interval_ms=cfg.perf_interval_ms,
        pixel_values=cfg.pixel_values, num_threads=cfg.num_threads, output=cfg.output, server=server,
    )
    print(loadgen.format_table(rows))
    if cfg.output:
        print(f"written to {cfg.output}")


if __name__ == "__main__":
    main()
