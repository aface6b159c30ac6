"""Building the explore app from plain settings, and running it with uvicorn."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

from pipelines import store
from pipelines.errors import UserError
from pipelines.explore.app import Explorer, Limits, make_app
from pipelines.explore.catalog import Catalog
from pipelines.explore.images import ImageStore, ShardImageStore, ThumbnailCache, subset_source
from pipelines.explore.queries import ImageQueries, LocalText, TritonText, parse_server
from pipelines.explore.reports import Reports
from pipelines.index import check_same_model

log = logging.getLogger(__name__)


def dataset_root(embeddings_dir: Path, given: str | Path | None) -> Path:
    """The folder the rows' paths are relative to: `given`, else the one `_embeddings.json` records."""
    if given not in (None, ""):
        root = Path(given)
    else:
        manifest = Path(embeddings_dir) / store.MANIFEST
        import json

        try:
            recorded = json.loads(manifest.read_text()).get("dataset_root")
        except (OSError, ValueError) as exc:
            raise UserError(f"{manifest}: cannot read the dataset's root ({exc}); give dataset_root=DIR") from exc
        if not recorded:
            raise UserError(f"{manifest} records no dataset_root; give dataset_root=DIR")
        root = Path(recorded)
    if not root.is_dir():
        raise UserError(f"dataset_root={root}: no such folder (the images are read from it); give dataset_root=DIR")
    return root


def recorded_source(embeddings_dir: Path) -> dict[str, Any] | None:
    """The shard source an embed output's manifest records (`dataset=files`), else None (a folder dataset)."""
    import json

    try:
        return json.loads((Path(embeddings_dir) / store.MANIFEST).read_text()).get("source")
    except (OSError, ValueError):
        return None


def check_host(host: str) -> str:
    """A host to bind; a non-loopback one is warned about (it exposes the dataset's images to that network)."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("host=%s: the app, the dataset's images and the text/image search are open to every machine "
                    "that reaches this address; there is no authentication", host)
    return host


def text_queries(*, text_server: str | None, stored: dict[str, Any], **model: Any) -> Any:
    """The text side: a Triton `embed_text` at `text_server`, else the text tower in this process; None (text
    search off, said) for a vision-only checkpoint."""
    if text_server not in (None, ""):
        return TritonText(parse_server(str(text_server)), stored=stored)
    from pipelines.text import TextTowerMissingError

    try:
        return LocalText(stored=stored, **model)
    except TextTowerMissingError as exc:
        log.warning("text search is off: %s", exc)
        return None


def build_explorer(*, embeddings_dir: str | Path, splits: list[str] | None, dataset_root_dir: str | Path | None,
                   allowed_roots: list[str], name_or_path: str, revision: str | None, device: str, dtype: str,
                   text_server: str | None, index: str, index_dir: str | Path | None, ann_options: dict[str, Any],
                   limits: Limits, storage_options: dict[str, Any] | None = None) -> Explorer:
    """Check the settings, load the rows and index, then the text tower: everything the app serves."""
    embeddings_dir = Path(embeddings_dir)
    described = recorded_source(embeddings_dir)
    if described is not None and dataset_root_dir in (None, ""):  # dataset=files: rows live in shards
        from pipelines.sources.files import FileSource

        root = None
        image_store: Any = ShardImageStore(FileSource.recorded(described, storage_options=storage_options))
    else:
        root = dataset_root(embeddings_dir, dataset_root_dir)
        extra = [Path(p) for p in allowed_roots]
        linked = subset_source(root)
        if linked is not None:
            log.info("%s is a subset linking into %s: images there are served too", root, linked)
            extra.append(linked)
        image_store = ImageStore(root, extra)
    from pipelines import index as ann

    ann.check_kind(index)
    stored = ann.open_source(embeddings_dir, splits).metadata  # the footers only: a moment
    check_same_model(stored, {"model": name_or_path, "revision": revision}, keys=("model", "revision"))
    catalog = Catalog(embeddings_dir, splits=splits, index=index, index_dir=index_dir, options=ann_options)
    model = {"name_or_path": name_or_path, "revision": revision, "device": device, "dtype": dtype}
    text = text_queries(text_server=text_server, stored=stored, **model)
    images = ImageQueries(**model, stored=stored, max_pixels=limits.max_upload_pixels)
    info = {"embeddings_dir": str(embeddings_dir), "dataset_root": str(root) if root else None,
            "source": described, "rows": catalog.rows,
            "model": stored.get("model"), "embedding_dim": stored.get("embedding_dim"),
            "index": {"kind": catalog.searcher.kind, **catalog.searcher.settings()},
            "text_search": None if text is None else ("triton " + str(text_server) if text_server else "local")}
    return Explorer(catalog, image_store, Reports(embeddings_dir), text, images, limits, info,
                    ThumbnailCache())


def serve(explorer: Explorer, *, host: str, port: int) -> None:
    """Run the app with uvicorn until Ctrl-C / SIGTERM."""
    import uvicorn

    log.info("explore: http://%s:%d/ (%d rows)", host if ":" not in host else f"[{host}]", port,
             explorer.catalog.rows)
    uvicorn.run(make_app(explorer), host=host, port=port, log_level="warning", access_log=False)
