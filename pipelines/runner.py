"""Temporary re-exports of the names that moved to `pipelines.runners` and `pipelines.store`.

To be removed once nothing imports this module; new code imports from `pipelines.runners.local`,
`pipelines.runners.split` and `pipelines.store`.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.data import DEFAULT_MAX_PIXELS, ImageRecord
from pipelines.runners import local
from pipelines.runners.local import HANG_TIMEOUT_S, DecodeWorkersDiedError, default_workers, make_loader
from pipelines.runners.split import Job, SplitStats, record_errors, start_split, write_split
from pipelines.siglip import Encoder, EncoderSpec
from pipelines.store import PartWriter

__all__ = ["HANG_TIMEOUT_S", "DecodeWorkersDiedError", "PartWriter", "SplitStats", "default_workers", "embed_split",
           "make_loader", "record_errors", "start_split", "write_split"]


def embed_split(*, encoder: Encoder, root: Path, split: str, records: list[ImageRecord], output_dir: Path,
                batch_size: int, num_workers: int, rows_per_part: int, prefix: str, progress: bool = True,
                device_decode: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> SplitStats:
    """The former keyword form of `pipelines.runners.local.embed_split`, for callers not yet moved."""
    spec = EncoderSpec(encoder.name_or_path, encoder.revision, str(encoder.device),
                       str(encoder.dtype).removeprefix("torch."))
    job = Job(encoder=spec, root=Path(root), output_dir=Path(output_dir), prefix=prefix, batch_size=batch_size,
              num_workers=num_workers, rows_per_part=rows_per_part, progress=progress, max_pixels=max_pixels,
              compile=False)
    return local.embed_split(encoder, job, split=split, records=records, device_decode=device_decode)
