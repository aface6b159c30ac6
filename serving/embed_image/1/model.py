"""Triton model `embed_image`: BYTES [B, 1] encoded images -> FP32 embeddings [B, D], through `siglip` (BLS).

Decoding and resizing are `pipelines.data.decode` + `Preprocess.resize`, then `Preprocess.normalize`, as in
`python -m pipelines.embed`, so a file gets the same embedding online and offline. They run in a child process
(`pipelines.isolate.IsolatedDecoder`): a file that crashes a decoder, is larger than `max_pixels` or cannot be
decoded fails its own request (400) and no other, and this process lives on.
"""

import json
import os
import sys

import torch
import triton_python_backend_utils as pb_utils

# Triton's Python backend stub ignores PYTHONPATH; honour it as any Python does, so that this model imports the
# same `pipelines` as the launcher (e.g. one installed with `pip install --target DIR`, PYTHONPATH=DIR).
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

from pipelines.isolate import IsolatedDecoder
from pipelines.serve import models, names
from pipelines.siglip import cat_pixels, load_preprocess


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        settings = models.model_settings(config, instance_kind=args["model_instance_kind"], device_id=0)
        torch.set_num_threads(settings.num_threads)
        self.preprocess = load_preprocess(settings.name_or_path, revision=settings.revision)
        self.decoder = IsolatedDecoder(self.preprocess, max_pixels=settings.max_pixels)
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests: list) -> list:
        blobs = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        # uint8 [n, 3, H, W] (NaFlex: its dict of [n, ...] tensors), or the error
        decoded = models.decode_requests(blobs, self.decoder.decode_many)
        # Every good request's images in one call of siglip; its error, if it answers one, goes to each of them.
        results = models.embed_batch(decoded, lambda good: self._siglip(cat_pixels(good)),
                                     good=lambda d: not isinstance(d, Exception))
        return models.responses(pb_utils, self.output_name, results)

    def finalize(self) -> None:
        self.decoder.close()

    def _siglip(self, images):
        """uint8 [B, 3, H, W] (NaFlex: its dict) -> float32 [B, D] embeddings from `siglip`, or the error it
        answered."""
        pixels = self.preprocess.normalize(images)  # float32, as the embed job feeds the encoder
        if isinstance(pixels, dict):  # NaFlex: patches, mask and grid, as siglip's rendered inputs name them
            inputs = [pb_utils.Tensor(names.NAFLEX_INPUTS[key], value.numpy()) for key, value in pixels.items()]
        else:
            inputs = [pb_utils.Tensor(names.PIXEL_VALUES, pixels.numpy())]
        response = pb_utils.InferenceRequest(
            model_name=names.SIGLIP, requested_output_names=[names.EMBEDDING], inputs=inputs,
        ).exec()
        if response.has_error():
            return response.error()
        return pb_utils.get_output_tensor_by_name(response, names.EMBEDDING).as_numpy()
