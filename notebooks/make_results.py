"""Writes notebooks/results.ipynb (run `python notebooks/make_results.py` after editing the cells below).

The notebook only calls into `pipelines`; tests/test_notebook.py checks that the file matches this script and
executes it on the sample data.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "results.ipynb"

INTRO = """\
# k-NN validation results

What a `python -m pipelines.validate` run found: per-class accuracy, a few queries with their nearest training
images, and a 2-D projection (PCA) of the embeddings coloured by class.

Set `EMBEDDINGS_DIR` to an embed job's `output_dir` (and `DATA_ROOT` to the dataset root it read, to see the
images). The validation run is read from `<EMBEDDINGS_DIR>-validation/` (validate's default output) and made there
when missing. Left at `None`, the notebook embeds `data/sample` with the tiny random model into a temporary folder
(deleted when the kernel stops) and validates it: a demonstration of the plumbing, not of SigLIP's accuracy."""

PARAMETERS = """\
EMBEDDINGS_DIR = None  # a pipelines.embed output_dir; None: embed data/sample with model=tiny into a temp folder
DATA_ROOT = None       # the dataset root (images); None: the one the validation report recorded
QUERIES = 4            # queries shown with their nearest training images (half right, half wrong when possible)
PCA_CLASSES = 10       # classes in the projection: the ones with the lowest top-1"""

SETUP = """\
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Image, display
from PIL import Image as PILImage
from sklearn.decomposition import PCA

from pipelines.config import REPO_ROOT
from pipelines.store import read_split, validation_dir
from pipelines.report import FIGURE, PER_CLASS, PREDICTIONS, REPORT
from pipelines.fewshot import format_report
from pipelines.validate import run_validate

if EMBEDDINGS_DIR is None:
    from pipelines.embed import run_embed

    # Removed when this kernel stops (TemporaryDirectory's finalizer), however far the notebook got.
    demo_dir = tempfile.TemporaryDirectory(prefix="siglip-notebook-")
    EMBEDDINGS_DIR = Path(demo_dir.name) / "sample-tiny"
    DATA_ROOT = REPO_ROOT / "data" / "sample"
    run_embed(root=DATA_ROOT, splits=["train", "valid"], output_dir=EMBEDDINGS_DIR, model="tiny", device="cpu",
              num_workers=0, progress=False)
EMBEDDINGS_DIR = Path(EMBEDDINGS_DIR)
print(f"embeddings: {EMBEDDINGS_DIR}")
validation = validation_dir(EMBEDDINGS_DIR)  # validate's default output, beside the embeddings
if not (validation / REPORT).exists():
    run_validate(embeddings_dir=EMBEDDINGS_DIR, dataset_root=DATA_ROOT)
report = json.loads((validation / REPORT).read_text())
per_class = pd.read_csv(validation / PER_CLASS, keep_default_na=False)
predictions = pd.read_parquet(validation / PREDICTIONS)
DATA_ROOT = Path(DATA_ROOT or report["dataset_root"] or ".")
print(format_report(report, per_class))"""

PER_CLASS_MD = """\
## Per-class accuracy
The distribution of per-class top-1 and the worst classes (the figure `validate` saved), then the table."""

PER_CLASS = """\
display(Image(filename=validation / FIGURE))
per_class.sort_values(["top1", "label"]).head(15)"""

NEIGHBOURS_MD = """\
## Queries and their nearest training images
Each row: a query (its class, and the prediction) followed by its nearest training images with their class and
distance. Wrong predictions show where the embedding confuses classes."""

NEIGHBOURS = """\
def show(path, ax, title, colour="black"):
    file = DATA_ROOT / path
    if file.exists():
        ax.imshow(PILImage.open(file).convert("RGB"))
    else:
        ax.text(0.5, 0.5, "image not found\\n(set DATA_ROOT)", ha="center", va="center", fontsize=7)
    ax.set_title(title, fontsize=7, color=colour)
    ax.axis("off")


rng = np.random.default_rng(0)
right = predictions.index[predictions["prediction"] == predictions["label"]].to_numpy()
wrong = predictions.index[predictions["prediction"] != predictions["label"]].to_numpy()
n_wrong = min(len(wrong), QUERIES // 2)
n_right = min(len(right), QUERIES - n_wrong)
shown = np.concatenate([rng.choice(right, n_right, replace=False), rng.choice(wrong, n_wrong, replace=False)])
columns = 1 + min(5, len(predictions["neighbours"].iloc[0]))
fig, axes = plt.subplots(len(shown), columns, figsize=(1.6 * columns, 1.9 * len(shown)), squeeze=False)
for ax_row, i in zip(axes, shown):
    q = predictions.loc[i]
    ok = q["prediction"] == q["label"]
    show(q["path"], ax_row[0], f"query: {q['label']}\\n-> {q['prediction']}", "green" if ok else "red")
    for ax, path, label, dist in zip(ax_row[1:], q["neighbours"], q["neighbour_labels"], q["distances"]):
        show(path, ax, f"{label}\\nd={dist:.3g}")
fig.tight_layout()
plt.show()"""

PCA_MD = """\
## 2-D projection (PCA)
Train (circles) and query (dots) embeddings of the classes with the lowest top-1, projected on their first two
principal components after scaling to unit length (as the cosine metric sees them)."""

PCA_CELL = """\
classes = per_class.sort_values(["top1", "label"])["label"].head(PCA_CLASSES).tolist()
train = read_split(EMBEDDINGS_DIR, report["settings"]["train_split"])
query = read_split(EMBEDDINGS_DIR, report["settings"]["query_split"])


def rows_of(split):
    keep = np.isin(split.labels, classes)
    x = split.embeddings[keep]
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.asarray(split.labels)[keep]


(x_train, y_train), (x_query, y_query) = rows_of(train), rows_of(query)
pca = PCA(n_components=2, random_state=0).fit(np.vstack([x_train, x_query]))
p_train, p_query = pca.transform(x_train), pca.transform(x_query)
fig, ax = plt.subplots(figsize=(8, 6))
colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
for c, label in enumerate(classes):
    colour = colours(c % colours.N)
    ax.scatter(*p_query[y_query == label].T, s=10, color=colour, alpha=0.6, label=label)
    ax.scatter(*p_train[y_train == label].T, s=40, facecolors="none", edgecolors=[colour])
ax.set(xlabel=f"PC 1 ({100 * pca.explained_variance_ratio_[0]:.0f}% of variance)",
       ylabel=f"PC 2 ({100 * pca.explained_variance_ratio_[1]:.0f}%)", title=f"{len(classes)} classes")
ax.legend(fontsize=7, markerscale=2, loc="best")
plt.show()"""


ZEROSHOT_MD = """\
## Zero-shot classification
The same query images classified by the text tower alone (`pipelines.zeroshot`, with `conf/zeroshot.yaml`'s prompt
templates): SigLIP's sigmoid probability of each class name's prompts, no training image used. The class
embeddings are saved beside the report and reused. With the tiny random model this is near chance."""

ZEROSHOT_CELL = """\
from omegaconf import OmegaConf

from pipelines.config import CONF_DIR
from pipelines.zeroshot import format_report as format_zeroshot
from pipelines.zeroshot import run_zeroshot

zs_conf = OmegaConf.load(Path(CONF_DIR) / "zeroshot.yaml")
zeroshot = run_zeroshot(
    embeddings_dir=EMBEDDINGS_DIR, query_split=report["settings"]["query_split"], protocol=zs_conf.protocol,
    dataset=None, class_names=report["class_names"], templates=OmegaConf.to_container(zs_conf)["templates"],
    name_or_path=report["model"]["model"], revision=report["model"]["revision"],
    device=zs_conf.device, dtype=zs_conf.dtype, batch_size=zs_conf.batch_size, output_dir=None,
    dataset_root=DATA_ROOT, worst=zs_conf.worst)
print(format_zeroshot(zeroshot, pd.read_csv(zeroshot["files"]["per_class"], keep_default_na=False)))
pd.read_parquet(zeroshot["files"]["predictions"]).head(QUERIES)"""

SEARCH_MD = """\
## Search by text and by image
`pipelines.search`: the stored images nearest to a text (the text tower) and to an image file (embedded as the embed
job does: it finds itself first, with score 1), by cosine similarity in an exact FAISS index."""

SEARCH_CELL = """\
from pipelines.search import run_search

search_conf = OmegaConf.load(Path(CONF_DIR) / "search.yaml")
first = predictions["path"].iloc[0]
for query in ({"query": f"a photo of a {per_class['name'].iloc[0]}"}, {"image": DATA_ROOT / first}):
    if "image" in query and not query["image"].exists():
        continue
    found = run_search(
        embeddings_dir=EMBEDDINGS_DIR, splits=None, query=query.get("query"), image=query.get("image"),
        k=search_conf.k, index=search_conf.index, rebuild=False, index_dir=None, name_or_path=report["model"]["model"],
        revision=report["model"]["revision"], device=search_conf.device, dtype=search_conf.dtype,
        max_image_pixels=search_conf.max_image_pixels, ann_options=OmegaConf.to_container(search_conf.ann),
        dataset_root=DATA_ROOT)
    print(query)
    display(pd.DataFrame(found["results"]).head(5))"""


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs."""
    nb = new_notebook(cells=[
        new_markdown_cell(INTRO),
        new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}),
        new_code_cell(SETUP),
        new_markdown_cell(PER_CLASS_MD),
        new_code_cell(PER_CLASS),
        new_markdown_cell(NEIGHBOURS_MD),
        new_code_cell(NEIGHBOURS),
        new_markdown_cell(PCA_MD),
        new_code_cell(PCA_CELL),
        new_markdown_cell(ZEROSHOT_MD),
        new_code_cell(ZEROSHOT_CELL),
        new_markdown_cell(SEARCH_MD),
        new_code_cell(SEARCH_CELL),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"  # stable ids: rebuilding gives the same file
    return nb


if __name__ == "__main__":
    nbformat.write(build(), NOTEBOOK)
    print(f"wrote {NOTEBOOK}")
