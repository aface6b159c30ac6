"""Names shared by the Triton model repository (`serving/*/config.pbtxt`), its clients and the tests.

`tests/test_serving.py` checks that every `config.pbtxt` agrees with these constants.
"""

from __future__ import annotations

SIGLIP = "siglip"
EMBED_IMAGE = "embed_image"
MODELS = (SIGLIP, EMBED_IMAGE)

# siglip: FP32 [B, 3, 384, 384] preprocessed pixel values -> FP32 [B, D].
PIXEL_VALUES = "PIXEL_VALUES"
# embed_image: BYTES [B, 1], one encoded image file (JPEG, PNG, ...) per row -> FP32 [B, D].
IMAGE = "IMAGE"
# Both models' single output (clients read outputs[0]).
EMBEDDING = "EMBEDDING"

# config.pbtxt `parameters` keys, filled in by `python -m pipelines.serve`.
PARAM_MODEL = "name_or_path"
PARAM_REVISION = "revision"
PARAM_DTYPE = "dtype"
PARAM_DEVICE = "device"
PARAM_THREADS = "num_threads"
# embed_image: the largest image (width x height, from its header) it decodes; larger files get a 400.
PARAM_MAX_PIXELS = "max_pixels"
