"""`python -m pipelines.serve.loadgen`: closed-loop load on a running server, measured like perf_analyzer.

Each of `concurrency` threads sends one request, waits for its answer, and sends the next, for `duration_s`
after `warmup_s`; every request carries one image. Protocols: `http-json` (the seed's JSON body, encoded once),
`http` (tritonclient, binary tensors), `grpc` (tritonclient). Prints throughput and p50/p90/p95/p99 latency,
and the server's own count of inferences and executions (how well it batched).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipelines.config import CONF_DIR, UserError, clean_errors
from pipelines.serve import names

log = logging.getLogger(__name__)

PROTOCOLS = ("http-json", "http", "grpc")
PERCENTILES = (50, 90, 95, 99)


@dataclass
class LoadResult:
    """One measurement: latencies of the requests that finished inside the window, errors, server counts."""

    model: str
    protocol: str
    concurrency: int
    window_s: float
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    server_inferences: int = 0
    server_executions: int = 0

    @property
    def throughput(self) -> float:
        """Successful requests (= images) per second."""
        return len(self.latencies_s) / self.window_s if self.window_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else float("nan")

    def summary(self) -> dict[str, Any]:
        """JSON-friendly figures: requests, errors, infer/s, avg and percentile latencies (ms), batching."""
        figures = {
            "model": self.model, "protocol": self.protocol, "concurrency": self.concurrency,
            "requests": len(self.latencies_s), "errors": self.errors, "window_s": round(self.window_s, 2),
            "infer_per_s": round(self.throughput, 2),
            "avg_ms": round(float(np.mean(self.latencies_s)) * 1000, 2) if self.latencies_s else None,
        }
        figures.update({f"p{q}_ms": round(self.percentile_ms(q), 2) for q in PERCENTILES})
        figures.update(server_inferences=self.server_inferences, server_executions=self.server_executions)
        return figures

    def report(self) -> str:
        """A few lines in perf_analyzer's manner."""
        s = self.summary()
        lines = [
            f"{self.model} over {self.protocol}, concurrency {self.concurrency}, {s['window_s']} s:",
            f"  requests {s['requests']}, errors {s['errors']}, throughput {s['infer_per_s']} infer/sec",
            f"  avg latency {s['avg_ms']} ms; " + ", ".join(f"p{q} {s[f'p{q}_ms']} ms" for q in PERCENTILES),
        ]
        if self.server_executions:
            lines.append(f"  server: {self.server_inferences} inferences in {self.server_executions} executions "
                         f"(avg batch {self.server_inferences / self.server_executions:.1f})")
        if self.first_error:
            lines.append(f"  first error: {self.first_error}")
        return "\n".join(lines)


def load_pixel_values(path: str | Path) -> np.ndarray:
    """perf_analyzer input data (e.g. data/siglip/pixel_values.json) -> its first PIXEL_VALUES, float32 [1, 3, H, W]."""
    try:
        entry = json.loads(Path(path).read_text())["data"][0][names.PIXEL_VALUES]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise UserError(f"{path}: not perf_analyzer input data with a {names.PIXEL_VALUES} entry ({exc})") from exc
    if "b64" in entry:
        array = np.frombuffer(base64.b64decode(entry["b64"]), dtype="<f4")
    else:
        array = np.asarray(entry["content"], dtype=np.float32)
    return array.astype(np.float32).reshape([1, *entry.get("shape", [3, 384, 384])])


def make_payload(model: str, *, pixel_values: str | Path | None = None, image: str | Path | None = None) -> np.ndarray:
    """One request's tensor: float32 [1, 3, H, W] for siglip, BYTES [1, 1] (one image file) for embed_image."""
    if model == names.SIGLIP:
        if pixel_values is None:
            raise UserError("triton_model=siglip needs pixel_values=FILE (perf_analyzer input data)")
        return load_pixel_values(pixel_values)
    if model == names.EMBED_IMAGE:
        if image is None or not Path(image).is_file():
            raise UserError(f"triton_model=embed_image needs image=FILE, an image file to send (got {image!r})")
        return np.array([[Path(image).read_bytes()]], dtype=object)
    raise UserError(f"triton_model={model!r}: expected {names.SIGLIP} or {names.EMBED_IMAGE}")


def make_sender(protocol: str, *, model: str, payload: np.ndarray, host: str, http_port: int,
                grpc_port: int) -> Callable[[], np.ndarray]:
    """A function that sends one request and returns the embedding, float32 [1, D]; raises on any error.

    Call it from one thread only: the tritonclient HTTP client must not be shared across threads.
    """
    input_name = names.PIXEL_VALUES if model == names.SIGLIP else names.IMAGE
    datatype = "FP32" if payload.dtype == np.float32 else "BYTES"
    if protocol == "http-json":
        return _json_sender(f"http://{host}:{http_port}/v2/models/{model}/infer", input_name, payload)
    if protocol == "http":
        import tritonclient.http as client_lib

        client = client_lib.InferenceServerClient(f"{host}:{http_port}", network_timeout=300)
        tensor = client_lib.InferInput(input_name, list(payload.shape), datatype)
        tensor.set_data_from_numpy(payload, binary_data=True)
        outputs = [client_lib.InferRequestedOutput(names.EMBEDDING, binary_data=True)]
    elif protocol == "grpc":
        import tritonclient.grpc as client_lib

        client = client_lib.InferenceServerClient(f"{host}:{grpc_port}")
        tensor = client_lib.InferInput(input_name, list(payload.shape), datatype)
        tensor.set_data_from_numpy(payload)
        outputs = [client_lib.InferRequestedOutput(names.EMBEDDING)]
    else:
        raise UserError(f"protocol={protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    return lambda: client.infer(model, [tensor], outputs=outputs).as_numpy(names.EMBEDDING)


def _json_sender(url: str, input_name: str, payload: np.ndarray) -> Callable[[], np.ndarray]:
    import requests

    if payload.dtype != np.float32:
        raise UserError("protocol=http-json sends FP32 pixel values (the seed's request); image files are raw "
                        "bytes, which JSON cannot carry: use protocol=http or grpc for embed_image")
    # The seed's request body, encoded once as perf_analyzer does, so the client's JSON encoding is not timed.
    body = json.dumps({"inputs": [{"name": input_name, "shape": list(payload.shape), "datatype": "FP32",
                                   "data": payload.flatten().tolist()}]}).encode()
    session = requests.Session()

    def send() -> np.ndarray:
        response = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=300)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        return np.array(response.json()["outputs"][0]["data"], dtype=np.float32)

    return send


def run_load(*, model: str, protocol: str, concurrency: int, duration_s: float, payload: np.ndarray,
             warmup_s: float, host: str, http_port: int, grpc_port: int) -> LoadResult:
    """`concurrency` closed-loop clients for `warmup_s` + `duration_s`; counts what finished inside the window."""
    if concurrency < 1 or duration_s <= 0:
        raise UserError(f"concurrency={concurrency}, duration_s={duration_s}: both must be positive")
    connect = {"model": model, "payload": payload, "host": host, "http_port": http_port, "grpc_port": grpc_port}
    make_sender(protocol, **connect)  # fail here, once, on a bad protocol or payload
    window = [float("inf"), float("inf")]
    stop = threading.Event()
    results = [LoadResult(model, protocol, concurrency, duration_s) for _ in range(concurrency)]
    threads = [threading.Thread(target=_client, args=(make_sender, protocol, connect, window, stop, result),
                                daemon=True) for result in results]
    for thread in threads:
        thread.start()
    time.sleep(warmup_s)
    before = server_counts(model, host=host, http_port=http_port)
    window[0] = time.perf_counter()
    window[1] = window[0] + duration_s
    time.sleep(duration_s)
    after = server_counts(model, host=host, http_port=http_port)
    stop.set()
    for thread in threads:
        thread.join()
    total = LoadResult(model, protocol, concurrency, duration_s,
                       server_inferences=after[0] - before[0], server_executions=after[1] - before[1])
    for result in results:
        total.latencies_s += result.latencies_s
        total.errors += result.errors
        total.first_error = total.first_error or result.first_error
    return total


def _client(factory, protocol: str, connect: dict, window: list[float], stop: threading.Event,
            result: LoadResult) -> None:
    try:
        send = factory(protocol, **connect)
    except Exception as exc:  # noqa: BLE001 - a client that cannot even connect counts as one error
        result.errors, result.first_error = 1, f"{type(exc).__name__}: {exc}"
        return
    while not stop.is_set():
        start = time.perf_counter()
        try:
            send()
        except Exception as exc:  # noqa: BLE001 - any failure of a request is counted, not fatal to the run
            end = time.perf_counter()
            if window[0] <= end <= window[1]:
                result.errors += 1
                result.first_error = result.first_error or f"{type(exc).__name__}: {str(exc)[:300]}"
            time.sleep(0.01)
            continue
        end = time.perf_counter()
        if window[0] <= end <= window[1]:
            result.latencies_s.append(end - start)


def server_counts(model: str, *, host: str, http_port: int) -> tuple[int, int]:
    """The server's (inference_count, execution_count) for `model` so far; (0, 0) when it cannot say."""
    import tritonclient.http as client_lib

    try:
        stats = client_lib.InferenceServerClient(f"{host}:{http_port}").get_inference_statistics(model)
        entry = stats["model_stats"][0]
        return int(entry["inference_count"]), int(entry["execution_count"])
    except Exception as exc:  # noqa: BLE001 - statistics are a bonus; the client-side figures stand without them
        log.warning("no server statistics for %s: %s", model, exc)
        return 0, 0


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `LoadResult.summary()` dicts (other rows may leave columns out)."""
    columns = ["source", "protocol", "concurrency", "infer_per_s", "avg_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms",
               "requests", "errors", "avg_batch"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        row = dict(row)
        if row.get("server_executions"):
            row["avg_batch"] = round(row["server_inferences"] / row["server_executions"], 1)
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def run_loadgen(*, model: str, protocols: list[str], concurrency: list[int], duration_s: float,
                warmup_s: float, pixel_values: str | None, image: str | None, host: str, http_port: int,
                grpc_port: int, output: str | None) -> list[dict[str, Any]]:
    """Every protocol at every concurrency, one after another; returns the summaries (and appends them to
    `output` as JSON lines when given)."""
    payload = make_payload(model, pixel_values=pixel_values, image=image)
    rows = []
    for protocol in protocols:
        for n in concurrency:
            result = run_load(model=model, protocol=protocol, concurrency=n, duration_s=duration_s,
                              warmup_s=warmup_s, payload=payload, host=host, http_port=http_port,
                              grpc_port=grpc_port)
            log.info("%s", result.report())
            rows.append({"source": "loadgen", **result.summary()})
    if output:
        with open(output, "a") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


@hydra.main(config_path=CONF_DIR, config_name="loadgen", version_base="1.3")
@clean_errors()
def main(cfg: DictConfig) -> None:
    settings = OmegaConf.to_container(cfg, resolve=True)
    print(format_table(run_loadgen(model=settings.pop("triton_model"), **settings)))


if __name__ == "__main__":
    main()
