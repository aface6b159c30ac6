"""Triton model `siglip`: FP32 pixel values [B, 3, 384, 384] -> FP32 embeddings [B, D] (`Encoder.embed`)."""

import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from pipelines import serving
from pipelines.siglip import load_encoder


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        settings = serving.model_settings(
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
        embeddings = self.encoder.embed(torch.from_numpy(np.concatenate(arrays))).cpu().numpy()
        blocks = serving.split_rows(embeddings, [len(a) for a in arrays])
        return [pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, block)]) for block in blocks]
