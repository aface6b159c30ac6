"""Random models for demos, tests and benchmarks: the 'tiny' and 'so400m-random' presets, built without the hub.

Seeded, so every build gives the same weights; `save_tiny` writes the tiny one as a hub-style checkpoint.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from pipelines.hub import PREPROCESSOR_CONFIG

# The so400m-patch14-384 preprocessing; also used by the tiny preset.
SO400M_PREPROCESSOR = {
    "do_resize": True,
    "size": {"height": 384, "width": 384},
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor",
}
TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 16,
    "image_size": 384,
}
# so400m-patch14-384's vision geometry; with random weights it times the real model where the hub is unreachable.
SO400M_VISION = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 384,
}
TINY_TEXT = {
    "eos_token_id": 1,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "vocab_size": 256,
}


def build_tiny(*, seed: int = 0, full: bool = False) -> torch.nn.Module:
    """A seeded, randomly initialised SigLIP (hidden 32, 2 layers, 384 px): the vision tower, or the full model.

    The vision tower is the full model's, so both forms give the same embeddings.
    """
    from transformers import SiglipConfig, SiglipModel, SiglipVisionModel

    with _seeded(seed):
        model = SiglipModel(SiglipConfig(vision_config=TINY_VISION, text_config=TINY_TEXT)).eval()
    if full:
        return model
    vision = SiglipVisionModel(model.config.vision_config).eval()
    # transformers 4 nests the tower one level deeper (`vision_model`) than transformers 5.
    getattr(vision, "vision_model", vision).load_state_dict(model.vision_model.state_dict())
    return vision


def build_so400m_random(*, seed: int = 0, device: str | torch.device = "cpu") -> torch.nn.Module:
    """so400m-patch14-384's vision tower (428M parameters) with seeded random weights, built on `device`.

    Speed does not depend on the weights' values; this times the real geometry without the model hub.
    """
    from transformers import SiglipVisionConfig, SiglipVisionModel

    device = torch.device(device)
    with _seeded(seed, device), device:
        return SiglipVisionModel(SiglipVisionConfig(**SO400M_VISION)).eval()


def save_tiny(directory: str | Path, *, seed: int = 0, full: bool = True) -> Path:
    """Save the tiny preset as a hub-style checkpoint (config, safetensors, preprocessor config)."""
    directory = Path(directory)
    build_tiny(seed=seed, full=full).save_pretrained(directory)
    (directory / PREPROCESSOR_CONFIG).write_text(json.dumps(SO400M_PREPROCESSOR, indent=2))
    return directory


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device | None = None):
    # Restores the generators it touched: CPU always, and the CUDA device that `device` names.
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if (
        device is not None and device.type == "cuda") else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield
