"""Random models for demos, tests and benchmarks: the 'tiny', 'so400m-random' and 'so400m-naflex-random' presets,
built without the hub.

Seeded, so every build gives the same weights; `save_tiny` writes the tiny one as a hub-style checkpoint, the full
model with a real SentencePiece tokenizer trained here on generated English captions; `save_tiny_siglip2` writes a
tiny SigLIP 2 checkpoint (NaFlex, or fixed resolution) with a Gemma-style BPE tokenizer trained the same way.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path

import torch

from pipelines.hub import NAFLEX_MAX_NUM_PATCHES, NAFLEX_PATCH_SIZE, PREPROCESSOR_CONFIG

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
# so400m-patch16-naflex's vision geometry (SigLIP 2 NaFlex): 16-pixel patches, at most 256 of them per image.
SO400M_NAFLEX_VISION = {**SO400M_VISION, "patch_size": NAFLEX_PATCH_SIZE, "num_patches": NAFLEX_MAX_NUM_PATCHES}
SO400M_NAFLEX_VISION.pop("image_size")
# The NaFlex checkpoints' preprocessing (Siglip2ImageProcessor): the image resized at its own aspect ratio to at most
# max_num_patches patches of patch_size pixels, bilinear.
NAFLEX_PREPROCESSOR = {
    "do_resize": True,
    "patch_size": NAFLEX_PATCH_SIZE,
    "max_num_patches": NAFLEX_MAX_NUM_PATCHES,
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "Siglip2ImageProcessor",
}
TINY_NAFLEX_VISION = {**{k: v for k, v in TINY_VISION.items() if k != "image_size"}, "num_patches": 256}
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


def build_so400m_naflex_random(*, seed: int = 0, device: str | torch.device = "cpu") -> torch.nn.Module:
    """so400m-patch16-naflex's vision tower (SigLIP 2 NaFlex) with seeded random weights, built on `device`."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    device = torch.device(device)
    with _seeded(seed, device), device:
        return Siglip2VisionModel(Siglip2VisionConfig(**SO400M_NAFLEX_VISION)).eval()


def save_tiny_siglip2(directory: str | Path, *, naflex: bool = True, seed: int = 0) -> Path:
    """A tiny SigLIP 2 checkpoint with random weights and a Gemma-style tokenizer: NaFlex (a Siglip2Model with
    Siglip2ImageProcessor's config) or fixed resolution (a SiglipModel at 384 px, as the FixRes hub checkpoints)."""
    from transformers import Siglip2Config, Siglip2Model, SiglipConfig, SiglipModel

    directory = Path(directory)
    with _seeded(seed):
        if naflex:
            model = Siglip2Model(Siglip2Config(vision_config=TINY_NAFLEX_VISION, text_config=TINY_TEXT)).eval()
        else:
            model = SiglipModel(SiglipConfig(vision_config=TINY_VISION, text_config=TINY_TEXT)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(TINY_LOGIT_SCALE)
        model.logit_bias.fill_(TINY_LOGIT_BIAS)
    model.save_pretrained(directory)
    preprocessor = NAFLEX_PREPROCESSOR if naflex else SO400M_PREPROCESSOR
    (directory / PREPROCESSOR_CONFIG).write_text(json.dumps(preprocessor, indent=2))
    tiny_gemma_tokenizer().save_pretrained(directory)
    return directory


def tiny_gemma_tokenizer():
    """A GemmaTokenizer (byte-fallback BPE, Gemma's special ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4) of
    at most TINY_TEXT's vocabulary, trained on `tiny_corpus()`: deterministic."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Gemma's own pre-processing: spaces become '▁' and stay with the word before them.
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    bpe.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    bpe.train_from_iterator(tiny_corpus(), trainers.BpeTrainer(
        vocab_size=TINY_TEXT["vocab_size"], special_tokens=specials, show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    return GemmaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                          model_max_length=TINY_MAX_LENGTH)


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
