"""Triton model `embed_text`: BYTES [B, 1] UTF-8 texts -> FP32 embeddings [B, D] (`TextEncoder.embed`).

Decoding is `pipelines.text.decode_texts` and the embedding `TextEncoder.embed`, as offline, so a text gets the
same embedding online and offline (longer than the model's 64 tokens: truncated alike). A request with a row that
is not UTF-8 or is empty fails alone (400, naming the row); the other requests of the batch are embedded.
"""

import json
import os
import sys

import torch
import triton_python_backend_utils as pb_utils

# Triton's Python backend stub ignores PYTHONPATH; honour it as any Python does, so that this model imports the
# same `pipelines` as the launcher (e.g. one installed with `pip install --target DIR`, PYTHONPATH=DIR).
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

from pipelines.serve import models
from pipelines.text import TextInputError, TextTowerMissingError, decode_texts, load_text_encoder


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        settings = models.model_settings(
            config, instance_kind=args["model_instance_kind"], device_id=int(args["model_instance_device_id"])
        )
        torch.set_num_threads(settings.num_threads)
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.encoder, self.missing = None, None
        try:
            self.encoder = load_text_encoder(
                settings.name_or_path, revision=settings.revision, device=settings.device, dtype=settings.dtype
            )
        except TextTowerMissingError as exc:  # a vision-only checkpoint: siglip and embed_image still serve it
            self.missing = str(exc)

    def execute(self, requests: list) -> list:
        if self.missing is not None:
            error = pb_utils.TritonError(self.missing, pb_utils.TritonError.UNAVAILABLE)
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        texts = [_texts(pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy()) for r in requests]
        results = models.embed_batch(texts, self._embed, good=lambda t: isinstance(t, list))
        return models.responses(pb_utils, self.output_name, results)

    def _embed(self, requests: list):
        return self.encoder.embed([text for request in requests for text in request]).cpu().numpy()


def _texts(blobs):
    """BYTES [n, 1] -> the request's n texts, or the TextInputError naming its bad rows."""
    if blobs.size == 0:
        return TextInputError("the request holds no text", ())
    try:
        return decode_texts(list(blobs.reshape(-1)))
    except TextInputError as exc:
        return exc
