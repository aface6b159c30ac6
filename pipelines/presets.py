"""Random models for demos, tests and benchmarks: the 'tiny' and 'so400m-random' presets, built without the hub.

Seeded, so every build gives the same weights; `save_tiny` writes the tiny one as a hub-style checkpoint, the full
model with a real SentencePiece tokenizer trained here on generated English captions.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
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


# SigLIP's initial temperature and bias (log 10, -10: the paper's); transformers initialises both to 0.
TINY_LOGIT_SCALE = math.log(10)
TINY_LOGIT_BIAS = -10.0
# The tiny tokenizer: a SentencePiece unigram model with SigLIP's special ids (<pad> 0, </s> 1, <unk> 2), at most
# TINY_TEXT's vocabulary, trained on TINY_CORPUS_LINES generated captions; text is padded to 64 tokens, as so400m's.
TINY_CORPUS_LINES = 600
TINY_MAX_LENGTH = 64
SPIECE_MODEL = "spiece.model"
_OPENINGS = ["a photo of", "an image of", "a picture of", "a close-up of", "this is", "there is"]
_COUNTS = ["a", "one", "two", "three", "some", "many", "the"]
_ADJECTIVES = [
    "red", "green", "blue", "black", "white", "yellow", "brown", "grey", "small", "large", "old", "new", "wooden",
    "striped", "dark", "bright", "soft", "round", "square", "tall", "short", "empty", "heavy",
]
_NOUNS = [
    "bag", "trouser", "shirt", "shoe", "dress", "coat", "sandal", "sneaker", "boot", "pullover", "photo", "cat",
    "dog", "bird", "horse", "flower", "tree", "house", "car", "boat", "train", "table", "chair", "road", "river",
    "mountain", "city", "beach", "window", "garden", "kitchen",
]
_PLACES = ["on", "in", "near", "under", "beside", "with", "behind", "of", "at", "across", "above"]


def build_tiny(*, seed: int = 0, full: bool = False) -> torch.nn.Module:
    """A seeded, randomly initialised SigLIP (hidden 32, 2 layers, 384 px): the vision tower, or the full model.

    The vision tower is the full model's, so both forms give the same embeddings; the full model's logit scale and
    bias are SigLIP's initial ones.
    """
    from transformers import SiglipConfig, SiglipModel, SiglipVisionModel

    with _seeded(seed):
        model = SiglipModel(SiglipConfig(vision_config=TINY_VISION, text_config=TINY_TEXT)).eval()
    if full:
        with torch.no_grad():
            model.logit_scale.fill_(TINY_LOGIT_SCALE)
            model.logit_bias.fill_(TINY_LOGIT_BIAS)
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
    """Save the tiny preset as a hub-style checkpoint (config, safetensors, preprocessor config).

    The full model comes with its tokenizer (spiece.model, tokenizer_config.json), saved by SiglipTokenizer's own
    save_pretrained; the vision-only one (`full=False`) has none, as a SiglipVisionModel checkpoint.
    """
    directory = Path(directory)
    build_tiny(seed=seed, full=full).save_pretrained(directory)
    (directory / PREPROCESSOR_CONFIG).write_text(json.dumps(SO400M_PREPROCESSOR, indent=2))
    if full:
        from transformers import SiglipTokenizer

        (directory / SPIECE_MODEL).write_bytes(train_tiny_tokenizer())
        SiglipTokenizer(vocab_file=str(directory / SPIECE_MODEL), model_max_length=TINY_MAX_LENGTH).save_pretrained(
            directory)
    return directory


def tiny_corpus(lines: int = TINY_CORPUS_LINES, *, seed: int = 0) -> list[str]:
    """Generated English captions ("a photo of two red bags on the wooden table"), the same for the same seed."""
    rng = random.Random(seed)
    return [" ".join([rng.choice(_OPENINGS), rng.choice(_COUNTS), rng.choice(_ADJECTIVES), rng.choice(_NOUNS),
                      rng.choice(_PLACES), "the", rng.choice(_ADJECTIVES), rng.choice(_NOUNS)])
            for _ in range(lines)]


def train_tiny_tokenizer() -> bytes:
    """The tiny preset's SentencePiece model (a serialized ModelProto), trained on `tiny_corpus()`: deterministic."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()), model_writer=model, model_type="unigram",
        vocab_size=TINY_TEXT["vocab_size"], hard_vocab_limit=False,  # the corpus has fewer pieces: take what it has
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device | None = None):
    # Restores the generators it touched: CPU always, and the CUDA device that `device` names.
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if (
        device is not None and device.type == "cuda") else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield
