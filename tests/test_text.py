"""pipelines/text.py: tokenization equals SiglipProcessor, text embeddings equal get_text_features, image-text
logits equal SiglipModel's logits_per_image; a vision-only checkpoint and bad rows are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import SiglipModel, SiglipProcessor, SiglipTokenizer

from pipelines.data import decode
from pipelines.hub import WeightsUnavailableError
from pipelines.presets import TINY_LOGIT_BIAS, TINY_LOGIT_SCALE, TINY_MAX_LENGTH, train_tiny_tokenizer
from pipelines.siglip import load_encoder
from pipelines.text import (
    TextInputError,
    TextTowerMissingError,
    decode_text,
    decode_texts,
    load_text_encoder,
)

LONG = " ".join(["a photo of two striped cats on the wooden table near the river"] * 12)  # > 64 tokens
TEXTS = [
    "a photo of a red bag",
    "A Photo, of TWO dogs!!  ",  # lower-cased, punctuation stripped by the tokenizer
    "trouser",
    "un café près de la rivière ☕",  # pieces the tiny vocabulary lacks: <unk>
    "zebra\tand\nnewline",
    LONG,
]


def cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a, b = a.double().numpy(), b.double().numpy()
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def text_encoder(tiny_checkpoint):
    return load_text_encoder(str(tiny_checkpoint), revision=None, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """transformers' own SiglipModel and SiglipProcessor on the same checkpoint."""
    return SiglipModel.from_pretrained(tiny_checkpoint).eval(), SiglipProcessor.from_pretrained(tiny_checkpoint)


def processor_ids(processor: SiglipProcessor, texts: list[str]) -> torch.Tensor:
    return processor(text=texts, padding="max_length", truncation=True, max_length=TINY_MAX_LENGTH,
                     return_tensors="pt")["input_ids"]


def test_the_checkpoint_has_a_real_sentencepiece_tokenizer(tiny_checkpoint, reference):
    _, processor = reference
    assert isinstance(processor.tokenizer, SiglipTokenizer)
    assert (tiny_checkpoint / "spiece.model").read_bytes() == train_tiny_tokenizer()  # deterministic training
    pieces = processor.tokenizer.tokenize("a photo of a red bag")
    assert 1 < len(pieces) < len("a photo of a red bag")  # subword pieces, not characters


def test_tokenize_equals_siglip_processor(text_encoder, reference):
    _, processor = reference
    ours = text_encoder.tokenize(TEXTS)
    assert ours.dtype == torch.int64 and ours.shape == (len(TEXTS), TINY_MAX_LENGTH)
    assert torch.equal(ours, processor_ids(processor, TEXTS))
    eos = processor.tokenizer.eos_token_id
    assert ours[-1, -1] == eos and (ours[-1] != eos).sum() == TINY_MAX_LENGTH - 1  # truncated, sticky EOS
    pad = processor.tokenizer.pad_token_id  # SigLIP pads with its end-of-sequence token
    words = int((ours[0] != pad).sum())
    assert 2 < words < 20 and (ours[0, words:] == pad).all()  # padded to max_length
    # Texts that fit: the processor as the model card calls it (padding="max_length", nothing else) agrees.
    short = processor(text=TEXTS[:-1], padding="max_length", return_tensors="pt")["input_ids"]
    assert torch.equal(ours[:-1], short)


def test_embed_equals_get_text_features(text_encoder, reference):
    model, processor = reference
    with torch.no_grad():
        expected = model.get_text_features(input_ids=processor_ids(processor, TEXTS))
    expected = getattr(expected, "pooler_output", expected)
    ours = text_encoder.embed(TEXTS)
    assert ours.dtype == torch.float32 and ours.shape == (len(TEXTS), 32) == (len(TEXTS), text_encoder.embedding_dim)
    assert cosine(ours, expected).min() >= 0.9999
    assert not torch.allclose(ours[0], ours[2], atol=1e-2)  # different texts, different embeddings


def test_image_text_logits_equal_logits_per_image(tiny_checkpoint, text_encoder, reference, photo_bytes):
    model, processor = reference
    datas = list(photo_bytes.values())[:4]
    vision = load_encoder(str(tiny_checkpoint), device="cpu", dtype="float32")
    images = vision.embed_uint8(torch.stack([vision.preprocess.resize(decode(d)) for d in datas]))
    ours = text_encoder.logits(images, text_encoder.embed(TEXTS))
    pixels = torch.stack([vision.preprocess(decode(d)) for d in datas])
    with torch.no_grad():
        expected = model(input_ids=processor_ids(processor, TEXTS), pixel_values=pixels).logits_per_image
    assert ours.shape == expected.shape == (len(datas), len(TEXTS))
    assert (ours - expected).abs().max().item() <= 1e-4
    assert (text_encoder.logit_scale, text_encoder.logit_bias) == pytest.approx((TINY_LOGIT_SCALE, TINY_LOGIT_BIAS))
    assert (text_encoder.logit_scale, text_encoder.logit_bias) == pytest.approx(
        (model.logit_scale.item(), model.logit_bias.item()))


def test_the_tiny_preset_has_the_saved_checkpoints_text_side(text_encoder):
    preset = load_text_encoder("tiny", revision=None, device="cpu", dtype="float32")
    torch.testing.assert_close(preset.embed(TEXTS), text_encoder.embed(TEXTS))
    assert preset.metadata()["model"] == "tiny" and preset.metadata()["revision"] is None
    assert load_text_encoder("tiny", revision=None, device="cpu", dtype="float32").metadata() == preset.metadata()


def test_low_precision_returns_float32(tiny_checkpoint, text_encoder):
    low = load_text_encoder(str(tiny_checkpoint), revision=None, device="cpu", dtype="bfloat16")
    out = low.embed(TEXTS)
    assert out.dtype == torch.float32 and cosine(out, text_encoder.embed(TEXTS)).min() >= 0.99
    assert low.metadata()["dtype"] == "bfloat16"


def test_metadata_is_json_and_names_the_model(tiny_checkpoint, text_encoder):
    meta = text_encoder.metadata()
    assert json.loads(json.dumps(meta)) == meta
    assert meta["model"] == str(tiny_checkpoint) and meta["embedding_dim"] == 32 and meta["max_length"] == 64
    assert meta["tokenizer"] == "SiglipTokenizer" and meta["dtype"] == "float32" and meta["version"]


@pytest.mark.parametrize("texts, row, expected", [
    (["a cat", ""], 1, "empty"),
    (["   "], 0, "empty"),
    (["a cat", "a dog", None], 2, "expected a string, got NoneType"),
    ([b"a cat"], 0, "expected a string, got bytes"),
])
def test_bad_rows_name_the_row(text_encoder, texts, row, expected):
    with pytest.raises(TextInputError) as info:
        text_encoder.embed(texts)
    assert info.value.rows == (row,)
    assert str(info.value).startswith(f"text row {row}: ") and expected in str(info.value)
    assert "\n" not in str(info.value)


def test_decode_text():
    assert decode_text("café".encode(), 0) == "café"
    with pytest.raises(TextInputError, match=r"^text row 3: not valid UTF-8"):
        decode_text(b"caf\xe9", 3)
    with pytest.raises(TextInputError, match=r"^text row 1: empty"):
        decode_text(b"", 1)
    assert decode_texts([b"a cat", "☕ café".encode()]) == ["a cat", "☕ café"]
    with pytest.raises(TextInputError) as info:
        decode_texts([b"a cat", b"\xff\xfe", b"a dog", b""])
    assert info.value.rows == (1, 3)
    assert str(info.value) == ("text row 1: not valid UTF-8 (invalid start byte at byte 0); "
                               "text row 3: empty text (nothing to embed)")


def test_no_texts_give_no_rows(text_encoder):
    assert text_encoder.embed([]).shape == (0, 32)


@pytest.mark.parametrize("model", ["tiny_vision_checkpoint", "so400m-random"])
def test_a_vision_only_checkpoint_is_one_line(request, model):
    name = str(request.getfixturevalue(model)) if model.startswith("tiny") else model
    with pytest.raises(TextTowerMissingError) as info:
        load_text_encoder(name, revision=None, device="cpu", dtype="float32")
    message = str(info.value)
    assert "\n" not in message and repr(name) in message
    assert "the text side needs" in message and "full SiglipModel checkpoint" in message


def test_a_checkpoint_without_its_tokenizer_is_one_line(tmp_path, tiny_checkpoint):
    import shutil

    broken = shutil.copytree(tiny_checkpoint, tmp_path / "no-tokenizer")
    (broken / "spiece.model").unlink()
    with pytest.raises(WeightsUnavailableError) as info:
        load_text_encoder(str(broken), revision=None, device="cpu", dtype="float32")
    assert "\n" not in str(info.value) and str(broken) in str(info.value)


def test_missing_directory_and_unreachable_hub_are_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    with pytest.raises(WeightsUnavailableError, match="no such directory"):
        load_text_encoder(str(tmp_path / "nope"), revision=None, device="cpu", dtype="float32")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, not after retries
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsUnavailableError) as info:
        load_text_encoder("google/siglip-so400m-patch14-384", revision=None, device="cpu", dtype="float32")
    message = str(info.value)
    assert "\n" not in message and "google/siglip-so400m-patch14-384" in message and "offline mode" in message
