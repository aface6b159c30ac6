"""The SigLIP vision encoder and its preprocessing, loaded from one checkpoint.

Knows nothing of files, Parquet or Triton: the embed job, the serving models and the tests all call
`load_encoder` / `Preprocess` the same way.

Two kinds of checkpoint, told apart by their config.json: SigLIP (and SigLIP 2's fixed-resolution checkpoints,
also SiglipModels), preprocessed by `Preprocess` into uint8 [3, H, W]; and SigLIP 2 NaFlex (Siglip2Model), by
`NaFlexPreprocess` into a dict of fixed-shape tensors (the image at its own aspect ratio cut into at most
max_num_patches patches, padded, with its mask and patch grid). Both have `resize` (CPU workers) and `normalize`
(the device); `Encoder.embed_uint8` takes what `resize` gives, stacked.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import pipelines
from pipelines.devices import resolve_device
from pipelines.errors import UserError
from pipelines.hub import (  # WeightsUnavailableError: the error of this module's loaders
    PRESETS,
    SIGLIP2,
    SO400M_NAFLEX_RANDOM,
    SO400M_RANDOM,
    TINY,
    WeightsUnavailableError,
    check_model,
    model_kind,
    read_preprocessor_config,
    unavailable,
)
from pipelines.presets import (
    NAFLEX_PREPROCESSOR,
    SO400M_NAFLEX_VISION,
    SO400M_PREPROCESSOR,
    SO400M_VISION,
    TINY_VISION,
    build_so400m_naflex_random,
    build_so400m_random,
    build_tiny,
)

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
        return _affine(self)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [3, h, w] -> float32 [3, H, W]: equal to `SiglipImageProcessor` on the same RGB pixels."""
        return self.normalize(self.resize(image).unsqueeze(0))[0]


def _affine(p: Preprocess | NaFlexPreprocess) -> tuple[list[float], list[float]]:
    """Per-channel (scale, shift) with pixel * scale + shift == ((pixel * rescale) - mean) / std."""
    rescale = p.rescale_factor if p.do_rescale else 1.0
    if not p.do_normalize:
        return [rescale] * 3, [0.0] * 3
    return [rescale / s for s in p.std], [-m / s for m, s in zip(p.mean, p.std)]


NAFLEX_PROCESSOR = "Siglip2ImageProcessor"
# The keys of what NaFlexPreprocess.resize returns, in the order the data path stacks them (rows: the first).
PIXEL_VALUES, PIXEL_ATTENTION_MASK, SPATIAL_SHAPES = "pixel_values", "pixel_attention_mask", "spatial_shapes"


def naflex_size(height: int, width: int, *, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """The (H, W) `Siglip2ImageProcessor` resizes an h x w image to: whole patches, at most max_num_patches of them,
    the aspect ratio kept as closely as that allows."""
    def side(scale: float, n: int) -> int:
        return max(patch_size, math.ceil(n * scale / patch_size) * patch_size)

    # The processor bisects the scale over [1e-6, 100] down to a width of 1e-5 and keeps the lower end; the same
    # search gives the same sizes, where a closed form would differ on images whose rounding to whole patches ties.
    low, high = 1e-6, 100.0
    while high - low >= 1e-5:
        mid = (low + high) / 2
        fits = (side(mid, height) // patch_size) * (side(mid, width) // patch_size) <= max_num_patches
        low, high = (mid, high) if fits else (low, mid)
    return side(low, height), side(low, width)


@dataclass(frozen=True)
class NaFlexPreprocess:
    """`Siglip2ImageProcessor` (SigLIP 2 NaFlex) as two tensor stages: `resize` (uint8 patches at the image's own
    aspect ratio, padded to max_num_patches; CPU workers) then `normalize` (the device)."""

    patch_size: int = 16
    max_num_patches: int = 256
    resample: int = 2
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NaFlexPreprocess:
        """Build from a NaFlex `preprocessor_config.json` dict (keys and defaults as transformers reads them)."""
        resample = int(config.get("resample", 2))
        if resample not in _RESAMPLE:
            raise UserError(f"preprocessor resample={resample}: not a PIL resampling code")
        if not config.get("do_resize", True):
            raise UserError("preprocessor do_resize=false: a NaFlex checkpoint resizes every image to whole patches")
        patch, most = int(config.get("patch_size", 16)), int(config.get("max_num_patches", 256))
        if patch < 1 or most < 1:
            raise UserError(f"preprocessor patch_size={patch}, max_num_patches={most}: expected positive numbers")
        return cls(patch_size=patch, max_num_patches=most, resample=resample,
                   do_rescale=bool(config.get("do_rescale", True)),
                   rescale_factor=float(config.get("rescale_factor", 1 / 255)),
                   do_normalize=bool(config.get("do_normalize", True)),
                   mean=tuple(float(m) for m in config.get("image_mean", (0.5, 0.5, 0.5))),
                   std=tuple(float(s) for s in config.get("image_std", (0.5, 0.5, 0.5))))

    def to_config(self) -> dict[str, Any]:
        """The `preprocessor_config.json` dict that `from_config` reads back to an equal object."""
        return {"do_resize": True, "patch_size": self.patch_size, "max_num_patches": self.max_num_patches,
                "resample": self.resample, "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
                "do_normalize": self.do_normalize, "image_mean": list(self.mean), "image_std": list(self.std),
                "image_processor_type": NAFLEX_PROCESSOR}

    def resize(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 [3, h, w] (or [B, 3, h, w] of one size) -> {pixel_values: uint8 [(B,) N, p*p*3] patches (row-major,
        each patch's pixels row-major with the channels last), pixel_attention_mask: int32 [(B,) N] (1 = a patch,
        0 = padding), spatial_shapes: int64 [(B,) 2] (patch rows, columns)}, N = max_num_patches."""
        batch = image if image.dim() == 4 else image.unsqueeze(0)
        p, most = self.patch_size, self.max_num_patches
        height, width = naflex_size(batch.shape[-2], batch.shape[-1], patch_size=p, max_num_patches=most)
        batch = TF.resize(batch, [height, width], interpolation=_RESAMPLE[self.resample], antialias=True)
        rows, cols = height // p, width // p
        patches = batch.reshape(len(batch), 3, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1)
        pixels = batch.new_zeros((len(batch), most, p * p * 3))
        pixels[:, : rows * cols] = patches.reshape(len(batch), rows * cols, p * p * 3)
        mask = torch.zeros((len(batch), most), dtype=torch.int32)
        mask[:, : rows * cols] = 1
        shapes = torch.tensor([[rows, cols]] * len(batch), dtype=torch.int64)
        out = {PIXEL_VALUES: pixels, PIXEL_ATTENTION_MASK: mask, SPATIAL_SHAPES: shapes}
        return out if image.dim() == 4 else {key: value[0] for key, value in out.items()}

    def normalize(self, images: dict[str, torch.Tensor], *,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """`resize`'s dict stacked to [B, ...] on any device -> the same dict with `dtype` pixel values, padding 0."""
        x = images[PIXEL_VALUES].to(torch.float32, copy=True)
        scale, shift = _affine(self)
        # The channel is the fastest-varying position of a patch's p*p*3 values.
        x.mul_(torch.tensor(scale, device=x.device).repeat(self.patch_size ** 2))
        x.add_(torch.tensor(shift, device=x.device).repeat(self.patch_size ** 2))
        mask = images[PIXEL_ATTENTION_MASK]
        x.mul_(mask.unsqueeze(-1).to(x.dtype))  # the processor pads after normalising: padding is 0, not -1
        return {PIXEL_VALUES: x.to(dtype), PIXEL_ATTENTION_MASK: mask, SPATIAL_SHAPES: images[SPATIAL_SHAPES]}

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 [3, h, w] -> the dict of `resize` with float32 pixel values: equal to `Siglip2ImageProcessor`."""
        return {key: value[0] for key, value in self.normalize(self.resize(image.unsqueeze(0))).items()}


AnyPreprocess = Preprocess | NaFlexPreprocess
# What `resize` gives (per image, or stacked): a uint8 tensor (SigLIP) or NaFlex's dict of tensors.
Pixels = torch.Tensor | dict[str, torch.Tensor]


def stack_pixels(items: list[Pixels]) -> Pixels:
    """`resize`'s per-image outputs -> one batch: uint8 [B, 3, H, W], or each key of NaFlex's dict stacked."""
    if isinstance(items[0], dict):
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}
    return torch.stack(items)


def cat_pixels(batches: list[Pixels]) -> Pixels:
    """Batches ([b_k, ...] tensors, or NaFlex dicts of them) -> one [sum b_k, ...] batch."""
    if isinstance(batches[0], dict):
        return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
    return torch.cat(batches)


def preprocess_from_config(kind: str, config: dict[str, Any]) -> AnyPreprocess:
    """A checkpoint's preprocessing from its preprocessor config: NaFlex for 'siglip2', else SigLIP's."""
    return NaFlexPreprocess.from_config(config) if kind == SIGLIP2 else Preprocess.from_config(config)


@dataclass
class Encoder:
    """A loaded SigLIP (or SigLIP 2 NaFlex) vision tower with its preprocessing and what a reader needs to know."""

    model: torch.nn.Module
    preprocess: AnyPreprocess
    name_or_path: str
    revision: str | None
    device: torch.device
    dtype: torch.dtype
    embedding_dim: int = field(init=False)
    # Set by `compile`: every forward pass then has this batch size (smaller batches are padded).
    compiled_batch: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.embedding_dim = int(self.model.config.hidden_size)

    def compile(self, *, batch_size: int, mode: str | None = None, backend: str = "inductor") -> Encoder:
        """Compile the model for one input shape, [batch_size, 3, H, W] (NaFlex: [batch_size, N, p*p*3]).

        A job's last batch is usually smaller: it is padded to `batch_size`, so nothing recompiles. Returns self.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        self.model.compile(backend=backend, mode=mode, dynamic=False)
        self.compiled_batch = batch_size
        log.info("compiling %s for batches of %d (%s, mode %s)", self.name_or_path, batch_size, backend, mode)
        return self

    @torch.inference_mode()
    def embed(self, pixel_values: Pixels) -> torch.Tensor:
        """float [B, 3, H, W] pixel values (NaFlex: `normalize`'s dict) -> float32 [B, D] pooled embeddings, on the
        encoder's device."""
        inputs = _moved(pixel_values, self.device, self.dtype)
        if self.compiled_batch is None:
            return self._forward(inputs)
        size = self.compiled_batch
        chunks = [self._forward(_pad_batch(chunk, size))[: _rows(chunk)] for chunk in _chunks(inputs, size)]
        return torch.cat(chunks) if len(chunks) != 1 else chunks[0]

    def _forward(self, inputs: Pixels) -> torch.Tensor:
        if isinstance(inputs, dict):
            return self.model(**inputs).pooler_output.float()
        return self.model(pixel_values=inputs).pooler_output.float()

    @torch.inference_mode()
    def embed_uint8(self, images: Pixels) -> torch.Tensor:
        """`resize`'s output stacked (uint8 [B, 3, H, W], or NaFlex's dict of [B, ...]) -> float32 [B, D];
        normalisation runs on the device."""
        images = _moved(images, self.device, None)
        return self.embed(self.preprocess.normalize(images, dtype=self.dtype))

    def metadata(self) -> dict[str, Any]:
        """What the Parquet footer records about the model (JSON-serialisable)."""
        return _metadata(self.name_or_path, self.revision, self.embedding_dim, self.dtype, self.preprocess)


def _moved(x: Pixels, device: torch.device, dtype: torch.dtype | None) -> Pixels:
    """A tensor, or each tensor of a dict, on `device`; floating pixel values (only) as `dtype` when given."""
    def move(t: torch.Tensor) -> torch.Tensor:
        cast = dtype if dtype is not None and t.is_floating_point() else None
        return t.to(device, cast, non_blocking=True)

    return {key: move(value) for key, value in x.items()} if isinstance(x, dict) else move(x)


def _rows(x: Pixels) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _chunks(x: Pixels, size: int) -> list[Pixels]:
    """[B, ...] (or a dict of them) -> consecutive pieces of at most `size` rows."""
    if not isinstance(x, dict):
        return list(x.split(size))
    return [{key: value[i:i + size] for key, value in x.items()} for i in range(0, _rows(x), size)]


def _pad_batch(x: Pixels, size: int) -> Pixels:
    """[b, ...] -> [size, ...] (b <= size): zero rows appended; a NaFlex dict repeats its first row instead, as a
    row of zeros (no patches, an empty grid) is not an input the model accepts."""
    if _rows(x) == size:
        return x
    if isinstance(x, dict):
        return {key: torch.cat([value, value[:1].expand(size - len(value), *value.shape[1:])])
                for key, value in x.items()}
    return torch.cat([x, x.new_zeros((size - len(x), *x.shape[1:]))])


def _metadata(name_or_path: str, revision: str | None, embedding_dim: int, dtype: torch.dtype,
              preprocess: AnyPreprocess) -> dict[str, Any]:
    return {
        "model": name_or_path,
        "revision": revision,
        "embedding_dim": embedding_dim,
        "dtype": str(dtype).removeprefix("torch."),
        # NaFlex keeps each image's aspect ratio: no one size (its patch budget is in `preprocess`).
        "image_size": [preprocess.height, preprocess.width] if isinstance(preprocess, Preprocess) else None,
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

    def preprocess(self) -> AnyPreprocess:
        """The checkpoint's preprocessing alone (see `load_preprocess`)."""
        return load_preprocess(self.name_or_path, revision=self.revision)

    def metadata(self) -> dict[str, Any]:
        """Exactly `self.load().metadata()` on this host, without loading the weights."""
        dtype = resolve_dtype(self.dtype, resolve_device(self.device))
        if self.name_or_path in PRESETS:
            preprocess, revision, dim = _PRESETS[self.name_or_path][1], None, _PRESETS[self.name_or_path][2]
        else:
            config, preprocess, revision = _read_checkpoint_config(self.name_or_path, self.revision)
            dim = int(config.hidden_size)
        return _metadata(self.name_or_path, revision, dim, dtype, preprocess)


# Each preset's builder, preprocessing and embedding size.
_PRESETS: dict[str, tuple[Any, AnyPreprocess, int]] = {
    TINY: (lambda device: build_tiny(), Preprocess.from_config(SO400M_PREPROCESSOR), TINY_VISION["hidden_size"]),
    SO400M_RANDOM: (build_so400m_random, Preprocess.from_config(SO400M_PREPROCESSOR), SO400M_VISION["hidden_size"]),
    SO400M_NAFLEX_RANDOM: (build_so400m_naflex_random, NaFlexPreprocess.from_config(NAFLEX_PREPROCESSOR),
                           SO400M_NAFLEX_VISION["hidden_size"]),
}


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
    """Load the vision tower and its preprocessing from a hub id, a local directory or a preset ('tiny',
    'so400m-random', 'so400m-naflex-random'); SigLIP or SigLIP 2 NaFlex, as its config.json says."""
    device = resolve_device(device) if isinstance(device, str) else device
    torch_dtype = resolve_dtype(dtype, device)
    if name_or_path in PRESETS:
        build, preprocess, _ = _PRESETS[name_or_path]
        model, revision = build(device=device), None
    else:
        model, preprocess, revision = _load_checkpoint(name_or_path, revision, attn_implementation)
    model = model.to(device=device, dtype=torch_dtype).eval().requires_grad_(False)
    log.info("loaded %s (revision %s) on %s as %s", name_or_path, revision, device, torch_dtype)
    return Encoder(model, preprocess, name_or_path, revision, device, torch_dtype)


def load_preprocess(name_or_path: str, *, revision: str | None = None) -> AnyPreprocess:
    """The checkpoint's preprocessing alone (no weights): a preset, a local directory or a hub id."""
    if name_or_path in PRESETS:
        return _PRESETS[name_or_path][1]
    offline = check_model(name_or_path, revision)
    kind = model_kind(name_or_path, revision, offline)
    return preprocess_from_config(kind, read_preprocessor_config(name_or_path, revision, offline)[0])


def _read_checkpoint_config(name_or_path: str, revision: str | None) -> tuple[Any, AnyPreprocess, str | None]:
    """The vision tower's config, the preprocessing and the commit, as `_load_checkpoint` finds them."""
    offline = check_model(name_or_path, revision)
    kind = model_kind(name_or_path, revision, offline)
    config, snapshot = read_preprocessor_config(name_or_path, revision, offline)
    preprocess = preprocess_from_config(kind, config)
    from transformers import Siglip2VisionConfig, SiglipVisionConfig

    try:  # a full model's config gives its vision_config, as the vision model's from_pretrained reads it
        vision = (Siglip2VisionConfig if kind == SIGLIP2 else SiglipVisionConfig).from_pretrained(
            name_or_path, revision=revision, local_files_only=offline is not None)
    except (OSError, ValueError) as exc:
        raise WeightsUnavailableError(unavailable(name_or_path, exc, offline)) from exc
    return vision, preprocess, getattr(vision, "_commit_hash", None) or snapshot or revision


def _load_checkpoint(
    name_or_path: str, revision: str | None, attn_implementation: str
) -> tuple[torch.nn.Module, AnyPreprocess, str | None]:
    offline = check_model(name_or_path, revision)
    kind = model_kind(name_or_path, revision, offline)
    config, snapshot = read_preprocessor_config(name_or_path, revision, offline)
    preprocess = preprocess_from_config(kind, config)
    # transformers' model classes take seconds to import: only once the checkpoint is known to be there.
    from transformers import Siglip2VisionModel, SiglipVisionModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # A full checkpoint carries the text tower too; its weights are skipped on purpose.
    hf_logging.set_verbosity_error()
    try:
        model = (Siglip2VisionModel if kind == SIGLIP2 else SiglipVisionModel).from_pretrained(
            name_or_path, revision=revision, attn_implementation=attn_implementation,
            local_files_only=offline is not None,
        )
    except (OSError, ValueError) as exc:
        raise WeightsUnavailableError(unavailable(name_or_path, exc, offline)) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if isinstance(preprocess, NaFlexPreprocess) and preprocess.patch_size != model.config.patch_size:
        raise UserError(f"{name_or_path}: its preprocessor cuts {preprocess.patch_size}-pixel patches, its model "
                        f"takes {model.config.patch_size}-pixel ones")
    commit = getattr(model.config, "_commit_hash", None) or snapshot or revision
    return model, preprocess, commit
