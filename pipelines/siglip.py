"""The SigLIP vision encoder and its preprocessing, loaded from one checkpoint.

Knows nothing of files, Parquet or Triton: the embed job, the serving models and the tests all call
`load_encoder` / `Preprocess` the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import pipelines
from pipelines.devices import resolve_device
from pipelines.errors import UserError
from pipelines.hub import (  # WeightsUnavailableError: the error of this module's loaders
    SO400M_RANDOM,
    TINY,
    WeightsUnavailableError,
    check_model,
    read_preprocessor_config,
    unavailable,
)
from pipelines.presets import SO400M_PREPROCESSOR, SO400M_VISION, TINY_VISION, build_so400m_random, build_tiny

log = logging.getLogger(__name__)

DEFAULT_MODEL = "google/siglip-so400m-patch14-384"

# PIL resample codes as they appear in preprocessor_config.json.
_RESAMPLE = {
    0: InterpolationMode.NEAREST,
    1: InterpolationMode.LANCZOS,
    2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC,
    4: InterpolationMode.BOX,
    5: InterpolationMode.HAMMING,
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

@dataclass(frozen=True)
class Preprocess:
    """`SiglipImageProcessor` as two tensor stages: `resize` (uint8, on CPU workers) then `normalize` (device)."""

    height: int = 384
    width: int = 384
    resample: int = 3
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Preprocess:
        """Build from a `preprocessor_config.json` dict (keys and defaults as transformers reads them)."""
        size = config.get("size", {"height": 384, "width": 384})
        if "height" not in size:
            raise UserError(f"preprocessor size {size!r}: expected {{'height': H, 'width': W}}")
        resample = int(config.get("resample", 3))
        if resample not in _RESAMPLE:
            raise UserError(f"preprocessor resample={resample}: not a PIL resampling code")
        return cls(
            height=int(size["height"]),
            width=int(size["width"]),
            resample=resample,
            do_resize=bool(config.get("do_resize", True)),
            do_rescale=bool(config.get("do_rescale", True)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            do_normalize=bool(config.get("do_normalize", True)),
            mean=tuple(float(m) for m in config.get("image_mean", (0.5, 0.5, 0.5))),
            std=tuple(float(s) for s in config.get("image_std", (0.5, 0.5, 0.5))),
        )

    def to_config(self) -> dict[str, Any]:
        """The `preprocessor_config.json` dict that `from_config` reads back to an equal object."""
        return {
            "do_resize": self.do_resize,
            "size": {"height": self.height, "width": self.width},
            "resample": self.resample,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "image_processor_type": "SiglipImageProcessor",
        }

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [3, h, w] (or [B, 3, h, w]) -> uint8 [..., 3, H, W], antialiased as the processor does."""
        if not self.do_resize:
            return image
        return TF.resize(
            image, [self.height, self.width], interpolation=_RESAMPLE[self.resample], antialias=True
        )

    def normalize(self, images: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 [B, 3, H, W] on any device -> `dtype` [B, 3, H, W] pixel values on that device."""
        # One new contiguous float32 tensor, scaled and shifted in place: decoded images are channels-last,
        # and separate rescale / subtract / divide passes over them cost 10x more on CPU.
        x = images.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        scale, shift = self._affine()
        if len(set(scale)) == 1 and len(set(shift)) == 1:
            return x.mul_(scale[0]).add_(shift[0]).to(dtype)
        scale_t = torch.tensor(scale, device=x.device).view(-1, 1, 1)
        shift_t = torch.tensor(shift, device=x.device).view(-1, 1, 1)
        return x.mul_(scale_t).add_(shift_t).to(dtype)

    def _affine(self) -> tuple[list[float], list[float]]:
        """Per-channel (scale, shift) with pixel * scale + shift == ((pixel * rescale) - mean) / std."""
        rescale = self.rescale_factor if self.do_rescale else 1.0
        if not self.do_normalize:
            return [rescale] * 3, [0.0] * 3
        return [rescale / s for s in self.std], [-m / s for m, s in zip(self.mean, self.std)]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [3, h, w] -> float32 [3, H, W]: equal to `SiglipImageProcessor` on the same RGB pixels."""
        return self.normalize(self.resize(image).unsqueeze(0))[0]


@dataclass
class Encoder:
    """A loaded SigLIP vision tower with its preprocessing and what a reader needs to know about it."""

    model: torch.nn.Module
    preprocess: Preprocess
    name_or_path: str
    revision: str | None
    device: torch.device
    dtype: torch.dtype
    embedding_dim: int = field(init=False)
    # Set by `compile`: every forward pass then has this batch size (smaller batches are zero-padded).
    compiled_batch: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.embedding_dim = int(self.model.config.hidden_size)

    def compile(self, *, batch_size: int, mode: str | None = None, backend: str = "inductor") -> Encoder:
        """Compile the model for one input shape, [batch_size, 3, H, W]; returns self.

        A job's last batch is usually smaller: it is padded to `batch_size`, so nothing recompiles.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        self.model.compile(backend=backend, mode=mode, dynamic=False)
        self.compiled_batch = batch_size
        log.info("compiling %s for batches of %d (%s, mode %s)", self.name_or_path, batch_size, backend, mode)
        return self

    @torch.inference_mode()
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] pixel values -> float32 [B, D] pooled embeddings, on the encoder's device."""
        pixel_values = pixel_values.to(self.device, self.dtype, non_blocking=True)
        if self.compiled_batch is None:
            return self._forward(pixel_values)
        size = self.compiled_batch
        chunks = [self._forward(_pad_batch(chunk, size))[: len(chunk)] for chunk in pixel_values.split(size)]
        return torch.cat(chunks) if len(chunks) != 1 else chunks[0]

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output.float()

    @torch.inference_mode()
    def embed_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] resized images -> float32 [B, D]; normalisation runs on the device."""
        images = images.to(self.device, non_blocking=True)
        return self.embed(self.preprocess.normalize(images, dtype=self.dtype))

    def metadata(self) -> dict[str, Any]:
        """What the Parquet footer records about the model (JSON-serialisable)."""
        return _metadata(self.name_or_path, self.revision, self.embedding_dim, self.dtype, self.preprocess)


def _metadata(name_or_path: str, revision: str | None, embedding_dim: int, dtype: torch.dtype,
              preprocess: Preprocess) -> dict[str, Any]:
    return {
        "model": name_or_path,
        "revision": revision,
        "embedding_dim": embedding_dim,
        "dtype": str(dtype).removeprefix("torch."),
        "image_size": [preprocess.height, preprocess.width],
        "preprocess": preprocess.to_config(),
        "version": pipelines.__version__,
    }


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoder to load, where and how: what a runner hands its workers instead of a loaded model.

    Small and picklable; `load` gives the encoder, `metadata` what its `Encoder.metadata()` will say, read from
    the checkpoint's config files alone (no weights), so a job can check or write it before any model loads.
    """

    name_or_path: str
    revision: str | None
    device: str  # 'auto', 'cpu', 'cuda', 'cuda:1', as the setting says
    dtype: str  # 'auto', 'float32', 'bfloat16', 'float16'

    def load(self) -> Encoder:
        """The encoder itself, loaded on this host's `device` (see `load_encoder`)."""
        return load_encoder(self.name_or_path, device=self.device, dtype=self.dtype, revision=self.revision)

    def preprocess(self) -> Preprocess:
        """The checkpoint's preprocessing alone (see `load_preprocess`)."""
        return load_preprocess(self.name_or_path, revision=self.revision)

    def metadata(self) -> dict[str, Any]:
        """Exactly `self.load().metadata()` on this host, without loading the weights."""
        dtype = resolve_dtype(self.dtype, resolve_device(self.device))
        if self.name_or_path in (TINY, SO400M_RANDOM):
            vision = TINY_VISION if self.name_or_path == TINY else SO400M_VISION
            preprocess, revision, dim = Preprocess.from_config(SO400M_PREPROCESSOR), None, vision["hidden_size"]
        else:
            config, preprocess, revision = _read_checkpoint_config(self.name_or_path, self.revision)
            dim = int(config.hidden_size)
        return _metadata(self.name_or_path, revision, dim, dtype, preprocess)


def _pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """[b, ...] -> [size, ...] with zero rows appended (b <= size)."""
    if len(x) == size:
        return x
    return torch.cat([x, x.new_zeros((size - len(x), *x.shape[1:]))])


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 elsewhere; else one of float32 / bfloat16 / float16."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise UserError(f"dtype={dtype!r}: expected one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_encoder(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    attn_implementation: str = "sdpa",
) -> Encoder:
    """Load the vision tower and its preprocessing from a hub id, a local directory, 'tiny' or 'so400m-random'."""
    device = resolve_device(device) if isinstance(device, str) else device
    torch_dtype = resolve_dtype(dtype, device)
    if name_or_path in (TINY, SO400M_RANDOM):
        model = build_tiny() if name_or_path == TINY else build_so400m_random(device=device)
        preprocess, revision = Preprocess.from_config(SO400M_PREPROCESSOR), None
    else:
        model, preprocess, revision = _load_checkpoint(name_or_path, revision, attn_implementation)
    model = model.to(device=device, dtype=torch_dtype).eval().requires_grad_(False)
    log.info("loaded %s (revision %s) on %s as %s", name_or_path, revision, device, torch_dtype)
    return Encoder(model, preprocess, name_or_path, revision, device, torch_dtype)


def load_preprocess(name_or_path: str, *, revision: str | None = None) -> Preprocess:
    """The checkpoint's preprocessing alone (no weights): a preset, a local directory or a hub id."""
    if name_or_path in (TINY, SO400M_RANDOM):
        return Preprocess.from_config(SO400M_PREPROCESSOR)
    offline = check_model(name_or_path, revision)
    return Preprocess.from_config(read_preprocessor_config(name_or_path, revision, offline)[0])


def _read_checkpoint_config(name_or_path: str, revision: str | None) -> tuple[Any, Preprocess, str | None]:
    """The vision tower's config, the preprocessing and the commit, as `_load_checkpoint` finds them."""
    offline = check_model(name_or_path, revision)
    config, snapshot = read_preprocessor_config(name_or_path, revision, offline)
    preprocess = Preprocess.from_config(config)
    from transformers import SiglipVisionConfig

    try:  # a full SiglipModel config gives its vision_config, as SiglipVisionModel.from_pretrained reads it
        vision = SiglipVisionConfig.from_pretrained(name_or_path, revision=revision,
                                                    local_files_only=offline is not None)
    except (OSError, ValueError) as exc:
        raise WeightsUnavailableError(unavailable(name_or_path, exc, offline)) from exc
    return vision, preprocess, getattr(vision, "_commit_hash", None) or snapshot or revision


def _load_checkpoint(
    name_or_path: str, revision: str | None, attn_implementation: str
) -> tuple[torch.nn.Module, Preprocess, str | None]:
    offline = check_model(name_or_path, revision)
    config, snapshot = read_preprocessor_config(name_or_path, revision, offline)
    preprocess = Preprocess.from_config(config)
    # transformers' model classes take seconds to import: only once the checkpoint is known to be there.
    from transformers import SiglipVisionModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # A full SiglipModel checkpoint carries the text tower too; its weights are skipped on purpose.
    hf_logging.set_verbosity_error()
    try:
        model = SiglipVisionModel.from_pretrained(
            name_or_path, revision=revision, attn_implementation=attn_implementation,
            local_files_only=offline is not None,
        )
    except (OSError, ValueError) as exc:
        raise WeightsUnavailableError(unavailable(name_or_path, exc, offline)) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    commit = getattr(model.config, "_commit_hash", None) or snapshot or revision
    return model, preprocess, commit
