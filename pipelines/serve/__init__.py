"""Serving the encoder with a real `tritonserver` on the model repository `serving/` (see docs/serving.md).

One module per concern: `install` (finding tritonserver and its Python backend), `repository` (rendering the
model repository's configs), `ports`, `process` (the server process), `watchdog` (reloading a model whose stub
died), `names` (tensor, parameter and model names), `models` (what the Triton models in `serving/` do, minus
Triton), and the load tools `loadgen` and `perf_analyzer`. `python -m pipelines.serve` is the launcher.

Importing this package stays light (no torch, no tritonclient): the launcher starts fast.
"""

from __future__ import annotations

from pipelines.errors import UserError


class ServerError(UserError):
    """The server could not be found, started or kept running; the message carries its last log lines."""
