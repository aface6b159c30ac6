"""Triton model `siglip`: FP32 pixel values [B, 3, 384, 384] -> FP32 embeddings [B, D] (`Encoder.embed`).

A request holding NaN or inf fails alone (400); the other requests of the batch are embedded.
"""

import json
import os
import sys

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

# Triton's Python backend stub ignores PYTHONPATH; honour it as any Python does, so that this model imports the
# same `pipelines` as the launcher (e.g. one installed with `pip install --target DIR`, PYTHONPATH=DIR).
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

from pipelines.serve import models
from pipelines.siglip import load_encoder


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        settings = models.model_settings(
            config, instance_kind=args["model_instance_kind"], device_id=int(args["model_instance_device_id"])
        )
        # Each instance is one process: more threads than this oversubscribe the cores and collapse speed.
        torch.set_num_threads(settings.num_threads)
        self.encoder = load_encoder(
            settings.name_or_path, device=settings.device, dtype=settings.dtype, revision=settings.revision
        )
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests: list) -> list:
        # Triton has already checked each request's name, dtype and shape against config.pbtxt.
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        # NaN would come back as a NaN embedding: such a request is refused with the rows named.
        inputs = [a if (error := models.non_finite_rows(a)) is None else error for a in arrays]
        results = models.embed_batch(inputs, self._embed, good=lambda x: isinstance(x, np.ndarray))
        return models.responses(pb_utils, self.output_name, results)

    def _embed(self, arrays: list) -> np.ndarray:
        return self.encoder.embed(torch.from_numpy(np.concatenate(arrays))).cpu().numpy()
