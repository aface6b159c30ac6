"""`python -m pipelines.zeroshot`: zero-shot classification of stored image embeddings by the model's text tower.

Each class gets one text embedding: every prompt template filled with the class name, embedded, L2-normalised,
averaged over the templates and normalised again (a prompt ensemble). An image's score for a class is SigLIP's own
probability, sigmoid(logit_scale * cos + logit_bias), with the model's logit_scale (exp of the learnt log) and
logit_bias; the prediction is the most probable class. The vision tower never runs: the image side is the embed
job's Parquet. The class embeddings are saved as Parquet beside the report (`class_embeddings.parquet`, with the
model, names and templates in its footer) and reused while those are unchanged.

Which names and templates: a protocol. `clip` is the one behind the published ImageNet figures (the CLIP paper's
curated ImageNet class names and its 80 prompt templates, shipped in data/zeroshot/); `simple` is the class-name
file's first lemma (or the folder names) with one template; `auto` is `clip` for dataset=imagenet, else `simple`.
`class_names=` and `templates=` replace the protocol's names or templates; the table's header says what was used.
"""

from __future__ import annotations

import json
import logging
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from pipelines import store
from pipelines.config import CONF_DIR, REPO_ROOT, clean_errors
from pipelines.errors import UserError

log = logging.getLogger(__name__)

ZEROSHOT_SUFFIX = "-zeroshot"
CLASS_EMBEDDINGS = "class_embeddings.parquet"
CACHE_KEY = b"pipelines_zeroshot"
# What the class embeddings depend on, of the text encoder's metadata.
TEXT_IDENTITY = ("model", "revision", "embedding_dim", "dtype")


# The CLIP paper's ImageNet class names (`<synset>\t<name>`, ImageNet's 1,000 synsets in order) and its 80 templates.
ZEROSHOT_DATA = REPO_ROOT / "data" / "zeroshot"
CLIP_CLASS_NAMES = ZEROSHOT_DATA / "imagenet_classnames.tsv"
CLIP_TEMPLATES = ZEROSHOT_DATA / "imagenet_templates.txt"
SIMPLE_TEMPLATES = ("a photo of a {}.",)
PROTOCOLS = ("auto", "clip", "simple")


@dataclass(frozen=True)
class Protocol:
    """The names and templates of a zero-shot run: `name` 'clip' or 'simple', the class-name file it takes (None:
    the usual search), its templates, and which of the two the user replaced."""

    name: str
    class_names: Path | None
    templates: list[str]
    custom: tuple[str, ...]

    def describe(self, names_file: str | None) -> str:
        """One line saying what was used, e.g. "protocol: clip (the CLIP paper's ImageNet class names and its 80
        prompt templates, averaged: the protocol of the published figures)"."""
        t = self.templates
        if self.name == "clip" and not self.custom:
            return (f"protocol: clip (the CLIP paper's ImageNet class names and its {len(t)} prompt templates, "
                    "averaged: the protocol of the published figures)")
        if names_file is None:
            names = "the folder names"
        elif Path(names_file).name == "LOC_synset_mapping.txt":
            names = f"the first lemma of {names_file}"
        else:
            names = "the CLIP paper's ImageNet class names" if Path(names_file) == CLIP_CLASS_NAMES else names_file
        templates = f"{len(t)} template{'s' if len(t) > 1 else ''} ({t[0]!r}{', ...' if len(t) > 1 else ''})"
        custom = f"; given: {' and '.join(self.custom)}" if self.custom else ""
        return f"protocol: {self.name} (class names: {names}; {templates}{custom})"


def resolve_protocol(protocol: str, *, dataset: str | None, class_names: str | Path | None,
                     templates: list[str] | str | None) -> Protocol:
    """The protocol's names file and templates, `class_names` / `templates` taking their place when given
    (UserError for an unknown protocol or a bad template)."""
    if protocol not in PROTOCOLS:
        raise UserError(f"protocol={protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    name = ("clip" if dataset == "imagenet" else "simple") if protocol == "auto" else protocol
    custom = tuple(key for key, value in (("class_names", class_names), ("templates", templates)) if value is not None)
    if templates is None:
        templates = read_templates(CLIP_TEMPLATES) if name == "clip" else list(SIMPLE_TEMPLATES)
    names = Path(class_names) if class_names is not None else (CLIP_CLASS_NAMES if name == "clip" else None)
    return Protocol(name, names, check_templates(templates), custom)


def read_templates(path: Path) -> list[str]:
    """A templates file: one template per line."""
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def check_templates(templates: list[str] | str) -> list[str]:
    """Each template holds exactly one plain '{}' where the class name goes (UserError naming it otherwise); one
    string is a list of one."""
    if isinstance(templates, str):
        templates = [templates]
    if not isinstance(templates, (list, tuple)) or not templates:
        raise UserError(f"templates={templates!r}: give a list of prompt templates, e.g. "
                        "templates='[\"a photo of a {}.\"]'")
    for t in templates:
        if not isinstance(t, str):
            raise UserError(f"template {t!r}: expected a string with one '{{}}' where the class name goes")
        try:  # str.format's own reading: '{{' is a literal brace, '{x}' a named field, '{:>5}' a format spec
            fields = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(t)
                      if field is not None]
        except ValueError as exc:
            raise UserError(f"template {t!r}: {exc}; write a literal brace as '{{{{' or '}}}}'") from None
        if fields != [("", "", None)]:
            found = ", ".join("{" + field + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
                              for field, spec, conv in fields) or "none"
            raise UserError(f"template {t!r}: expected exactly one '{{}}' where the class name goes, found "
                            f"{found} (a literal brace is '{{{{' or '}}}}')")
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
    """float [n, D] -> a float32 copy with unit rows (all-zero rows stay zero): `index.normalize` on a copy."""
    from pipelines.index import normalize

    return normalize(np.array(x, dtype=np.float32))


def logits(images: np.ndarray, classes: np.ndarray, *, logit_scale: float, logit_bias: float) -> np.ndarray:
    """SigLIP's logits float32 [N, C]: logit_scale * cos(image, class) + logit_bias.

    `images` float32 [N, D] raw stored embeddings (normalised here); `classes` float32 [C, D] unit rows.
    Rank classes by these, not by the probabilities: sigmoid saturates to exactly 1.0 in float32 for the
    large logits a trained SigLIP gives, which would make the top classes tie.
    """
    return _unit(images.astype(np.float32)) @ classes.T * np.float32(logit_scale) + np.float32(logit_bias)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """SigLIP's probability of each (image, class) pair, float32: 1 / (1 + exp(-x)), computed from exp(-|x|) so
    that it neither overflows nor loses the small probabilities of negative logits."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


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
        out = store.sibling_dir(embeddings_dir, ZEROSHOT_SUFFIX)
    else:
        out = Path(output_dir)
    if store.is_inside(out.resolve(), Path(embeddings_dir).resolve()):
        raise UserError(f"output_dir={output_dir}: lies inside embeddings_dir={embeddings_dir}, whose Parquet "
                        "readers would take class_embeddings.parquet for image embeddings; choose a folder outside it")
    return out


def classify(images: np.ndarray, classes: np.ndarray, *, logit_scale: float, logit_bias: float,
             chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """The 5 (or C) most probable classes of each image, int64 [N, 5] best first, and their probabilities
    float32 [N, 5]; computed `chunk` images at a time (an [N, C] matrix is never held for large N)."""
    top = min(5, len(classes))
    ids, probs = [], []
    for i in range(0, len(images), chunk):
        z = logits(images[i:i + chunk], classes, logit_scale=logit_scale, logit_bias=logit_bias)
        part = np.argpartition(-z, top - 1, axis=1)[:, :top] if top < z.shape[1] else np.tile(
            np.arange(z.shape[1]), (len(z), 1))
        order = np.argsort(-np.take_along_axis(z, part, axis=1), axis=1, kind="stable")
        best = np.take_along_axis(part, order, axis=1)
        ids.append(best.astype(np.int64))
        probs.append(sigmoid(np.take_along_axis(z, best, axis=1)))
    if not ids:
        return np.zeros((0, top), np.int64), np.zeros((0, top), np.float32)
    return np.concatenate(ids), np.concatenate(probs)


def run_zeroshot(**settings: Any) -> dict[str, Any]:
    """Classify `query_split`'s stored embeddings among its classes (`evaluate`); write the report family; return
    the report."""
    return evaluate(**settings)[0]


def evaluate(*, embeddings_dir: str | Path, query_split: str, protocol: str, dataset: str | None,
             class_names: str | Path | None, templates: list[str] | str | None, name_or_path: str,
             revision: str | None, device: str, dtype: str, batch_size: int, output_dir: str | Path | None,
             dataset_root: str | Path | None, worst: int) -> tuple[dict[str, Any], str]:
    """`run_zeroshot`, returning the report and the printed table. `protocol` (auto, clip, simple; `dataset`, the
    dataset's name, decides auto) gives the names and templates that `class_names` / `templates` do not."""
    from pipelines import classnames
    from pipelines import report as family
    from pipelines.hub import check_model
    from pipelines.index import check_same_model

    start = time.perf_counter()
    plan = resolve_protocol(protocol, dataset=dataset, class_names=class_names, templates=templates)
    templates = plan.templates
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise UserError(f"batch_size={batch_size!r}: expected a whole number of at least 1")
    embeddings_dir = Path(embeddings_dir)
    out = output_location(embeddings_dir, output_dir)
    query = store.read_split(embeddings_dir, query_split)
    labels = sorted(set(query.labels))
    names_file = family.find_class_names(
        plan.class_names, [embeddings_dir, *([Path(dataset_root)] if dataset_root is not None else [])])
    if names_file == CLIP_CLASS_NAMES and not set(labels) & set(classnames.read_names(names_file)):
        raise UserError(f"protocol={plan.name}: the classes of {query_split} are not ImageNet synsets (e.g. "
                        f"{labels[0]!r}), which the CLIP paper's class names are for; use protocol=simple or "
                        "class_names=FILE")
    names = classnames.names_for(labels, names_file)
    line = plan.describe(str(names_file) if names_file else None)
    log.info("%s", line)
    check_same_model(query.metadata, {"model": name_or_path, "revision": revision}, keys=("model", "revision"))
    check_model(name_or_path, revision)  # a model not to be had: one line, before torch loads
    read_s = time.perf_counter() - start
    from pipelines.text import load_text_encoder

    text = load_text_encoder(name_or_path, revision=revision, device=device, dtype=dtype)
    check_same_model(query.metadata, text.metadata(), keys=("model", "revision", "embedding_dim"))
    t0 = time.perf_counter()
    classes, reused = class_embeddings(out / CLASS_EMBEDDINGS, text_meta=text.metadata(), labels=labels,
                                       names=names, templates=templates,
                                       embed=lambda texts: text.embed(texts).cpu().numpy(), batch_size=batch_size)
    text_s = time.perf_counter() - t0
    scale = float(np.exp(text.logit_scale))
    t0 = time.perf_counter()
    top, probs = classify(query.embeddings, classes, logit_scale=scale, logit_bias=text.logit_bias)
    classify_s = time.perf_counter() - t0
    truth = np.searchsorted(np.asarray(labels), np.asarray(query.labels))
    return _report(out, query=query, labels=labels, names=names, truth=truth, top=top, probs=probs, worst=worst,
                   info={"embeddings_dir": str(embeddings_dir), "query_split": query_split,
                         "protocol": plan.name, "protocol_line": line, "templates": templates, "class_names": str(names_file) if names_file else None,
                         "model": query.metadata, "text_model": text.metadata(), "logit_scale": scale,
                         "logit_bias": text.logit_bias,
                         "class_embeddings": {"file": str(out / CLASS_EMBEDDINGS), "reused": reused}},
                   seconds={"read": read_s, "text": text_s, "classify": classify_s}, start=start)


def _report(out: Path, *, query: store.Split, labels: list[str], names: list[str], truth: np.ndarray,
            top: np.ndarray, probs: np.ndarray, worst: int, info: dict[str, Any], seconds: dict[str, float],
            start: float) -> tuple[dict[str, Any], str]:
    """report.json, per_class.csv, predictions.parquet (with each top-5 class's probability) and per_class.png
    under `out`, through `pipelines.report`; the report as written and the printed table."""
    from pipelines import report as family

    run = family.count(truth, top, n_classes=len(labels))
    model = Path(str(info["model"]["model"])).name
    source = {"embeddings_dir": info["embeddings_dir"], "query_split": info["query_split"]}
    metadata = {**{k: v for k, v in info.items() if k not in source}, "num_classes": len(labels),
                "num_query": len(truth)}
    return family.publish(
        out, runs=[run], classes=labels, names=dict(zip(labels, names, strict=True)), paths=query.paths,
        source=source, metadata=metadata, title=f"{model} zero-shot: {len(labels)} classes",
        header=_header({**source, **metadata}), note=NOTE, worst=worst,
        columns={"probability": probs[:, 0], "top5_probabilities": list(probs)},
        seconds={k: round(v, 3) for k, v in seconds.items()}, start=start)


NOTE = "({seconds[total]:.1f} s in all)"  # the top-1 line's end, from the report


def _header(report: dict[str, Any]) -> list[str]:
    """The table's first lines: what was classified, with which model, names and templates."""
    t = report["templates"]
    reused = "reused" if report["class_embeddings"]["reused"] else "computed"
    return [(f"{report['embeddings_dir']}: {report['model']['model']} ({report['model']['embedding_dim']}-d), "
             f"zero-shot over {report['num_classes']} classes, {report['query_split']} {report['num_query']}"),
            (f"{len(t)} prompt template(s) ({t[0]!r}{', ...' if len(t) > 1 else ''}); class names from "
             f"{report['class_names'] or 'the folder names'}; class embeddings {reused} "
             f"({report['class_embeddings']['file']})"),
            *([report["protocol_line"]] if "protocol_line" in report else [])]


def format_report(report: dict[str, Any], table: Any) -> str:
    """A saved run's table for the terminal (report.json and per_class.csv read back): as `main` prints it."""
    from pipelines import report as family

    return family.format_table(report, table, header=_header(report), note=NOTE)


@hydra.main(config_path=CONF_DIR, config_name="zeroshot", version_base="1.3")
@clean_errors(FileNotFoundError, PermissionError)
def main(cfg: DictConfig) -> None:
    root = None if OmegaConf.is_missing(cfg.dataset, "root") else cfg.dataset.root
    # templates='a photo of a {}.' (one string, not a list) is a list of one.
    templates = OmegaConf.to_container(cfg.templates) if OmegaConf.is_config(cfg.templates) else cfg.templates
    _, table = evaluate(
        embeddings_dir=cfg.embeddings_dir, query_split=cfg.query_split, protocol=cfg.protocol,
        dataset=cfg.dataset.name, class_names=cfg.class_names, templates=templates,
        name_or_path=cfg.model.name_or_path,
        revision=cfg.model.revision, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size,
        output_dir=cfg.output_dir, dataset_root=root, worst=cfg.worst,
    )
    print(table)


if __name__ == "__main__":
    main()
