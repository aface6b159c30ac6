"""Shards as others write them: img2dataset's WebDataset and Parquet outputs, a Hugging Face dataset written by
`datasets`, and real servers to read them from (an HTTP server with ranges and injected failures, moto's S3)."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from helpers.images import SAMPLE


def sample_files(split: str) -> list[Path]:
    """data/sample's images of a split, sorted (class folder / file)."""
    return sorted((SAMPLE / split).glob("*/*.png"))


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_webdataset(out: Path, files: list[Path], *, per_shard: int) -> list[Path]:
    """img2dataset's `output_format=webdataset` folder: NNNNN.tar (key.png, key.txt, key.json, key.cls) with, beside
    each, NNNNN.parquet (its metadata) and NNNNN_stats.json. Keys: 5 shard digits + 4 index digits."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard, start in enumerate(range(0, len(files), per_shard)):
        rows = []
        with tarfile.open(out / f"{shard:05d}.tar", "w", format=tarfile.GNU_FORMAT) as tar:
            for i, f in enumerate(files[start:start + per_shard]):
                key = f"{shard:05d}{i:04d}"
                meta = {"url": f"https://example.org/{f.parent.name}/{f.name}", "caption": f"a {f.parent.name}",
                        "key": key, "status": "success", "width": 28, "height": 28}
                add_member(tar, f"{key}.png", f.read_bytes())
                add_member(tar, f"{key}.txt", meta["caption"].encode())
                add_member(tar, f"{key}.json", json.dumps(meta).encode())
                add_member(tar, f"{key}.cls", f.parent.name.encode())
                rows.append(meta)
        pq.write_table(pa.Table.from_pylist(rows), out / f"{shard:05d}.parquet")
        (out / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(rows)}))
        shards.append(out / f"{shard:05d}.tar")
    return shards


def write_img2dataset_parquet(out: Path, files: list[Path], *, per_shard: int, row_group_size: int = 16) -> None:
    """img2dataset's `output_format=parquet`: NNNNN.parquet with key, jpg (the encoded image, binary), caption,
    url, width, height, status (here the images are PNGs: encode_format=png names the column png)."""
    out.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, len(files), per_shard)):
        rows = [{"key": f"{shard:05d}{i:04d}", "png": f.read_bytes(), "caption": f"a {f.parent.name}",
                 "url": f"https://example.org/{f.parent.name}/{f.name}", "width": 28, "height": 28,
                 "status": "success", "label_name": f.parent.name}
                for i, f in enumerate(files[start:start + per_shard])]
        pq.write_table(pa.Table.from_pylist(rows), out / f"{shard:05d}.parquet", row_group_size=row_group_size)


def write_hf_dataset(repo: Path, splits: dict[str, list[Path]]) -> list[str]:
    """A Hugging Face dataset written by `datasets`: an Image feature and a ClassLabel, in the hub's file layout
    data/<split>-00000-of-00001.parquet. Returns the class names."""
    import datasets

    names = sorted({f.parent.name for files in splits.values() for f in files})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    (repo / "data").mkdir(parents=True, exist_ok=True)
    for split, files in splits.items():
        ds = datasets.Dataset.from_dict({"image": [str(f) for f in files],
                                         "label": [names.index(f.parent.name) for f in files]}, features=features)
        ds.to_parquet(str(repo / "data" / f"{split}-00000-of-00001.parquet"))
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support; `fail` (class-level) holds paths whose next response breaks off after
    `break_after` bytes (the connection closed mid-body), once per entry."""

    fail: dict[str, int] = {}
    requests: list[str] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        type(self).requests.append(self.path)
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end = 0, len(data) - 1
        ranged = self.headers.get("Range")
        if ranged and ranged.startswith("bytes="):
            a, _, b = ranged[6:].partition("-")
            start, end = int(a or 0), min(int(b) if b else len(data) - 1, len(data) - 1)
        body = data[start:end + 1]
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if head:
            return
        cut = type(self).fail.pop(self.path, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[tuple[str, type[RangeHandler]]]:
    """A real HTTP server on 127.0.0.1 serving `root`; yields its base URL and its handler class."""
    handler = type("Handler", (RangeHandler,), {"fail": {}, "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a: handler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's standalone S3-compatible server on a free local port; yields its endpoint URL."""
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


S3_OPTIONS = {"key": "testing", "secret": "testing"}


def s3_options(endpoint: str) -> dict:
    return {**S3_OPTIONS, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def create_bucket(endpoint: str, name: str) -> None:
    """A bucket on the S3 server at `endpoint` (us-east-1: no location constraint)."""
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=name)
