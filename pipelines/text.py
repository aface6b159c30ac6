"""SigLIP's text tower and its tokenizer, loaded from the same full checkpoint as the vision encoder (a SiglipModel,
SigLIP 2's fixed-resolution ones included, or a SigLIP 2 NaFlex Siglip2Model).

Knows nothing of files, Parquet or Triton: zero-shot classification, search, the `embed_text` serving model and the
tests all call `load_text_encoder` and `TextEncoder.embed` the same way.

Tokenization is the checkpoint's own SiglipTokenizer, called as SiglipProcessor is for this model: lower-cased and
stripped of punctuation by the tokenizer, padded with `padding="max_length"` to the model's length (64 tokens for
so400m; SigLIP was trained so, and shorter padding silently lowers accuracy), and truncated there: a longer text
keeps its first max_length - 1 tokens and its end-of-sequence token. The model sees the token ids alone, without an
attention mask: as SigLIP was trained, the pooled last position attends to the padding too.

SigLIP 2 (either kind) comes with Gemma's tokenizer, whose own default pads on the left; it was trained on lower-cased
text padded on the right to 64 tokens, so its texts are lower-cased here and every tokenizer pads on the right
(special tokens, such as an end-of-sequence one, are as the checkpoint's tokenizer adds them).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import pipelines
from pipelines.devices import resolve_device
from pipelines.errors import UserError
from pipelines.hub import PRESETS, TINY, WeightsUnavailableError, check_model, model_kind, unavailable
from pipelines.siglip import resolve_dtype

log = logging.getLogger(__name__)

# The full models (vision and text towers) by config.json's model_type.
FULL_MODEL_TYPES = ("siglip", "siglip2")


class TextTowerMissingError(UserError):
    """The checkpoint has no text tower (a SiglipVisionModel, the so400m-random preset); one line naming it."""


class TextInputError(UserError):
    """Text rows that cannot be embedded (not a string, empty, not UTF-8); the message names each row and why."""

    def __init__(self, message: str, rows: tuple[int, ...]) -> None:
        super().__init__(message)
        self.rows = rows


def check_text(text: Any, row: int) -> str:
    """`text` if it is a non-empty str, else TextInputError naming `row`."""
    if not isinstance(text, str):
        raise _bad_row(row, f"expected a string, got {type(text).__name__}")
    if not text.strip():
        raise _bad_row(row, "empty text (nothing to embed)")
    return text


def decode_text(data: bytes, row: int) -> str:
    """UTF-8 bytes (a Triton BYTES element) -> the checked text; invalid UTF-8 is a TextInputError naming `row`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad_row(row, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    return check_text(text, row)


def decode_texts(blobs: Sequence[bytes]) -> list[str]:
    """One request's BYTES rows -> its texts; a TextInputError naming every bad row (`; `-separated) otherwise."""
    texts, errors = [], []
    for row, blob in enumerate(blobs):
        try:
            texts.append(decode_text(bytes(blob), row))
        except TextInputError as exc:
            errors.append(exc)
    if errors:
        raise TextInputError("; ".join(map(str, errors)), tuple(row for e in errors for row in e.rows))
    return texts


def _bad_row(row: int, why: str) -> TextInputError:
    return TextInputError(f"text row {row}: {why}", (row,))


@dataclass
class TextEncoder:
    """A loaded SigLIP text tower with its tokenizer, length and the model's logit scale and bias."""

    model: torch.nn.Module
    tokenizer: Any
    name_or_path: str
    revision: str | None
    device: torch.device
    dtype: torch.dtype
    max_length: int
    # As SiglipModel uses them: logits = exp(logit_scale) * cosine + logit_bias; probability = sigmoid(logits).
    logit_scale: float
    logit_bias: float
    # SigLIP 2's texts are lower-cased before tokenizing, as it was trained (SigLIP's tokenizer does its own).
    lowercase: bool = False
    embedding_dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.embedding_dim = int(self.model.config.projection_size)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """list of n texts -> int64 [n, max_length] token ids, padded and truncated as described in the module."""
        texts = [check_text(text, row) for row, text in enumerate(texts)]
        if not texts:
            return torch.zeros((0, self.max_length), dtype=torch.int64)
        if self.lowercase:
            texts = [text.lower() for text in texts]
        return self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                              padding_side="right", return_attention_mask=False, return_tensors="pt")["input_ids"]

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """list of n texts -> float32 [n, D] pooled text embeddings (`get_text_features`), on the encoder's device."""
        return self.embed_ids(self.tokenize(texts))

    @torch.inference_mode()
    def embed_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """int64 [n, max_length] token ids -> float32 [n, D] pooled text embeddings."""
        if len(input_ids) == 0:
            return torch.zeros((0, self.embedding_dim), dtype=torch.float32, device=self.device)
        return self.model(input_ids=input_ids.to(self.device)).pooler_output.float()

    def logits(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """float [m, D] image and [n, D] text embeddings -> float32 [m, n] logits, SiglipModel's logits_per_image."""
        images = torch.nn.functional.normalize(image_embeddings.float(), dim=-1)
        texts = torch.nn.functional.normalize(text_embeddings.float().to(images.device), dim=-1)
        return images @ texts.T * torch.tensor(self.logit_scale).exp() + self.logit_bias

    def metadata(self) -> dict[str, Any]:
        """What an output records about the text model (JSON-serialisable)."""
        return {
            "model": self.name_or_path,
            "revision": self.revision,
            "embedding_dim": self.embedding_dim,
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_length": self.max_length,
            "tokenizer": type(self.tokenizer).__name__,
            "lowercase": self.lowercase,
            "version": pipelines.__version__,
        }


def load_text_encoder(name_or_path: str, *, revision: str | None, device: str | torch.device,
                      dtype: str) -> TextEncoder:
    """Load the text tower, tokenizer, logit scale and bias from a full SigLIP / SigLIP 2 checkpoint or 'tiny'.

    A hub id, a local directory, or 'tiny' (saved to a temporary directory and loaded from there, so the preset takes
    the real loading path). A vision-only checkpoint raises TextTowerMissingError; one that cannot be had,
    WeightsUnavailableError (both one line).
    """
    device = resolve_device(device) if isinstance(device, str) else device
    torch_dtype = resolve_dtype(dtype, device)
    if name_or_path == TINY:
        from pipelines.presets import save_tiny

        with tempfile.TemporaryDirectory(prefix="siglip-tiny-") as directory:
            encoder = _load(save_tiny(directory, full=True).as_posix(), None, device, torch_dtype)
        encoder.name_or_path, encoder.revision = TINY, None
        return encoder
    if name_or_path in PRESETS:
        raise TextTowerMissingError(
            f"model.name_or_path={name_or_path!r} is a vision-only preset: the text side needs a full SiglipModel "
            f"checkpoint (vision and text towers with their tokenizer), e.g. model=tiny or "
            f"google/siglip-so400m-patch14-384")
    return _load(name_or_path, revision, device, torch_dtype)


def _load(name_or_path: str, revision: str | None, device: torch.device, dtype: torch.dtype) -> TextEncoder:
    offline = check_model(name_or_path, revision)
    local_only = offline is not None
    model_kind(name_or_path, revision, offline)  # another architecture (CLIP, DINOv2): one line, nothing loaded
    # transformers' model classes take seconds to import: only once the checkpoint is known to be there.
    from transformers import AutoConfig, AutoTokenizer, Siglip2Model, SiglipModel

    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise WeightsUnavailableError(unavailable(name_or_path, exc, offline)) from exc
    if config.model_type not in FULL_MODEL_TYPES:
        raise TextTowerMissingError(
            f"model.name_or_path={name_or_path!r} is a {type(config).__name__} checkpoint (model_type "
            f"{config.model_type!r}): the text side needs the full SiglipModel checkpoint (vision and text towers "
            f"with their tokenizer), as the hub ships google/siglip-so400m-patch14-384")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, local_files_only=local_only)
        model = (Siglip2Model if config.model_type == "siglip2" else SiglipModel).from_pretrained(
            name_or_path, revision=revision, local_files_only=local_only)
    except (OSError, ValueError, TypeError, ImportError) as exc:  # no spiece.model: TypeError; no sentencepiece
        raise WeightsUnavailableError(unavailable(name_or_path, exc, offline)) from exc
    text = model.text_model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    commit = getattr(config, "_commit_hash", None) or revision
    log.info("loaded the text tower of %s (revision %s) on %s as %s", name_or_path, commit, device, dtype)
    return TextEncoder(text, tokenizer, name_or_path, commit, device, dtype,
                       max_length=int(config.text_config.max_position_embeddings),
                       logit_scale=float(model.logit_scale.detach().float()),
                       logit_bias=float(model.logit_bias.detach().float()),
                       lowercase=_is_gemma(tokenizer))


def _is_gemma(tokenizer: Any) -> bool:
    """Whether this is SigLIP 2's tokenizer (Gemma's; transformers names it Siglip2Tokenizer for NaFlex)."""
    return any(name in type(tokenizer).__name__ for name in ("Gemma", "Siglip2"))
