"""pipelines/siglip.py: preprocessing equals SiglipImageProcessor; loading checkpoints; clear errors."""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SiglipImageProcessor, SiglipModel

from pipelines.data import decode
from pipelines.errors import UserError
from pipelines.presets import SO400M_PREPROCESSOR, save_tiny
from pipelines.siglip import (
    EncoderSpec,
    Preprocess,
    WeightsUnavailableError,
    load_encoder,
    load_preprocess,
    resolve_dtype,
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
    with pytest.raises(UserError, match="resample=9"):
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


def test_tiny_preset_weights_do_not_change():
    """`model=tiny` outputs stay those of earlier releases: the preset's first embedding values for a gray image."""
    first = load_encoder("tiny", device="cpu", dtype="float32").embed(torch.zeros(1, 3, 384, 384))[0, :6]
    expected = torch.tensor([-0.8242315, 0.7061949, -0.1727040, 1.0759259, 0.8685182, -1.2124473])
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", ["tiny", "tiny_checkpoint", "tiny_vision_checkpoint"])
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_spec_metadata_equals_the_loaded_encoders(request, model, dtype):
    """EncoderSpec.metadata() reads the config files only, and says what the loaded encoder's metadata says."""
    name = model if model == "tiny" else str(request.getfixturevalue(model))
    spec = EncoderSpec(name_or_path=name, revision=None, device="cpu", dtype=dtype)
    assert spec.metadata() == spec.load().metadata()
    assert spec.preprocess() == spec.load().preprocess


def test_spec_metadata_of_the_so400m_preset_needs_no_model():
    meta = EncoderSpec(name_or_path="so400m-random", revision=None, device="cpu", dtype="float32").metadata()
    assert meta["embedding_dim"] == 1152 and meta["image_size"] == [384, 384] and meta["revision"] is None
    # Built on the meta device: no memory and no compute, only what the loaded encoder reports.
    assert meta == load_encoder("so400m-random", device="meta", dtype="float32").metadata()


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
    with pytest.raises(UserError, match="fp8"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_save_tiny_writes_a_hub_style_checkpoint(tmp_path):
    directory = save_tiny(tmp_path / "ckpt")
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "spiece.model",
            "tokenizer_config.json"} <= names
    assert json.loads((directory / "config.json").read_text())["model_type"] == "siglip"
    vision = {p.name for p in save_tiny(tmp_path / "vision", full=False).iterdir()}
    assert "config.json" in vision and "spiece.model" not in vision and "tokenizer_config.json" not in vision


# ---------------------------------------------------------------- a hub id when the hub cannot be had


def free_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hub_env(tmp_path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    return {**env, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def embed_default_model(tmp_path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.embed", f"output_dir={tmp_path / 'out'}"], check=False,
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "Retry" not in result.stdout + result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


@pytest.mark.job
def test_offline_mode_without_the_model_is_one_line_at_once(tmp_path):
    result = embed_default_model(tmp_path, hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert_one_line(result, "google/siglip-so400m-patch14-384", "offline mode is on (HF_HUB_OFFLINE)",
                    str(tmp_path / "hf-home" / "hub"), "model.name_or_path=DIR")


@pytest.mark.job
def test_an_unreachable_hub_is_asked_once_without_retries(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    result = embed_default_model(tmp_path, hub_env(tmp_path, HF_ENDPOINT=endpoint))
    assert_one_line(result, "google/siglip-so400m-patch14-384", f"the hub at {endpoint} did not answer",
                    "model=tiny")


@pytest.fixture
def answering_hub() -> Iterator[tuple[str, list[str]]]:
    """A local stand-in for the hub answering every request with the status in the path's first part (no model
    has it), e.g. /404/name/resolve/main/x; yields its endpoint and the request lines it saw."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            seen.append(f"{self.command} {self.path}")
            code = int(self.path.split("/")[1])
            self.send_response(code)
            self.send_header("X-Error-Code", {401: "GatedRepo", 404: "RepoNotFound"}.get(code, "Other"))
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("code, expected", [(404, "check the id and the revision"), (401, "hf auth login")])
def test_a_hub_that_refuses_the_id_is_one_line(answering_hub, monkeypatch, tmp_path, code, expected):
    import huggingface_hub.constants

    endpoint, seen = answering_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    with pytest.raises(WeightsUnavailableError) as info:
        load_preprocess(f"{code}/no-such-model", revision="v1")
    message = str(info.value)
    assert "\n" not in message and f"HTTP {code}" in message and expected in message
    assert f"'{code}/no-such-model' at revision 'v1'" in message
    assert seen == [f"HEAD /{code}/no-such-model/resolve/v1/preprocessor_config.json"]  # once: no retries


def test_a_cached_model_loads_when_the_hub_does_not_answer(tmp_path, tiny_checkpoint):
    """A hub id in the Hugging Face cache (as a download leaves it) loads with the hub unreachable."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-home" / "hub" / "models--someone--tiny-siglip"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    probe = ("from pipelines.siglip import EncoderSpec, load_encoder; e = load_encoder('someone/tiny-siglip'); "
             "print(e.revision); spec = EncoderSpec('someone/tiny-siglip', None, 'cpu', 'auto'); "
             "print(spec.metadata() == e.metadata(), spec.metadata()['revision'])")
    env = hub_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    result = subprocess.run([sys.executable, "-c", probe], check=False, cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [commit, "True", commit] and "Retry" not in result.stderr


def test_the_model_check_needs_no_torch(tmp_path):
    """`pipelines.hub.check_model` says the model cannot be had before anything imports torch (seconds earlier)."""
    probe = ("import sys\nfrom pipelines.hub import WeightsUnavailableError, check_model\n"
             "try:\n    check_model('google/siglip-so400m-patch14-384')\n"
             "except WeightsUnavailableError as exc:\n    print('refused:', exc)\n"
             "print('torch imported:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], check=False, cwd=tmp_path, capture_output=True, text=True,
                            env=hub_env(tmp_path, HF_HUB_OFFLINE="1"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused: could not load SigLIP weights" in result.stdout and "torch imported: False" in result.stdout
