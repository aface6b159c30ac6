"""pipelines/zeroshot.py and pipelines/classnames.py: the prompt ensemble, SigLIP's sigmoid probabilities, the
class embeddings saved as Parquet and reused only while model, names and templates are unchanged, class names
from LOC_synset_mapping.txt, tab-separated files or folder names."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.jobs import embed_sample_subset

from pipelines import classnames, report, zeroshot
from pipelines.errors import UserError

TEXT_META = {"model": "tiny", "revision": None, "embedding_dim": 4, "dtype": "float32"}


def fake_text_tower(texts):
    """A deterministic text -> 4-d vector function (not unit norm), standing in for a text tower."""
    out = []
    for t in texts:
        rng = np.random.default_rng(sum(map(ord, t)) * 7 + len(t))
        out.append(rng.normal(size=4) * (1 + len(t)))
    return np.asarray(out, np.float32)


def test_ensemble_averages_unit_prompt_embeddings_then_renormalises():
    names, templates = ["cat", "dog", "ankle boot"], ["a photo of a {}.", "a drawing of the {}.", "{}"]
    got = zeroshot.ensemble(fake_text_tower, names, templates, batch_size=2)
    for i, name in enumerate(names):
        prompts = fake_text_tower([t.format(name) for t in templates]).astype(np.float64)
        mean = (prompts / np.linalg.norm(prompts, axis=1, keepdims=True)).mean(axis=0)
        np.testing.assert_allclose(got[i], mean / np.linalg.norm(mean), atol=1e-6)
    assert got.dtype == np.float32 and got.shape == (3, 4)


def test_logits_and_probabilities_are_siglips():
    rng = np.random.default_rng(0)
    images, classes = rng.normal(size=(5, 4)).astype(np.float32) * 3, zeroshot._unit(rng.normal(size=(3, 4)))
    logits = zeroshot.logits(images, classes, logit_scale=117.3, logit_bias=-12.9)
    cos = (images / np.linalg.norm(images, axis=1, keepdims=True)) @ classes.T
    np.testing.assert_allclose(logits, 117.3 * cos - 12.9, rtol=1e-5, atol=1e-4)
    assert (logits.argmax(axis=1) == cos.argmax(axis=1)).all()
    with np.errstate(over="ignore"):
        np.testing.assert_allclose(zeroshot.sigmoid(logits), 1 / (1 + np.exp(-logits.astype(np.float64))),
                                   rtol=1e-6, atol=1e-37)  # float32 ends near 1e-38
    assert zeroshot.sigmoid(np.array([-1e4, 0, 1e4], np.float32)).tolist() == [0.0, 0.5, 1.0]
    assert zeroshot.sigmoid(np.array([-30.0]))[0] == pytest.approx(np.exp(-30.0), rel=1e-6)


def test_templates_need_one_placeholder():
    assert zeroshot.check_templates(["a {}."]) == ["a {}."]
    assert zeroshot.check_templates("a photo of a {}.") == ["a photo of a {}."]  # one string: a list of one
    for bad in ([], ["a photo"], ["{} and {}"], 5, [3]):
        with pytest.raises(UserError):
            zeroshot.check_templates(bad)


@pytest.mark.parametrize(("template", "expected"), [
    ("a {} photo {x}", "found {}, {x}"),  # str.format would raise KeyError: 'x'
    ("a photo of {{}}", "found none"),  # literal braces: every class would get the same prompt
    ("a {0} photo", "found {0}"),
    ("a {!r} photo", "found {!r}"),
    ("a photo of {", "Single '{' encountered"),
])
def test_templates_str_format_would_misread_are_one_line(template, expected):
    with pytest.raises(UserError) as info:
        zeroshot.check_templates([template])
    assert expected in str(info.value) and repr(template) in str(info.value) and "\n" not in str(info.value)


def test_protocols_give_names_and_templates():
    clip = zeroshot.resolve_protocol("auto", dataset="imagenet", class_names=None, templates=None)
    assert clip.name == "clip" and clip.class_names == zeroshot.CLIP_CLASS_NAMES and len(clip.templates) == 80
    assert clip.describe(str(clip.class_names)).startswith("protocol: clip (the CLIP paper's ImageNet class names "
                                                           "and its 80 prompt templates")
    simple = zeroshot.resolve_protocol("auto", dataset="sample", class_names=None, templates=None)
    assert (simple.name, simple.class_names, simple.templates) == ("simple", None, ["a photo of a {}."])
    assert simple.describe("/d/LOC_synset_mapping.txt") == (
        "protocol: simple (class names: the first lemma of /d/LOC_synset_mapping.txt; 1 template ('a photo of a {}.'))")
    mixed = zeroshot.resolve_protocol("clip", dataset=None, class_names=None, templates="a {}.")
    assert mixed.templates == ["a {}."] and mixed.custom == ("templates",)
    assert mixed.describe(str(zeroshot.CLIP_CLASS_NAMES)).endswith("1 template ('a {}.'); given: templates)")
    with pytest.raises(UserError, match="protocol='openai': expected one of auto, clip, simple"):
        zeroshot.resolve_protocol("openai", dataset=None, class_names=None, templates=None)


def test_the_shipped_clip_names_and_templates():
    """ImageNet's 1,000 synsets in their standard (sorted) order, each with a name; 80 templates, each valid."""
    names = classnames.read_names(zeroshot.CLIP_CLASS_NAMES)
    labels = list(names)
    assert len(labels) == 1000 and labels == sorted(labels) and all(label[0] == "n" for label in labels)
    assert (names["n01440764"], names["n02012849"], names["n03126707"]) == ("tench", "crane bird",
                                                                             "construction crane")
    templates = zeroshot.read_templates(zeroshot.CLIP_TEMPLATES)
    assert len(set(templates)) == 80 and zeroshot.check_templates(templates) == templates


def test_class_embeddings_saved_with_metadata_reused_and_recomputed(tmp_path):
    path, calls = tmp_path / "z" / zeroshot.CLASS_EMBEDDINGS, []

    def counting(texts):
        calls.append(len(texts))
        return fake_text_tower(texts)

    args = {"text_meta": TEXT_META, "labels": ["a", "b"], "names": ["cat", "dog"], "templates": ["a {}."],
            "embed": counting, "batch_size": 8}
    first, reused = zeroshot.class_embeddings(path, **args)
    assert not reused and calls == [2]
    table = pq.read_table(path)
    assert table.column("label").to_pylist() == ["a", "b"] and table.column("name").to_pylist() == ["cat", "dog"]
    again, reused = zeroshot.class_embeddings(path, **args)
    assert reused and calls == [2] and (again == first).all()
    for change in ({"names": ["cat", "wolf"]}, {"templates": ["a {}.", "the {}."]},
                   {"text_meta": {**TEXT_META, "model": "other"}}, {"labels": ["a", "c"]}):
        _, reused = zeroshot.class_embeddings(path, **{**args, **change})
        assert not reused
    path.write_bytes(b"torn")
    assert zeroshot.class_embeddings(path, **args)[1] is False  # unreadable: computed again and replaced
    assert zeroshot.class_embeddings(path, **args)[1] is True


def test_output_folder_beside_never_inside(tmp_path):
    emb = tmp_path / "sample-tiny"
    assert zeroshot.output_location(emb, None) == tmp_path / "sample-tiny-zeroshot"
    with pytest.raises(UserError, match="inside embeddings_dir"):
        zeroshot.output_location(emb, emb / "z")


def test_class_names_from_synset_mapping_tab_file_and_folders(tmp_path):
    loc = tmp_path / "LOC_synset_mapping.txt"
    loc.write_text("n01440764 tench, Tinca tinca\nn02012849 crane\nn03126707 crane\n\n")
    assert classnames.read_names(loc) == {"n01440764": "tench", "n02012849": "crane", "n03126707": "crane"}
    tab = tmp_path / "names.tsv"
    tab.write_text("n01440764\ttench, the fish\nankle_boot\tboot\n")
    assert classnames.read_names(tab) == {"n01440764": "tench, the fish", "ankle_boot": "boot"}
    assert classnames.names_for(["n01440764", "ankle_boot", "t_shirt"], tab) == ["tench, the fish", "boot",
                                                                                  "t shirt"]
    assert classnames.names_for(["ankle_boot"], None) == ["ankle boot"]
    assert report.find_class_names(None, [tmp_path / "none", tmp_path]) == loc
    assert report.find_class_names(None, [tmp_path / "none"]) is None
    with pytest.raises(UserError, match="no such file"):
        report.find_class_names(tmp_path / "missing.txt", [])
    (tmp_path / "bad.txt").write_text("n01440764\n")
    with pytest.raises(UserError, match="bad.txt:1"):
        classnames.read_names(tmp_path / "bad.txt")
    (tmp_path / "twice.tsv").write_text("bag\thandbag\ntrouser\ttrousers\nbag\tpurse\n")
    with pytest.raises(UserError, match=r"twice.tsv:3: label 'bag' is named again \(first on line 1\)"):
        classnames.read_names(tmp_path / "twice.tsv")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Three classes x (2 train + 3 valid) of data/sample, embedded with the tiny model."""
    return embed_sample_subset(tmp_path_factory, labels=("ankle_boot", "bag", "trouser"),
                               per_split={"train": 2, "valid": 3})


def run(out, **kw):
    args = {"embeddings_dir": out, "query_split": "valid", "protocol": "simple", "dataset": None, "class_names": None,
            "templates": ["a photo of a {}."],
            "name_or_path": "tiny", "revision": None, "device": "cpu", "dtype": "float32", "batch_size": 4,
            "output_dir": None, "dataset_root": None, "worst": 5}
    return zeroshot.run_zeroshot(**{**args, **kw})


@pytest.mark.job
def test_zeroshot_equals_siglip_computed_here_and_reuses_class_embeddings(embedded, caplog):
    import pandas as pd

    from pipelines import store
    from pipelines.text import load_text_encoder

    _, out = embedded
    templates = ["a photo of a {}.", "a blurry photo of the {}."]
    report = run(out, templates=templates)
    folder = out.parent / "sample-tiny-zeroshot"
    assert report["files"]["report"] == str(folder / "report.json") and not report["class_embeddings"]["reused"]
    # the same numbers from the text tower and the stored image embeddings, computed here
    text = load_text_encoder("tiny", revision=None, device="cpu", dtype="float32")
    names = ["ankle boot", "bag", "trouser"]
    per_template = [text.embed([t.format(n) for n in names]).numpy().astype(np.float64) for t in templates]
    mean = sum(e / np.linalg.norm(e, axis=1, keepdims=True) for e in per_template) / 2
    classes = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    valid = store.read_split(out, "valid")
    images = valid.embeddings / np.linalg.norm(valid.embeddings, axis=1, keepdims=True)
    logits = images @ classes.T * np.exp(text.logit_scale) + text.logit_bias
    truth = np.searchsorted(["ankle_boot", "bag", "trouser"], valid.labels)
    assert report["top1"] == np.mean(logits.argmax(axis=1) == truth) and report["num_query"] == 9
    assert report["logit_scale"] == pytest.approx(np.exp(text.logit_scale))
    predictions = pd.read_parquet(folder / "predictions.parquet")
    np.testing.assert_allclose(predictions["probability"], 1 / (1 + np.exp(-logits.max(axis=1))), rtol=1e-5)
    assert {"report.json", "per_class.csv", "predictions.parquet", "per_class.png",
            zeroshot.CLASS_EMBEDDINGS} <= {p.name for p in folder.iterdir()}
    saved = pd.read_parquet(folder / zeroshot.CLASS_EMBEDDINGS)
    assert saved["name"].tolist() == names
    np.testing.assert_allclose(np.stack(saved["embedding"]), classes, atol=1e-5)

    again = run(out, templates=templates)
    assert again["class_embeddings"]["reused"] and again["top1"] == report["top1"]
    other = run(out, templates=templates[:1])
    assert not other["class_embeddings"]["reused"]


@pytest.mark.job
def test_names_file_and_errors(embedded, tmp_path, tiny_vision_checkpoint):
    _root, out = embedded
    names = tmp_path / "names.tsv"
    names.write_text("ankle_boot\tboot\nbag\thandbag\n")
    report = run(out, class_names=names, output_dir=tmp_path / "z")
    table = (tmp_path / "z" / "per_class.csv").read_text()
    assert report["class_names"] == str(names) and "boot" in table and "handbag" in table and "trouser" in table
    with pytest.raises(UserError, match="inside embeddings_dir"):
        run(out, output_dir=out / "z")
    with pytest.raises(UserError, match="model: 'tiny' stored"):
        run(out, name_or_path=str(tiny_vision_checkpoint))
    with pytest.raises(UserError, match="exactly one"):
        run(out, templates=["a photo"])


@pytest.mark.job
def test_cli_prints_the_table(embedded, tmp_path):
    import subprocess
    import sys

    from pipelines.config import REPO_ROOT

    _, out = embedded
    run_ = subprocess.run([sys.executable, "-m", "pipelines.zeroshot", "model=tiny", f"embeddings_dir={out}",
                           "device=cpu", f"output_dir={tmp_path}/z", "templates='a photo of the {}.'"], check=False,
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert run_.returncode == 0, run_.stderr
    assert "zero-shot over 3 classes, valid 9" in run_.stdout and "top-1 " in run_.stdout
    assert ("protocol: simple (class names: the folder names; 1 template ('a photo of the {}.'); given: templates)"
            in run_.stdout)
    # Checked before any model loads: the model named here does not exist.
    for setting, expected in (('templates=["a {} photo {x}"]', "found {}, {x}"),
                              ("protocol=clip", "are not ImageNet synsets (e.g. 'ankle_boot')")):
        bad = subprocess.run([sys.executable, "-m", "pipelines.zeroshot", "model.name_or_path=/no/such/model",
                              f"embeddings_dir={out}", setting], check=False, capture_output=True, text=True,
                             cwd=REPO_ROOT, timeout=300)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and expected in bad.stderr, bad.stderr
    bad = subprocess.run([sys.executable, "-m", "pipelines.zeroshot", "model=tiny", f"embeddings_dir={out}",
                          "query_split=test"], check=False, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "split=test" in bad.stderr
