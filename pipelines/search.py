"""`python -m pipelines.search`: the stored images nearest to a text (`query=...`) or an image (`image=FILE`).

The query is embedded with the model the embeddings were made with (the text tower for a text, the vision tower
with the embed job's own decode + preprocessing for an image), L2-normalised, and searched by inner product
(cosine) in a FAISS index over the stored embeddings (`pipelines.index`: exact by default, or an approximate
index saved beside the embeddings). Prints a table (or JSON with `format=json`); `output=FILE` saves the JSON.
torch and the model are imported only once the settings, the query file and the embeddings have been checked.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipelines import index as ann
from pipelines import store
from pipelines.config import CONF_DIR, UserError, clean_errors
from pipelines.index import ModelMismatchError, check_same_model  # noqa: F401 - the error of a query

log = logging.getLogger(__name__)

FORMATS = ("table", "json")


def check_query(*, query: str | None, image: str | Path | None) -> str:
    """'text' or 'image': exactly one of `query` and `image` must be given (UserError otherwise)."""
    has_text, has_image = query not in (None, ""), image not in (None, "")
    if has_text == has_image:
        what = "both" if has_text else "neither"
        raise UserError(f"give exactly one of query=TEXT and image=FILE ({what} given), e.g. "
                        "query='a dog on a sofa' or image=photo.jpg")
    return "text" if has_text else "image"


def read_image(path: str | Path, *, max_pixels: int | None) -> Any:
    """An image file -> uint8 [3, H, W] RGB, decoded as the embed job does; UserError naming the file."""
    from pipelines.data import DecodeError, decode

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image={path}: no such file")
    try:
        return decode(path.read_bytes(), max_pixels=max_pixels)
    except DecodeError as exc:
        raise UserError(f"image={path}: {exc}") from exc
    except OSError as exc:
        raise UserError(f"image={path}: cannot read it ({exc.strerror or type(exc).__name__})") from exc


# The identity checked before the weights load (names only), and after (what the loaded encoder reports).
NAME_KEYS = ("model", "revision")
IMAGE_KEYS = ("model", "revision", "embedding_dim", "preprocess")
TEXT_KEYS = ("model", "revision", "embedding_dim")


def embed_query(*, kind: str, query: str | None, pixels: Any, name_or_path: str, revision: str | None,
                device: str, dtype: str, stored: dict[str, Any]) -> np.ndarray:
    """The query's embedding float32 [1, D] from the checked model; its metadata must match `stored`."""
    if kind == "image":
        from pipelines.siglip import load_encoder

        encoder = load_encoder(name_or_path, revision=revision, device=device, dtype=dtype)
        check_same_model(stored, encoder.metadata(), keys=IMAGE_KEYS)
        vector = encoder.embed_uint8(encoder.preprocess.resize(pixels.unsqueeze(0)))  # a batch of one, either kind
        meta = encoder.metadata()
    else:
        from pipelines.text import load_text_encoder

        text = load_text_encoder(name_or_path, revision=revision, device=device, dtype=dtype)
        meta = text.metadata()
        check_same_model(stored, meta, keys=TEXT_KEYS)
        vector = text.embed([query])
    if meta.get("dtype") != stored.get("dtype"):
        log.warning("the query is embedded in %s, the stored embeddings in %s: scores may differ in the last digits",
                    meta.get("dtype"), stored.get("dtype"))
    return vector.detach().float().cpu().numpy()


def faiss_device(device: str) -> str:
    """The FAISS device for the job's `device` setting: cpu stays cpu, cuda[:N] is cuda, auto is auto."""
    return "cpu" if device == "cpu" else "cuda" if device.startswith("cuda") else "auto"


def run_search(*, embeddings_dir: str | Path, splits: list[str] | None, query: str | None,
               image: str | Path | None, k: int, index: str, rebuild: bool, index_dir: str | Path | None,
               name_or_path: str, revision: str | None, device: str, dtype: str, max_image_pixels: int | None,
               ann_options: dict[str, Any], dataset_root: str | Path | None) -> dict[str, Any]:
    """The `k` stored rows nearest to the query, best first, as a JSON-ready dict (query, index, results)."""
    start = time.perf_counter()
    kind = check_query(query=query, image=image)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise UserError(f"k={k!r}: expected a whole number of at least 1")
    ann.check_kind(index)
    pixels = read_image(image, max_pixels=max_image_pixels) if kind == "image" else None
    source = ann.open_source(embeddings_dir, splits)
    check_same_model(source.metadata, {"model": name_or_path, "revision": revision}, keys=NAME_KEYS)
    from pipelines.hub import check_model

    check_model(name_or_path, revision)  # a model not to be had: one line, before torch loads
    vector = embed_query(kind=kind, query=query, pixels=pixels, name_or_path=name_or_path, revision=revision,
                         device=device, dtype=dtype, stored=source.metadata)
    embedded_s = time.perf_counter() - start
    searcher = ann.open_index(source, kind=index, rebuild=rebuild, folder=index_dir, device=faiss_device(device),
                              options=ann_options)
    rows = ann.read_rows(source)
    t0 = time.perf_counter()
    scores, ids = searcher.search(vector, k=k)
    search_s = time.perf_counter() - t0
    found = ids[0] >= 0
    hits = rows.take(ids[0][found])
    results = [{"rank": i + 1, "score": round(float(s), 6), **hit}
               for i, (s, hit) in enumerate(zip(scores[0][found], hits, strict=True))]
    return {
        "query": {"text": query} if kind == "text" else {"image": str(image)},
        "embeddings_dir": str(embeddings_dir),
        "dataset_root": str(dataset_root) if dataset_root is not None else None,
        "splits": source.splits,
        "rows": source.rows,
        "model": source.metadata.get("model"),
        "index": {"kind": searcher.kind, "loaded": searcher.loaded, "settings": searcher.info["settings"],
                  "file": str(searcher.path) if searcher.path else None},
        "k": k,
        "results": results,
        "seconds": {"query": round(embedded_s, 3), "search": round(search_s, 4),
                    "total": round(time.perf_counter() - start, 3)},
    }


def format_table(result: dict[str, Any]) -> str:
    """The results as a few terminal lines: the query, the index, then rank, score, split, label, path."""
    q = result["query"]
    what = f"text {q['text']!r}" if "text" in q else f"image {q['image']}"
    idx = result["index"]
    settings = ", ".join(f"{k} {v}" for k, v in idx["settings"].items())
    lines = [(f"{what} in {result['embeddings_dir']} ({'+'.join(result['splits'])}, {result['rows']} rows, "
             f"{result['model']})"),
             (f"index {idx['kind']}{f' ({settings})' if settings else ''}"
             f"{', loaded from ' + idx['file'] if idx['loaded'] else ''}; "
             f"search {1000 * result['seconds']['search']:.1f} ms, {result['seconds']['total']:.1f} s in all"),
             f"{'rank':>4}  {'score':>8}  {'split':<8}{'label':<16}path"]
    for r in result["results"]:
        lines.append(f"{r['rank']:>4}  {r['score']:>8.4f}  {r['split']:<8}{r['label'][:15]:<16}{r['path']}")
    return "\n".join(lines)


def _splits(value: Any) -> list[str] | None:
    """`splits=valid`, `splits=[train,valid]` or null (every split) -> a list of names or None."""
    if value in (None, "", []):
        return None
    return [str(value)] if isinstance(value, str) else [str(v) for v in OmegaConf.to_container(value)]


@hydra.main(config_path=CONF_DIR, config_name="search", version_base="1.3")
@clean_errors(FileNotFoundError, PermissionError)
def main(cfg: DictConfig) -> None:
    if cfg.format not in FORMATS:
        raise UserError(f"format={cfg.format!r}: expected one of {', '.join(FORMATS)}")
    root = None if OmegaConf.is_missing(cfg.dataset, "root") else cfg.dataset.root
    result = run_search(
        embeddings_dir=cfg.embeddings_dir, splits=_splits(cfg.splits),
        query=cfg.query, image=cfg.image, k=cfg.k, index=cfg.index, rebuild=cfg.rebuild, index_dir=cfg.index_dir,
        name_or_path=cfg.model.name_or_path, revision=cfg.model.revision, device=cfg.device, dtype=cfg.dtype,
        max_image_pixels=cfg.max_image_pixels, ann_options=OmegaConf.to_container(cfg.ann, resolve=True),
        dataset_root=root,
    )
    if cfg.output:
        out = Path(cfg.output)
        with store.writing(out.parent, then="then rerun"):
            out.parent.mkdir(parents=True, exist_ok=True)
        store.write_json(out, result)
    print(json.dumps(result, indent=2) if cfg.format == "json" else format_table(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
