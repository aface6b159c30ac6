"""Names shared by the Triton model repository (`serving/*/config.pbtxt`), its clients and the tests.

`tests/serve/test_models.py` checks that every `config.pbtxt` agrees with these constants.
"""

from __future__ import annotations

SIGLIP = "siglip"
EMBED_IMAGE = "embed_image"
EMBED_TEXT = "embed_text"
# The models the launcher renders, loads and watches, in this order (a model BLS calls comes before its caller).
MODELS = (
    SIGLIP,
    EMBED_IMAGE,
    EMBED_TEXT,
)

# siglip: FP32 [B, 3, 384, 384] preprocessed pixel values -> FP32 [B, D].
PIXEL_VALUES = "PIXEL_VALUES"
# siglip for a SigLIP 2 NaFlex checkpoint (the launcher renders these inputs instead): PIXEL_VALUES FP32
# [B, N, 3*p*p] patches (N = max_num_patches, p = patch_size; `NaFlexPreprocess`'s layout, normalised), their
# mask INT32 [B, N] (1 = a patch, 0 = padding) and patch grid INT64 [B, 2] (rows, columns) -> FP32 [B, D].
PIXEL_ATTENTION_MASK = "PIXEL_ATTENTION_MASK"
SPATIAL_SHAPES = "SPATIAL_SHAPES"
# NaFlex's tensors by the key `NaFlexPreprocess` gives them.
NAFLEX_INPUTS = {"pixel_values": PIXEL_VALUES, "pixel_attention_mask": PIXEL_ATTENTION_MASK,
                 "spatial_shapes": SPATIAL_SHAPES}
# embed_image: BYTES [B, 1], one encoded image file (JPEG, PNG, ...) per row -> FP32 [B, D].
IMAGE = "IMAGE"
# embed_text: BYTES [B, 1], one UTF-8 text per row -> FP32 [B, D] (SigLIP's text tower).
TEXT = "TEXT"
# Every model's single output (clients read outputs[0]).
EMBEDDING = "EMBEDDING"

# config.pbtxt `parameters` keys, filled in by `python -m pipelines.serve`.
PARAM_MODEL = "name_or_path"
PARAM_REVISION = "revision"
# siglip (a model that declares `dtype` gets dtype, num_threads and its placement from the launcher).
PARAM_DTYPE = "dtype"
PARAM_DEVICE = "device"
PARAM_THREADS = "num_threads"
# embed_image: the largest image (width x height, from its header) it decodes; larger files get a 400.
# (A model that declares `max_pixels` gets it and `decode_instances` from the launcher.)
PARAM_MAX_PIXELS = "max_pixels"
