"""Triton model `embed_image`: BYTES [B, 1] encoded images -> FP32 embeddings [B, D], through `siglip` (BLS).

Decoding and resizing are `pipelines.data.decode` + `Preprocess.resize`, then `Preprocess.normalize`, as in
`python -m pipelines.embed`, so a file gets the same embedding online and offline. An image that cannot be
decoded fails its own request (400) and no other.
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
        decoded = [self._decode(request) for request in requests]  # uint8 [n, 3, H, W] or the request's error
        good = [d for d in decoded if isinstance(d, torch.Tensor)]
        embeddings = self._siglip(torch.cat(good)) if good else None
        if isinstance(embeddings, pb_utils.TritonError):
            return [pb_utils.InferenceResponse(error=embeddings if isinstance(d, torch.Tensor) else d)
                    for d in decoded]
        blocks = iter(serving.split_rows(embeddings, [len(d) for d in good]) if good else [])
        return [pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, next(blocks))])
                if isinstance(d, torch.Tensor) else pb_utils.InferenceResponse(error=d) for d in decoded]

    def _decode(self, request):
        blobs = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
        try:
            return serving.decode_images(blobs, self.preprocess)
        except DecodeError as exc:
            return pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)

    def _siglip(self, images: torch.Tensor):
        """uint8 [B, 3, H, W] -> float32 [B, D] embeddings from `siglip`, or the error it answered."""
        pixels = self.preprocess.normalize(images).numpy()  # float32, as the embed job feeds the encoder
        response = pb_utils.InferenceRequest(
            model_name=names.SIGLIP,
            requested_output_names=[names.EMBEDDING],
            inputs=[pb_utils.Tensor(names.PIXEL_VALUES, pixels)],
        ).exec()
        if response.has_error():
            return response.error()
        return pb_utils.get_output_tensor_by_name(response, names.EMBEDDING).as_numpy()
