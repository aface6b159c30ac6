"""SigLIP 2 in pipelines/siglip.py and pipelines/text.py: NaFlex preprocessing equals Siglip2ImageProcessor, image
and text embeddings of every kind (SigLIP, SigLIP 2 FixRes, SigLIP 2 NaFlex) equal transformers' on real photos of
every shape, and a checkpoint of another architecture is one line."""

from __future__ import annotations

import io
import math

import pytest
import torch
from helpers.images import PHOTOS, encode
from PIL import Image
from transformers import (
    AutoTokenizer,
    Siglip2ImageProcessor,
    Siglip2Model,
    SiglipImageProcessor,
    SiglipModel,
)
from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

from pipelines.data import decode
from pipelines.errors import UserError
from pipelines.presets import NAFLEX_PREPROCESSOR
from pipelines.siglip import (
    EncoderSpec,
    NaFlexPreprocess,
    Preprocess,
    load_encoder,
    load_preprocess,
    naflex_size,
)
from pipelines.text import load_text_encoder

MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def shaped_photos() -> dict[str, bytes]:
    """Real photos of every shape: landscape, portrait, square, very wide, very tall, tiny, in JPEG and PNG."""
    china, flower = Image.open(PHOTOS / "china.jpg").convert("RGB"), Image.open(PHOTOS / "flower.jpg").convert("RGB")
    return {
        "landscape.jpg": (PHOTOS / "china.jpg").read_bytes(),
        "portrait.png": encode(flower.transpose(Image.Transpose.ROTATE_90), "PNG"),
        "square.png": encode(china.crop((100, 0, 527, 427)), "PNG"),
        "wide.png": encode(china.crop((0, 200, 640, 230)), "PNG"),  # 640 x 30, about 21:1
        "tall.png": encode(flower.crop((300, 0, 318, 427)), "PNG"),  # 18 x 427, about 1:24
        "tiny.png": encode(flower.crop((200, 200, 207, 205)), "PNG"),  # 7 x 5: smaller than one patch
        "gray.jpg": encode(china.convert("L").crop((0, 0, 640, 160)), "JPEG", quality=90),
    }


@pytest.fixture(scope="module")
def kinds(tiny_checkpoint, siglip2_fixres_checkpoint, naflex_checkpoint):
    """Each kind of checkpoint with transformers' own model and processor for it."""
    return {
        "siglip": (tiny_checkpoint, SiglipModel, SiglipImageProcessor),
        "siglip2-fixres": (siglip2_fixres_checkpoint, SiglipModel, SiglipImageProcessor),
        "siglip2-naflex": (naflex_checkpoint, Siglip2Model, Siglip2ImageProcessor),
    }


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_naflex_sizes_equal_the_processors():
    shapes = [(1, 1), (5, 7), (427, 640), (640, 427), (30, 640), (427, 18), (10_000, 3), (3, 10_000), (384, 384),
              (512, 512), (1000, 999), (257, 16)]
    for patch, most in ((16, 256), (14, 729), (16, 1024), (16, 64)):
        for h, w in shapes:
            ours = naflex_size(h, w, patch_size=patch, max_num_patches=most)
            assert ours == get_image_size_for_max_num_patches(h, w, patch, most), (h, w, patch, most)
            assert ours[0] % patch == ours[1] % patch == 0
            assert (ours[0] // patch) * (ours[1] // patch) <= most


def test_naflex_preprocess_equals_siglip2_image_processor(naflex_checkpoint, shaped_photos):
    processor = Siglip2ImageProcessor.from_pretrained(naflex_checkpoint)
    preprocess = load_preprocess(str(naflex_checkpoint))
    assert isinstance(preprocess, NaFlexPreprocess)
    for name, data in shaped_photos.items():
        ours = preprocess(decode(data))
        ref = processor(images=pil(data), return_tensors="pt")
        assert ours["pixel_values"].shape == (256, 16 * 16 * 3), name
        assert ours["pixel_values"].dtype == torch.float32
        assert (ours["pixel_values"] - ref["pixel_values"][0]).abs().max().item() <= 1e-5, name
        assert torch.equal(ours["pixel_attention_mask"], ref["pixel_attention_mask"][0]), name
        assert torch.equal(ours["spatial_shapes"], ref["spatial_shapes"][0]), name


def test_naflex_resize_gives_fixed_shapes_batched_or_not(shaped_photos):
    preprocess = NaFlexPreprocess.from_config(NAFLEX_PREPROCESSOR)
    wide = decode(shaped_photos["wide.png"])
    one = preprocess.resize(wide)
    assert {k: (tuple(v.shape), v.dtype) for k, v in one.items()} == {
        "pixel_values": ((256, 768), torch.uint8), "pixel_attention_mask": ((256,), torch.int32),
        "spatial_shapes": ((2,), torch.int64)}
    rows, cols = one["spatial_shapes"].tolist()
    assert cols > 10 * rows and int(one["pixel_attention_mask"].sum()) == rows * cols
    batch = preprocess.resize(torch.stack([wide, wide.flip(-1)]))
    assert torch.equal(batch["pixel_values"][0], one["pixel_values"])
    assert torch.equal(batch["pixel_values"][1], preprocess.resize(wide.flip(-1))["pixel_values"])
    assert NaFlexPreprocess.from_config(preprocess.to_config()) == preprocess
    with pytest.raises(UserError, match="do_resize=false"):
        NaFlexPreprocess.from_config({**NAFLEX_PREPROCESSOR, "do_resize": False})


@pytest.mark.parametrize("kind", ["siglip", "siglip2-fixres", "siglip2-naflex"])
def test_image_embeddings_equal_transformers(kinds, kind, shaped_photos):
    """Every photo in one batch, as the data path stacks `resize`'s outputs: each row equals the vision tower's
    pooler_output on transformers' own preprocessing of that photo alone."""
    checkpoint, model_class, processor_class = kinds[kind]
    model, processor = model_class.from_pretrained(checkpoint).eval(), processor_class.from_pretrained(checkpoint)
    encoder = load_encoder(str(checkpoint), device="cpu", dtype="float32")
    resized = [encoder.preprocess.resize(decode(data)) for data in shaped_photos.values()]
    if kind == "siglip2-naflex":
        stacked = {key: torch.stack([r[key] for r in resized]) for key in resized[0]}
    else:
        stacked = torch.stack(resized)
    ours = encoder.embed_uint8(stacked)
    with torch.no_grad():
        ref = torch.cat([model.vision_model(**processor(images=pil(data), return_tensors="pt")).pooler_output
                         for data in shaped_photos.values()])
    similarity = cosine(ours, ref)
    print(f"{kind} image: min cosine {similarity.min().item():.9f}, max abs difference "
          f"{(ours - ref).abs().max().item():.1e} over {len(ref)} photos")
    assert ours.shape == (len(shaped_photos), encoder.embedding_dim) and ours.dtype == torch.float32
    assert similarity.min().item() >= MIN_COSINE, dict(zip(shaped_photos, similarity.tolist()))


@pytest.mark.parametrize("kind", ["siglip", "siglip2-fixres", "siglip2-naflex"])
def test_text_embeddings_equal_transformers(kinds, kind):
    """64 tokens padded on the right; SigLIP 2's Gemma tokenizer on lower-cased text, as it was trained (SigLIP's
    own tokenizer lower-cases by itself)."""
    checkpoint, model_class, _ = kinds[kind]
    texts = ["A Photo of Two RED bags", "a close-up of the wooden table near the river", "un café ☕",
             " ".join(["a photo of two striped cats"] * 20)]
    encoder = load_text_encoder(str(checkpoint), revision=None, device="cpu", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    lowercase = kind != "siglip"
    ids = tokenizer([t.lower() if lowercase else t for t in texts], padding="max_length", max_length=64,
                    truncation=True, padding_side="right", return_tensors="pt")["input_ids"]
    assert encoder.lowercase == lowercase and encoder.max_length == 64
    assert torch.equal(encoder.tokenize(texts), ids)
    assert (ids[0] == tokenizer.pad_token_id).nonzero().min() > 0  # padding on the right: the text comes first
    model = model_class.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        ref = model.get_text_features(input_ids=ids).pooler_output
        logits = model(input_ids=ids, pixel_values=torch.zeros(1, 3, 384, 384)).logits_per_text[:, 0] if (
            kind == "siglip2-fixres") else None
    ours = encoder.embed(texts)
    similarity = cosine(ours, ref)
    print(f"{kind} text: min cosine {similarity.min().item():.9f}, max abs difference "
          f"{(ours - ref).abs().max().item():.1e} over {len(texts)} texts")
    assert similarity.min().item() >= MIN_COSINE
    assert math.isclose(encoder.logit_bias, float(model.logit_bias.detach()))
    if logits is not None:
        image = load_encoder(str(checkpoint), device="cpu").embed(torch.zeros(1, 3, 384, 384))
        assert torch.allclose(encoder.logits(image, encoder.embed(texts))[0], logits, atol=1e-4)


def test_naflex_padding_to_a_compiled_batch_changes_nothing(naflex_checkpoint, shaped_photos):
    """A compiled encoder pads the last batch (a NaFlex dict by repeating its first row): the rows stay equal."""
    encoder = load_encoder(str(naflex_checkpoint), device="cpu")
    resized = [encoder.preprocess.resize(decode(data)) for data in list(shaped_photos.values())[:5]]
    stacked = {key: torch.stack([r[key] for r in resized]) for key in resized[0]}
    plain = encoder.embed_uint8(stacked)
    encoder.compiled_batch = 4  # the padding path of `compile`, without the compiler
    padded = encoder.embed_uint8(stacked)
    assert padded.shape == plain.shape
    assert torch.allclose(padded, plain, atol=1e-5)


def test_naflex_metadata_names_its_preprocessing(naflex_checkpoint):
    spec = EncoderSpec(str(naflex_checkpoint), None, "cpu", "float32")
    meta = spec.metadata()
    assert meta == load_encoder(str(naflex_checkpoint), device="cpu").metadata()
    assert meta["image_size"] is None and meta["preprocess"]["max_num_patches"] == 256
    other = NaFlexPreprocess.from_config({**NAFLEX_PREPROCESSOR, "max_num_patches": 1024}).to_config()
    assert other != meta["preprocess"]  # a resume with another patch budget is refused by the store's comparison
    assert Preprocess.from_config(load_preprocess("tiny").to_config()) == load_preprocess("tiny")


def _save_clip(directory):
    from transformers import CLIPConfig, CLIPModel

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    CLIPModel(CLIPConfig(text_config=small, vision_config={**small, "image_size": 32, "patch_size": 8})
              ).save_pretrained(directory)


def _save_dinov2(directory):
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             image_size=32, patch_size=8)).save_pretrained(directory)


@pytest.mark.parametrize(("save", "model_type", "architecture"),
                         [(_save_clip, "clip", "CLIPModel"), (_save_dinov2, "dinov2", "Dinov2Model")])
def test_another_architecture_is_one_line(tmp_path, save, model_type, architecture):
    save(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"image_processor_type": "CLIPImageProcessor"}')
    expected = (f"model.name_or_path='{tmp_path}' is a {model_type} checkpoint ({architecture}); "
                "this tool embeds SigLIP and SigLIP 2")
    for load in (lambda: load_encoder(str(tmp_path), device="cpu"), lambda: load_preprocess(str(tmp_path)),
                 lambda: EncoderSpec(str(tmp_path), None, "cpu", "auto").metadata(),
                 lambda: load_text_encoder(str(tmp_path), revision=None, device="cpu", dtype="auto")):
        with pytest.raises(UserError) as info:
            load()
        assert str(info.value) == expected


@pytest.mark.job
def test_search_and_zeroshot_on_naflex_embeddings(naflex_checkpoint, shaped_photos, tmp_path):
    """NaFlex embeddings stored as the data path will store them (`resize` per image, stacked key by key,
    `embed_uint8`): an image query finds itself with score 1, a text query and zero-shot run on the text tower."""
    import numpy as np
    from omegaconf import OmegaConf

    from pipelines import store
    from pipelines.config import CONF_DIR
    from pipelines.search import run_search
    from pipelines.zeroshot import run_zeroshot

    root, out = tmp_path / "images", tmp_path / "naflex"
    files = {f"valid/{'wide' if i % 2 else 'tall'}/{name}": data for i, (name, data) in enumerate(shaped_photos.items())}
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    encoder = load_encoder(str(naflex_checkpoint), device="cpu")
    resized = [encoder.preprocess.resize(decode(data)) for data in files.values()]
    embeddings = encoder.embed_uint8({key: torch.stack([r[key] for r in resized]) for key in resized[0]}).numpy()
    table = store.to_table(list(files), [path.split("/")[1] for path in files], embeddings, encoder.metadata())
    store.write_part(store.split_dir(out, "valid"), table, prefix="shard0of1")
    common = {"embeddings_dir": out, "splits": None, "k": 3, "index": "exact", "rebuild": False, "index_dir": None,
              "name_or_path": str(naflex_checkpoint), "revision": None, "device": "cpu", "dtype": "float32",
              "max_image_pixels": 89478485, "dataset_root": root,
              "ann_options": OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/search.yaml").ann)}
    target = "valid/wide/portrait.png"
    found = run_search(**common, query=None, image=root / target)["results"][0]
    assert found["path"] == target and found["score"] == pytest.approx(1.0, abs=1e-5)
    assert len(run_search(**common, query="a photo of a flower", image=None)["results"]) == 3
    report = run_zeroshot(embeddings_dir=out, query_split="valid", protocol="auto", dataset=None, class_names=None,
                          templates=None, name_or_path=str(naflex_checkpoint), revision=None, device="cpu",
                          dtype="float32", batch_size=8, output_dir=tmp_path / "z", dataset_root=root, worst=2)
    assert report["protocol"] == "simple" and report["num_query"] == len(files) and 0 <= report["top1"] <= 1
    assert np.isfinite(embeddings).all()
