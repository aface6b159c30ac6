"""New queries for the explore app: a text through SigLIP's text tower (in this process, or a running Triton
`embed_text`), an uploaded image through the vision tower, decoded and preprocessed as the embed job does.

Both towers must be the model the embeddings were made with (`pipelines.index.check_same_model`: one line naming
the difference). The in-process towers load once, the vision tower on the first upload; a lock serialises their
use (one forward pass at a time is what two cores can do anyway).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from pipelines.errors import UserError
from pipelines.index import check_same_model

log = logging.getLogger(__name__)

TEXT_KEYS = ("model", "revision", "embedding_dim")
IMAGE_KEYS = ("model", "revision", "embedding_dim", "preprocess")


def parse_server(text_server: str) -> str:
    """`host:port` of a Triton gRPC endpoint (UserError otherwise)."""
    host, _, port = str(text_server).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"text_server={text_server!r}: expected host:port of Triton's gRPC endpoint, e.g. "
                        "text_server=localhost:8001")
    return f"{host}:{port}"


class TritonText:
    """Text embeddings from a running Triton server's `embed_text` model (gRPC), checked against the stored model
    by the checkpoint the server was started with (its config's `name_or_path` parameter)."""

    def __init__(self, address: str, *, stored: dict[str, Any]) -> None:
        try:
            from tritonclient import grpc
        except ImportError as exc:
            raise UserError("text_server= needs tritonclient: pip install '.[serve]'") from exc
        from tritonclient.utils import InferenceServerException

        from pipelines.serve import names

        self._grpc, self._names, self._error = grpc, names, InferenceServerException
        self.client = grpc.InferenceServerClient(address)
        try:
            config = self.client.get_model_config(names.EMBED_TEXT, as_json=True)["config"]
        except InferenceServerException as exc:
            raise UserError(f"text_server={address}: no ready {names.EMBED_TEXT} model there "
                            f"({str(exc).splitlines()[0]}); start it with python -m pipelines.serve") from exc
        params = config.get("parameters", {})
        served = params.get(names.PARAM_MODEL, {}).get("string_value")
        check_same_model(stored, {"model": served, "revision": params.get(names.PARAM_REVISION, {})
                                  .get("string_value") or None}, keys=("model", "revision"))
        self.address = address

    def embed(self, text: str) -> np.ndarray:
        """One text -> float32 [1, D]."""
        grpc, names = self._grpc, self._names
        tensor = grpc.InferInput(names.TEXT, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
        try:
            result = self.client.infer(names.EMBED_TEXT, [tensor])
        except self._error as exc:
            raise UserError(f"text_server={self.address}: {str(exc).splitlines()[0]}") from exc
        return result.as_numpy(names.EMBEDDING).astype(np.float32).reshape(1, -1)


class LocalText:
    """Text embeddings from the text tower loaded in this process."""

    def __init__(self, *, name_or_path: str, revision: str | None, device: str, dtype: str,
                 stored: dict[str, Any]) -> None:
        from pipelines.text import load_text_encoder

        self.encoder = load_text_encoder(name_or_path, revision=revision, device=device, dtype=dtype)
        check_same_model(stored, self.encoder.metadata(), keys=TEXT_KEYS)
        self._lock = threading.Lock()

    def embed(self, text: str) -> np.ndarray:
        """One text -> float32 [1, D]."""
        with self._lock:
            return self.encoder.embed([text]).float().cpu().numpy()


class ImageQueries:
    """Uploaded images -> embeddings with the vision tower (loaded on first use)."""

    def __init__(self, *, name_or_path: str, revision: str | None, device: str, dtype: str,
                 stored: dict[str, Any], max_pixels: int | None) -> None:
        self.settings = {"name_or_path": name_or_path, "revision": revision, "device": device, "dtype": dtype}
        self.stored, self.max_pixels = stored, max_pixels
        self._encoder: Any = None
        self._lock = threading.Lock()

    def embed(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> float32 [1, D]; DecodeError (a UserError) for a file that is no image or too big."""
        from pipelines.data import decode

        pixels = decode(data, max_pixels=self.max_pixels)
        with self._lock:
            encoder = self._load()
            resized = encoder.preprocess.resize(pixels).unsqueeze(0)
            return encoder.embed_uint8(resized).float().cpu().numpy()

    def _load(self) -> Any:
        if self._encoder is None:
            from pipelines.siglip import load_encoder

            s = self.settings
            encoder = load_encoder(s["name_or_path"], revision=s["revision"], device=s["device"], dtype=s["dtype"])
            check_same_model(self.stored, encoder.metadata(), keys=IMAGE_KEYS)
            self._encoder = encoder
        return self._encoder
