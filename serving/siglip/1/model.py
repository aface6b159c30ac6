"""Triton model `siglip`: FP32 pixel values [B, 3, 384, 384] -> FP32 embeddings [B, D] (`Encoder.embed`).

For a SigLIP 2 NaFlex checkpoint the launcher renders NaFlex's inputs instead (names.py): PIXEL_VALUES [B, N, 3*p*p]
patches, PIXEL_ATTENTION_MASK [B, N], SPATIAL_SHAPES [B, 2]. A request holding NaN or inf (or, NaFlex, a grid or
mask the model cannot take) fails alone (400); the other requests of the batch are embedded.
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

from pipelines.serve import models, names
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
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_name = config["output"][0]["name"]
        self.naflex = self.input_names != [names.PIXEL_VALUES]  # the launcher rendered NaFlex's inputs

    def execute(self, requests: list) -> list:
        # Triton has already checked each request's names, dtypes and shapes against config.pbtxt.
        inputs = [self._inputs(r) for r in requests]
        results = models.embed_batch(inputs, self._embed, good=lambda x: not isinstance(x, str))
        return models.responses(pb_utils, self.output_name, results)

    def _inputs(self, request):
        """A request's arrays (NaFlex: by NaFlexPreprocess's keys), or why it is refused."""
        arrays = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
        if not self.naflex:  # NaN would come back as a NaN embedding: such a request is refused, rows named
            error = models.non_finite_rows(arrays[names.PIXEL_VALUES])
            return arrays[names.PIXEL_VALUES] if error is None else error
        error = models.naflex_rows(*(arrays[name] for name in names.NAFLEX_INPUTS.values()))
        return {key: arrays[name] for key, name in names.NAFLEX_INPUTS.items()} if error is None else error

    def _embed(self, batches: list) -> np.ndarray:
        if not self.naflex:
            return self.encoder.embed(torch.from_numpy(np.concatenate(batches))).cpu().numpy()
        stacked = {key: torch.from_numpy(np.concatenate([b[key] for b in batches])) for key in batches[0]}
        return self.encoder.embed(stacked).cpu().numpy()
