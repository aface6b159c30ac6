"""pipelines/explore/app.py on a real server: the API's answers equal the search module's and the store's; every
hostile or oversized request is a 4xx with a message (never a file outside the dataset) and the app keeps serving."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
from explore.conftest import LIMITS, make_explorer
from helpers.explore import running
from helpers.images import encode
from PIL import Image

from pipelines import store
from pipelines.errors import UserError
from pipelines.explore.images import ImageRefused, ImageStore
from pipelines.index import ModelMismatchError
from pipelines.search import run_search

pytestmark = pytest.mark.server
KEYS = {"path", "split", "label", "score"}
ANN = {"exact_below": 50000, "hnsw_below": 1000000, "ivf_nlist": "auto", "ivf_nprobe": 32, "ivf_train_rows": "auto",
       "ivf_train_iters": 10, "hnsw_m": 32, "hnsw_ef_construction": 80, "hnsw_ef_search": 128, "seed": 0}


@pytest.fixture(scope="module")
def url(explorer):
    with running(explorer) as base:
        yield base


def unit_rows(out, split):
    s = store.read_split(out, split)
    return s.paths, s.embeddings / np.linalg.norm(s.embeddings, axis=1, keepdims=True)


def test_text_search_equals_the_search_command(url, explored):
    got = requests.get(f"{url}/api/search", params={"text": "a photo of a bag", "k": 6}, timeout=60).json()
    want = run_search(embeddings_dir=explored["out"], splits=None, query="a photo of a bag", image=None, k=6,
                      index="exact", rebuild=False, index_dir=None, name_or_path="tiny", revision=None, device="cpu",
                      dtype="float32", max_image_pixels=None, ann_options=ANN, dataset_root=None)
    assert [set(r) for r in got["results"]] == [KEYS] * 6
    assert [r["path"] for r in got["results"]] == [r["path"] for r in want["results"]]
    np.testing.assert_allclose([r["score"] for r in got["results"]], [r["score"] for r in want["results"]],
                               atol=1e-5)


def test_more_like_this_is_the_rows_stored_embedding(url, explored):
    paths, x = unit_rows(explored["out"], "valid")
    me = paths[2]
    got = requests.get(f"{url}/api/search", params={"path": me, "k": 5}, timeout=60).json()["results"]
    assert me not in [r["path"] for r in got] and len(got) == 5
    train_paths, t = unit_rows(explored["out"], "train")
    every = dict(zip(paths + train_paths, np.concatenate([x, t]) @ x[2], strict=True))
    del every[me]
    best = sorted(every, key=every.get, reverse=True)[:5]
    assert [r["path"] for r in got] == best
    np.testing.assert_allclose([r["score"] for r in got], [every[p] for p in best], atol=1e-5)


def test_an_uploaded_row_image_finds_itself_and_filters_hold(url, explored):
    target = sorted((explored["root"] / "valid" / "sneaker").iterdir())[1]
    files = {"image": (target.name, target.read_bytes(), "image/png")}
    got = requests.post(f"{url}/api/search", params={"k": 3}, files=files, timeout=60).json()["results"]
    assert got[0]["path"] == f"valid/sneaker/{target.name}" and got[0]["score"] == pytest.approx(1.0, abs=1e-5)
    only = requests.post(f"{url}/api/search", params={"k": 50, "filter_split": "train", "filter_label": "bag"},
                         files=files, timeout=60).json()["results"]
    assert len(only) == 5 and {(r["split"], r["label"]) for r in only} == {("train", "bag")}  # 4 + escape.png
    none = requests.get(f"{url}/api/search", params={"text": "x", "filter_label": "nope"}, timeout=60).json()
    assert none["results"] == []


def test_image_is_a_thumbnail_of_the_row(url, explored):
    path = "valid/bag/" + min((explored["root"] / "valid" / "bag").iterdir()).name
    response = requests.get(f"{url}/api/image", params={"path": path, "size": 20}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG" and max(image.size) == 20  # the sample's 28 px shrunk, never the file itself


# The hostile requests tried, each with the status it must get. None of them may return a file's bytes.
HOSTILE_PATHS = [
    ("../secret.txt", 404), ("../../etc/passwd", 404), ("/etc/passwd", 404), ("valid/../../secret.txt", 404),
    ("%2e%2e/secret.txt", 404), ("..%2fsecret.txt", 404), ("%252e%252e%252fsecret.txt", 404),
    ("valid\\..\\..\\secret.txt", 404), ("valid/bag/\x00.png", 404), ("valid/bag/missing.png", 404),
    ("train/bag/escape.png", 404),  # a row, but its symlink leads outside the dataset
    ("", 400),
]


@pytest.mark.parametrize(("path", "status"), HOSTILE_PATHS)
def test_hostile_image_paths_are_refused(url, path, status):
    response = requests.get(f"{url}/api/image", params={"path": path}, timeout=60)
    assert response.status_code == status and response.headers["content-type"] == "application/json"
    assert response.json()["error"] and b"not for the web" not in response.content
    assert requests.get(f"{url}/api/info", timeout=60).status_code == 200


def test_raw_encoded_traversal_in_the_url_is_refused(url):
    for raw in ("/api/image?path=..%2F..%2Fsecret.txt", "/api/image?path=%2e%2e%2f%2e%2e%2fsecret.txt",
                "/static/..%2f..%2fapp.py", "/static/../app.py", "/api/image?path=valid%2F..%2F..%2Fsecret.txt"):
        response = requests.get(url + raw, timeout=60)
        assert response.status_code in (400, 404), raw
        assert b"not for the web" not in response.content and b"import" not in response.content


def test_image_store_checks_without_the_row_lookup(explored):
    images = ImageStore(explored["root"])
    for path, status in (("../secret.txt", 400), ("/etc/passwd", 400), ("a\\b", 400), ("a/\x00", 400),
                         ("train/bag/escape.png", 404), ("train/bag", 404), ("train/bag/none.png", 404)):
        with pytest.raises(ImageRefused) as exc:
            images.read(path)
        assert exc.value.status == status, path
    allowed = ImageStore(explored["root"], [explored["outside"]])  # a subset's source, say
    assert allowed.read("train/bag/escape.png") == (explored["outside"] / "secret.png").read_bytes()


def big_png(width: int, height: int) -> bytes:
    return encode(Image.new("RGB", (width, height), (200, 30, 30)), "PNG")  # compresses to a few kB


def chunks(total: int):
    """A multipart upload of `total` bytes, sent without a Content-Length (chunked)."""
    yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    sent = 0
    while sent < total:
        yield b"x" * 65536
        sent += 65536


BAD_REQUESTS = [
    ("long text", "get", {"params": {"text": "a" * 101}}, 400, "101 characters, at most 100"),
    ("empty text", "get", {"params": {"text": "  "}}, 400, "text: empty"),
    ("k zero", "get", {"params": {"text": "a", "k": 0}}, 400, "k='0'"),
    ("k huge", "get", {"params": {"text": "a", "k": 51}}, 400, "from 1 to 50"),
    ("k not a number", "get", {"params": {"text": "a", "k": "1e3"}}, 400, "k='1e3'"),
    ("neither", "get", {"params": {"k": 3}}, 400, "exactly one of text"),
    ("both", "get", {"params": {"text": "a", "path": "x"}}, 400, "exactly one of text"),
    ("unknown row", "get", {"params": {"path": "valid/bag/nope.png"}}, 404, "no row of the dataset"),
    ("upload too big", "post", {"files": {"image": ("a.png", b"\0" * 300_000)}}, 413, "larger than 200000 bytes"),
    ("chunked too big", "post", {"data": chunks(400_000),
                                 "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 413, "larger than"),
    ("too many pixels", "post", {"files": {"image": ("a.png", big_png(2000, 1000))}}, 400,
     "2000x1000"),
    ("not an image", "post", {"files": {"image": ("a.png", b"hello")}}, 400, "not an image"),
    ("empty image", "post", {"files": {"image": ("a.png", b"")}}, 400, "empty"),
    ("no image field", "post", {"files": {"picture": ("a.png", b"x")}}, 400, "field 'image'"),
    ("not multipart", "post", {"data": b"{}", "headers": {"Content-Type": "application/json"}}, 415, "multipart"),
    ("malformed multipart", "post", {"data": b"garbage", "headers": {
        "Content-Type": "multipart/form-data; boundary=x"}}, 400, "multipart"),
    ("truncated multipart", "post", {"data": b"--x\r\nbroken", "headers": {
        "Content-Type": "multipart/form-data; boundary=x"}}, 400, "no file in the multipart field 'image'"),
    ("size too big", "get_image", {"params": {"path": "valid/bag/x.png", "size": 5000}}, 400, "size='5000'"),
    ("no report", "report", {}, 404, "no zeroshot report"),
    ("unknown class", "class", {}, 404, "not in the validation report"),
]


@pytest.mark.parametrize(("what", "kind", "kw", "status", "message"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_are_4xx_with_a_message(url, what, kind, kw, status, message):
    target = {"get": ("GET", "/api/search"), "post": ("POST", "/api/search"), "get_image": ("GET", "/api/image"),
              "report": ("GET", "/api/reports/zeroshot"), "class": ("GET", "/api/reports/validation/classes/nope")}
    method, path = target[kind]
    response = requests.request(method, url + path, timeout=60, **kw)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert requests.get(f"{url}/api/search", params={"text": "still here", "k": 1}, timeout=60).status_code == 200


def test_reports_and_duplicates_are_the_files_beside_the_embeddings(url, explored):
    import pandas as pd

    validation = explored["out"].parent / "sample-tiny-validation"
    table = pd.read_csv(validation / "per_class.csv")
    got = requests.get(f"{url}/api/reports/validation", timeout=60).json()
    assert [c["label"] for c in got["classes"]] == table["label"].tolist()
    np.testing.assert_allclose([c["top1"] for c in got["classes"]], table["top1"], atol=1e-6)
    predictions = pd.read_parquet(validation / "predictions.parquet")
    worst = table.sort_values("top1").iloc[0]["label"]
    detail = requests.get(f"{url}/api/reports/validation/classes/{worst}", timeout=60).json()
    wrong = predictions[(predictions.label == worst) & (predictions.prediction != worst)]
    assert detail["wrong"] == len(wrong) and [m["path"] for m in detail["shown"]] == wrong["path"].tolist()
    for item, row in zip(detail["shown"], wrong.itertuples(), strict=True):
        assert [n["path"] for n in item["neighbours"]] == list(row.neighbours) and item["prediction"] == row.prediction
    pairs = pd.read_parquet(explored["out"].parent / "sample-tiny-duplicates" / "pairs.parquet")
    dup = requests.get(f"{url}/api/duplicates", params={"limit": 3}, timeout=60).json()
    assert dup["total"] == len(pairs) and [p["path_a"] for p in dup["pairs"]] == pairs["path_a"][:3].tolist()
    info = requests.get(f"{url}/api/info", timeout=60).json()
    assert set(info["reports"]) == {"validation", "duplicates"} and info["rows"] == 43
    assert info["splits"] == {"train": 25, "valid": 18} and info["labels"]["bag"] == 8


def test_startup_checks_are_one_line(explored, tmp_path):
    with pytest.raises(ModelMismatchError, match="model: 'tiny' stored, 'google/siglip-base-patch16-224'"):
        make_explorer(explored["out"], name_or_path="google/siglip-base-patch16-224")
    with pytest.raises(UserError, match="dataset_root=.*nowhere: no such folder"):
        make_explorer(explored["out"], dataset_root_dir=tmp_path / "nowhere")
    with pytest.raises(UserError, match="text_server='nohost': expected host:port"):
        make_explorer(explored["out"], text_server="nohost")
    assert LIMITS.max_k == 50


@pytest.mark.job
def test_cli_settings_are_one_line_before_anything_loads(explored):
    import subprocess
    import sys

    from pipelines.config import REPO_ROOT

    base = [sys.executable, "-m", "pipelines.explore", f"embeddings_dir={explored['out']}", "model=tiny"]
    for extra, message in ((["port=99999"], "error: port=99999: expected a TCP port"),
                           (["limits.max_k=0"], "error: limits.max_k=0: expected a whole number"),
                           (["model.name_or_path=other"], "error: the query encoder is not the model")):
        done = subprocess.run([*base, *extra], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                              check=False)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1].startswith(message)


def test_a_host_beyond_loopback_is_warned_about(caplog):
    from pipelines.explore.server import check_host

    with caplog.at_level("WARNING", logger="pipelines.explore.server"):
        assert check_host("127.0.0.1") == "127.0.0.1" and check_host("localhost") == "localhost"
        assert not caplog.records
        check_host("0.0.0.0")
    assert "open to every machine" in caplog.text


def test_the_page_travels_in_the_wheel():
    """pyproject ships pipelines.explore with every static file (an installed wheel serves the page)."""
    from fnmatch import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from pipelines.config import REPO_ROOT
    from pipelines.explore.app import STATIC

    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "pipelines.explore" in setuptools["packages"]
    globs = setuptools["package-data"]["pipelines.explore"]
    files = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert {"static/index.html", "static/app.js", "static/style.css"} <= set(files)
    assert all(any(fnmatch(f, g) for g in globs) for f in files)
