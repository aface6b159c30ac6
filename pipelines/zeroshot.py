"""`python -m pipelines.zeroshot`: zero-shot classification of stored image embeddings by the model's text tower.

Each class gets one text embedding: every prompt template filled with the class name, embedded, L2-normalised,
averaged over the templates and normalised again (a prompt ensemble). An image's score for a class is SigLIP's own
probability, sigmoid(logit_scale * cos + logit_bias), with the model's logit_scale (exp of the learnt log) and
logit_bias; the prediction is the most probable class. The vision tower never runs: the image side is the embed
job's Parquet. The class embeddings are saved as Parquet beside the report (`class_embeddings.parquet`, with the
model, names and templates in its footer) and reused while those are unchanged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import store
from pipelines.errors import UserError

log = logging.getLogger(__name__)

ZEROSHOT_SUFFIX = "-zeroshot"
CLASS_EMBEDDINGS = "class_embeddings.parquet"
CACHE_KEY = b"pipelines_zeroshot"
# What the class embeddings depend on, of the text encoder's metadata.
TEXT_IDENTITY = ("model", "revision", "embedding_dim", "dtype")


def check_templates(templates: list[str]) -> list[str]:
    """Each template holds one '{}' for the class name (UserError otherwise)."""
    if not templates:
        raise UserError("templates=[]: give at least one prompt template, e.g. templates='[\"a photo of a {}.\"]'")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise UserError(f"template {t!r}: expected exactly one '{{}}' where the class name goes")
    return list(templates)


def ensemble(embed: Callable[[list[str]], np.ndarray], names: list[str], templates: list[str], *,
             batch_size: int) -> np.ndarray:
    """float32 [C, D]: per class, the mean of its L2-normalised prompt embeddings, normalised again.

    `embed`: list of texts -> float32 [n, D]; called in batches of at most `batch_size` prompts.
    """
    total = None
    for template in templates:
        prompts = [template.format(name) for name in names]
        chunks = [np.asarray(embed(prompts[i:i + batch_size]), dtype=np.float32)
                  for i in range(0, len(prompts), batch_size)]
        emb = _unit(np.concatenate(chunks))
        total = emb if total is None else total + emb
    return _unit(total / len(templates))


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0).astype(np.float32)


def logits(images: np.ndarray, classes: np.ndarray, *, logit_scale: float, logit_bias: float) -> np.ndarray:
    """SigLIP's logits float32 [N, C]: logit_scale * cos(image, class) + logit_bias.

    `images` float32 [N, D] raw stored embeddings (normalised here); `classes` float32 [C, D] unit rows.
    Rank classes by these, not by the probabilities: sigmoid saturates to exactly 1.0 in float32 for the
    large logits a trained SigLIP gives, which would make the top classes tie.
    """
    return _unit(images.astype(np.float32)) @ classes.T * np.float32(logit_scale) + np.float32(logit_bias)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """SigLIP's probability of each (image, class) pair, float32, without overflow."""
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def cache_metadata(text_meta: dict[str, Any], labels: list[str], names: list[str],
                   templates: list[str]) -> dict[str, Any]:
    """What the saved class embeddings were made from: the text model's identity, the classes, the templates."""
    return {"model": {k: text_meta.get(k) for k in TEXT_IDENTITY}, "labels": list(labels), "names": list(names),
            "templates": list(templates)}


def save_class_embeddings(path: Path, embeddings: np.ndarray, meta: dict[str, Any]) -> None:
    """label, name, embedding fixed_size_list<float32>[D]; `meta` as JSON under the footer key, atomically."""
    dim = embeddings.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(embeddings).reshape(-1)), dim)
    table = pa.table({"label": pa.array(meta["labels"], pa.string()), "name": pa.array(meta["names"], pa.string()),
                      "embedding": column}).replace_schema_metadata({CACHE_KEY: json.dumps(meta).encode()})
    tmp = path.with_name(f".{path.name}.tmp")
    with store.writing(path.parent, cleanup=tmp, then="then rerun"):
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp)
        tmp.replace(path)


def load_class_embeddings(path: Path, meta: dict[str, Any]) -> np.ndarray | None:
    """The saved float32 [C, D] class embeddings when they were made from exactly `meta`; else None (and why,
    logged). An unreadable file counts as absent: it is recomputed and replaced."""
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        saved = json.loads((table.schema.metadata or {})[CACHE_KEY])
    except (pa.ArrowException, OSError, KeyError, json.JSONDecodeError) as exc:
        log.warning("%s cannot be read (%s): the class embeddings are computed again", path, exc)
        return None
    changed = [key for key in ("model", "labels", "names", "templates") if saved.get(key) != meta[key]]
    if changed:
        log.info("%s was made with other %s: the class embeddings are computed again", path, " and ".join(changed))
        return None
    return store.embedding_matrix(table.column("embedding"), table.schema.field("embedding").type.list_size)


def class_embeddings(path: Path, *, text_meta: dict[str, Any], labels: list[str], names: list[str],
                     templates: list[str], embed: Callable[[list[str]], np.ndarray],
                     batch_size: int) -> tuple[np.ndarray, bool]:
    """The class embeddings float32 [C, D] from `path` when unchanged, else computed and saved there; and
    whether they were reused."""
    meta = cache_metadata(text_meta, labels, names, templates)
    saved = load_class_embeddings(path, meta)
    if saved is not None:
        return saved, True
    start = time.perf_counter()
    computed = ensemble(embed, names, templates, batch_size=batch_size)
    log.info("embedded %d prompts for %d classes in %.1f s", len(names) * len(templates), len(names),
             time.perf_counter() - start)
    save_class_embeddings(path, computed, meta)
    return computed, False


def output_location(embeddings_dir: Path, output_dir: str | Path | None) -> Path:
    """`output_dir`, or the sibling `<embeddings_dir>-zeroshot`; a folder inside `embeddings_dir` is refused
    (its Parquet readers would take the class embeddings for images)."""
    if output_dir in (None, ""):
        base = Path(embeddings_dir)
        if base.name in ("", ".", ".."):
            base = base.resolve()
        out = base.with_name(base.name + ZEROSHOT_SUFFIX)
    else:
        out = Path(output_dir)
    if store.is_inside(out.resolve(), Path(embeddings_dir).resolve()):
        raise UserError(f"output_dir={output_dir}: lies inside embeddings_dir={embeddings_dir}, whose Parquet "
                        "readers would take class_embeddings.parquet for image embeddings; choose a folder outside it")
    return out
