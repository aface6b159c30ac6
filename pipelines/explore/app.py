"""The explore web app (Starlette): the page, its static files, and the JSON API the page and scripts use.

Routes (every answer JSON, errors `{"error": "..."}` with a 4xx status, the app serving on):
  GET  /api/info                                      rows, splits and labels with counts, model, index, reports
  GET  /api/search?text=...&k=N                       text -> image search (the text tower)
  GET  /api/search?path=<row path>&k=N                "more like this": that row's stored embedding
  POST /api/search  (multipart field `image`)         an uploaded image, embedded by the vision tower
       all three: `filter_split=`, `filter_label=`; answer {"results": [{"path", "split", "label", "score"}]}
  GET  /api/image?path=<row path>&size=256            that row's image as a JPEG thumbnail
  GET  /api/reports/{validation|zeroshot}             per-class accuracy
  GET  /api/reports/{kind}/classes/{label}            a class's misclassified queries (and their neighbours)
  GET  /api/duplicates?offset=&limit=&cross=1         near-duplicate pairs (pipelines.dedup's output)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines.errors import UserError
from pipelines.explore.catalog import Catalog, UnknownRow
from pipelines.explore.images import ImageRefused, ImageStore, ThumbnailCache, thumbnail
from pipelines.explore.reports import Reports

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
FORM_SLACK = 64 * 1024  # a multipart body's own bytes (boundaries, headers, small fields) beside the file


@dataclass(frozen=True)
class Limits:
    """What one request may ask: query length, results, upload size and pixels, thumbnail sizes."""

    max_query_chars: int = 1000
    max_k: int = 200
    max_upload_bytes: int = 20 * 2**20
    max_upload_pixels: int = 25_000_000
    max_image_pixels: int | None = 89_478_485
    thumbnail_size: int = 256
    max_thumbnail_size: int = 1024


@dataclass
class Explorer:
    """Everything the routes use: the rows and index, image bytes, reports, query encoders, limits."""

    catalog: Catalog
    images: ImageStore
    reports: Reports
    text: Any  # LocalText | TritonText: .embed(str) -> float32 [1, D]
    image_queries: Any  # ImageQueries: .embed(bytes) -> float32 [1, D]
    limits: Limits
    info: dict[str, Any]
    thumbnails: ThumbnailCache


def bad(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def whole(request: Request, key: str, default: int, *, low: int, high: int) -> int:
    """A whole-number query parameter in [low, high] (400 naming it otherwise)."""
    raw = request.query_params.get(key)
    if raw in (None, ""):
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise bad(400, f"{key}={raw[:40]!r}: expected a whole number from {low} to {high}")
    return int(raw)


def filters(request: Request) -> dict[str, str | None]:
    q = request.query_params
    return {"split": q.get("filter_split") or None, "label": q.get("filter_label") or None}


def answer(hits: list, started: float, **extra: Any) -> JSONResponse:
    return JSONResponse({"results": [h.as_dict() for h in hits], **extra,
                         "ms": round(1000 * (time.perf_counter() - started), 2)})


async def search_get(request: Request) -> JSONResponse:
    ex: Explorer = request.app.state.explorer
    started = time.perf_counter()
    q = request.query_params
    k = whole(request, "k", 20, low=1, high=ex.limits.max_k)
    text, path = q.get("text"), q.get("path")
    if (text is None) == (path is None):
        raise bad(400, "give exactly one of text=... and path=... (or POST an image)")
    if text is not None:
        if ex.text is None:
            raise bad(400, "text search is off: the model's checkpoint has no text tower (vision-only)")
        text = text.strip()
        if not text:
            raise bad(400, "text: empty")
        if len(text) > ex.limits.max_query_chars:
            raise bad(400, f"text: {len(text)} characters, at most {ex.limits.max_query_chars}")
        vector = await run_in_threadpool(ex.text.embed, text)
        hits = await run_in_threadpool(ex.catalog.search, vector, k=k, **filters(request))
        return answer(hits, started, query={"text": text})
    try:
        row = ex.catalog.row_id(path, q.get("split") or None)
    except UnknownRow as exc:
        raise bad(404, str(exc)) from exc
    hits = await run_in_threadpool(ex.catalog.search, ex.catalog.vector(row), k=k, exclude=row,
                                   **filters(request))
    return answer(hits, started, query={"path": path})


class BodyTooLarge(Exception):
    """The request body ran past the upload limit while it was read."""


async def search_post(request: Request) -> JSONResponse:
    ex: Explorer = request.app.state.explorer
    started = time.perf_counter()
    k = whole(request, "k", 20, low=1, high=ex.limits.max_k)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad(415, "POST an image as multipart/form-data, field 'image'")
    try:
        form = await request.form(max_files=1, max_fields=8)
    except BodyTooLarge as exc:
        raise bad(413, f"upload larger than {ex.limits.max_upload_bytes} bytes") from exc
    except HTTPException:
        raise
    except Exception as exc:  # python-multipart's parse errors: a malformed body is the client's
        raise bad(400, f"malformed multipart body ({type(exc).__name__})") from exc
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise bad(400, "no file in the multipart field 'image'")
    data = await upload.read()
    await form.close()
    if len(data) > ex.limits.max_upload_bytes:
        raise bad(413, f"upload larger than {ex.limits.max_upload_bytes} bytes")
    try:
        vector = await run_in_threadpool(ex.image_queries.embed, data)
    except UserError as exc:  # DecodeError: not an image, too many pixels, empty
        raise bad(400, f"image: {exc}") from exc
    hits = await run_in_threadpool(ex.catalog.search, vector, k=k, **filters(request))
    return answer(hits, started, query={"image": upload.filename or "upload"})


def image_bytes(ex: Explorer, path: str, split: str | None, size: int) -> bytes:
    """The JPEG thumbnail of a row (cached); UnknownRow, ImageRefused or DecodeError otherwise."""
    ex.catalog.row_id(path, split)  # only rows of the dataset: looked up before any file is touched
    key = (path, size)
    cached = ex.thumbnails.get(key)
    if cached is None:
        cached = thumbnail(ex.images.read(path), size=size, max_pixels=ex.limits.max_image_pixels)
        ex.thumbnails.put(key, cached)
    return cached


async def image(request: Request) -> Response:
    ex: Explorer = request.app.state.explorer
    path = request.query_params.get("path")
    if not path:
        raise bad(400, "path: required (a row's path, as /api/search returns it)")
    size = whole(request, "size", ex.limits.thumbnail_size, low=16, high=ex.limits.max_thumbnail_size)
    try:
        data = await run_in_threadpool(image_bytes, ex, path, request.query_params.get("split") or None, size)
    except UnknownRow as exc:
        raise bad(404, str(exc)) from exc
    except ImageRefused as exc:
        raise bad(exc.status, str(exc)) from exc
    except UserError as exc:  # DecodeError: the stored file no longer decodes
        raise bad(422, f"path {path!r}: {exc}") from exc
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


async def info(request: Request) -> JSONResponse:
    ex: Explorer = request.app.state.explorer
    return JSONResponse({**ex.info, **ex.catalog.facets(), "reports": ex.reports.available(),
                         "limits": ex.limits.__dict__})


async def report(request: Request) -> JSONResponse:
    ex: Explorer = request.app.state.explorer
    kind = request.path_params["kind"]
    if kind not in ex.reports.folders:
        raise bad(404, f"no {kind} report beside the embeddings (run python -m pipelines.{_command(kind)})")
    return JSONResponse(await run_in_threadpool(ex.reports.per_class, kind))


async def report_class(request: Request) -> JSONResponse:
    ex: Explorer = request.app.state.explorer
    kind, label = request.path_params["kind"], request.path_params["label"]
    if kind not in ex.reports.folders:
        raise bad(404, f"no {kind} report beside the embeddings (run python -m pipelines.{_command(kind)})")
    limit = whole(request, "limit", 50, low=1, high=500)
    detail = await run_in_threadpool(ex.reports.misclassified, kind, label, limit=limit)
    if detail is None:
        raise bad(404, f"class {label[:80]!r}: not in the {kind} report")
    return JSONResponse(detail)


async def duplicates(request: Request) -> JSONResponse:
    ex: Explorer = request.app.state.explorer
    if ex.reports.pairs_path is None:
        raise bad(404, "no near-duplicate pairs beside the embeddings (run python -m pipelines.dedup)")
    offset = whole(request, "offset", 0, low=0, high=10**9)
    limit = whole(request, "limit", 50, low=1, high=500)
    cross = request.query_params.get("cross", "0") in ("1", "true")
    return JSONResponse(await run_in_threadpool(ex.reports.duplicates, offset=offset, limit=limit, cross=cross))


def _command(kind: str) -> str:
    return "validate" if kind == "validation" else kind


async def page(request: Request) -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the app's log"}, status_code=500)


class BodyLimit:
    """ASGI middleware: a request body above `limit` bytes is refused (413) from its Content-Length, or stopped
    while it streams in (chunked uploads), before it is parsed."""

    def __init__(self, app: ASGIApp, *, limit: int, shown: int) -> None:
        self.app, self.limit, self.shown = app, limit, shown  # shown: the setting, without the form's own bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            message = f"upload larger than {self.shown} bytes" if declared.isdigit() else "bad Content-Length"
            await JSONResponse({"error": message}, status_code=413 if declared.isdigit() else 400)(
                scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge()
            return message

        await self.app(scope, counted, send)


def make_app(explorer: Explorer) -> Starlette:
    """The ASGI app over `explorer` (see the module docstring for the routes)."""
    routes = [
        Route("/", page),
        Route("/api/info", info),
        Route("/api/search", search_get, methods=["GET"]),
        Route("/api/search", search_post, methods=["POST"]),
        Route("/api/image", image),
        Route("/api/reports/{kind}", report),
        Route("/api/reports/{kind}/classes/{label:path}", report_class),
        Route("/api/duplicates", duplicates),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.explorer = explorer
    app.add_middleware(BodyLimit, limit=explorer.limits.max_upload_bytes + FORM_SLACK,
                       shown=explorer.limits.max_upload_bytes)
    return app
