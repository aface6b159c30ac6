"""Triton model `embed_image`: BYTES [B, 1] encoded images -> FP32 embeddings [B, D], through `siglip` (BLS).

Decoding and resizing are `pipelines.data.decode` + `Preprocess.resize`, as in `python -m pipelines.embed`,
so a file gets the same embedding online and offline. An undecodable image fails its own request only.
"""

import json

import torch
import triton_python_backend_utils as pb_utils

from pipelines import names, serving
from pipelines.data import DecodeError
from pipelines.siglip import load_preprocess


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        settings = serving.model_settings(config, instance_kind=args["model_instance_kind"], device_id=0)
        torch.set_num_threads(settings.num_threads)
        self.preprocess = load_preprocess(settings.name_or_path, revision=settings.revision)
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests: list) -> list:
        images, errors = [], []
        for request in requests:
            try:
                blobs = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
                images.append(serving.decode_images(blobs, self.preprocess))
                errors.append(None)
            except DecodeError as exc:
                images.append(None)
                errors.append(pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
        good = [x for x in images if x is not None]
        if good:
            embeddings, error = self._siglip(torch.cat(good))
            if error is not None:
                errors = [e or error for e in errors]
            else:
                blocks = iter(serving.split_rows(embeddings, [len(x) for x in good]))
        return [
            pb_utils.InferenceResponse(error=e) if e is not None
            else pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, next(blocks))])
            for e in errors
        ]

    def _siglip(self, images: torch.Tensor) -> tuple:
        """uint8 [B, 3, H, W] -> (float32 [B, D], None), or (None, the error siglip answered)."""
        pixels = self.preprocess.normalize(images).numpy()
        response = pb_utils.InferenceRequest(
            model_name=names.SIGLIP,
            requested_output_names=[names.EMBEDDING],
            inputs=[pb_utils.Tensor(names.PIXEL_VALUES, pixels)],
        ).exec()
        if response.has_error():
            return None, response.error()
        return pb_utils.get_output_tensor_by_name(response, names.EMBEDDING).as_numpy(), None
