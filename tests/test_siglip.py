"""pipelines/siglip.py: preprocessing equals SiglipImageProcessor; loading checkpoints; clear errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SiglipImageProcessor, SiglipModel

from pipelines.data import decode
from pipelines.siglip import (
    SO400M_PREPROCESSOR,
    Preprocess,
    WeightsUnavailableError,
    load_encoder,
    load_preprocess,
    resolve_dtype,
    save_tiny,
)


def reference_pixels(processor: SiglipImageProcessor, data: bytes) -> torch.Tensor:
    """What a transformers user gets: PIL RGB image through the processor -> float32 [3, H, W]."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_preprocess_equals_siglip_image_processor(tiny_checkpoint, photo_bytes):
    processor = SiglipImageProcessor.from_pretrained(tiny_checkpoint)
    preprocess = load_preprocess(str(tiny_checkpoint))
    for name, data in photo_bytes.items():
        ours = preprocess(decode(data))
        ref = reference_pixels(processor, data)
        assert ours.shape == ref.shape == (3, 384, 384), name
        assert ours.dtype == torch.float32
        assert (ours - ref).abs().max().item() <= 1e-5, name


def test_preprocess_follows_the_checkpoint_config(tmp_path, photo_bytes):
    """Other size, resample, mean and std in preprocessor_config.json: still equal to the processor."""
    config = {**SO400M_PREPROCESSOR, "size": {"height": 224, "width": 256}, "resample": 2,
              "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = SiglipImageProcessor.from_pretrained(tmp_path)
    preprocess = Preprocess.from_config(config)
    for name in ("rgb.jpg", "gray.jpg", "cmyk.jpg"):
        ours = preprocess(decode(photo_bytes[name]))
        ref = reference_pixels(processor, photo_bytes[name])
        assert ours.shape == (3, 224, 256)
        assert (ours - ref).abs().max().item() <= 1e-5, name


def test_preprocess_config_round_trip():
    preprocess = Preprocess.from_config(SO400M_PREPROCESSOR)
    assert Preprocess.from_config(preprocess.to_config()) == preprocess
    with pytest.raises(ValueError, match="resample=9"):
        Preprocess.from_config({**SO400M_PREPROCESSOR, "resample": 9})


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_vision_checkpoint"])
def test_embedding_equals_transformers_reference(request, fixture, tiny_checkpoint, photo_bytes):
    """Full and vision-only checkpoints load; pooled output equals get_image_features on processor output."""
    encoder = load_encoder(str(request.getfixturevalue(fixture)), device="cpu", dtype="float32")
    reference_model = SiglipModel.from_pretrained(tiny_checkpoint).eval()
    processor = SiglipImageProcessor.from_pretrained(tiny_checkpoint)
    datas = list(photo_bytes.values())
    pixels = torch.stack([reference_pixels(processor, d) for d in datas])
    with torch.no_grad():
        reference = reference_model.get_image_features(pixel_values=pixels)
    reference = getattr(reference, "pooler_output", reference).numpy()
    ours = encoder.embed_uint8(torch.stack([encoder.preprocess.resize(decode(d)) for d in datas]))
    assert ours.dtype == torch.float32 and ours.shape == (len(datas), encoder.embedding_dim) == (len(datas), 32)
    assert cosine(ours.numpy(), reference).min() >= 0.9999


def test_tiny_preset_equals_its_saved_checkpoint(tiny_vision_checkpoint):
    pixels = torch.rand(2, 3, 384, 384) * 2 - 1
    preset = load_encoder("tiny", device="cpu", dtype="float32").embed(pixels)
    saved = load_encoder(str(tiny_vision_checkpoint), device="cpu", dtype="float32").embed(pixels)
    torch.testing.assert_close(preset, saved)
    assert not torch.allclose(preset, load_encoder("tiny", device="cpu").embed(pixels.flip(0)))


def test_low_precision_returns_float32():
    encoder = load_encoder("tiny", device="cpu", dtype="bfloat16")
    out = encoder.embed(torch.zeros(1, 3, 384, 384))
    assert out.dtype == torch.float32
    assert encoder.metadata()["dtype"] == "bfloat16"


def test_metadata_is_json_and_names_the_model(tiny_checkpoint):
    encoder = load_encoder(str(tiny_checkpoint), device="cpu")
    meta = json.loads(json.dumps(encoder.metadata()))
    assert meta == encoder.metadata()
    assert meta["model"] == str(tiny_checkpoint)
    assert meta["embedding_dim"] == 32 and meta["image_size"] == [384, 384] and meta["dtype"] == "float32"
    assert meta["version"]


def test_missing_directory_is_one_clear_line(tmp_path):
    with pytest.raises(WeightsUnavailableError) as info:
        load_encoder(str(tmp_path / "nope"), device="cpu")
    message = str(info.value)
    assert "\n" not in message and "nope" in message and "no such directory" in message
    with pytest.raises(WeightsUnavailableError, match="no such directory"):
        load_preprocess(str(tmp_path / "nope"))


def test_directory_without_weights_or_preprocessor_config(tmp_path, tiny_checkpoint):
    with pytest.raises(WeightsUnavailableError, match="preprocessor_config.json"):
        load_encoder(str(tmp_path), device="cpu")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(SO400M_PREPROCESSOR))
    with pytest.raises(WeightsUnavailableError, match="model.name_or_path="):
        load_encoder(str(tmp_path), device="cpu")


def test_unreachable_hub_is_one_clear_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, not after retries
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsUnavailableError) as info:
        load_encoder("google/siglip-so400m-patch14-384", device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert "google/siglip-so400m-patch14-384" in message and "model.name_or_path=DIR" in message


def test_dtype_names():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="fp8"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_save_tiny_writes_a_hub_style_checkpoint(tmp_path):
    directory = save_tiny(tmp_path / "ckpt")
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= names
    assert json.loads((directory / "config.json").read_text())["model_type"] == "siglip"
