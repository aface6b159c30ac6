"""Rendering the model repository: a copy of `serving/` whose `config.pbtxt` files carry the settings chosen at
launch (model, dtype, device, batch sizes), so that the code and the committed configs never change.

Every model of `names.MODELS` gets the checkpoint, revision and batching settings; a setting that concerns only
some models goes to those whose committed `config.pbtxt` declares its parameter (see `render_config`), so that a
new model needs no code here.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from pipelines.serve import ServerError, names


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """What `render_repository` writes into the configs (conf/serve.yaml gives each value and its meaning)."""

    name_or_path: str
    revision: str | None
    dtype: str
    device: str
    num_threads: str
    max_batch_size: int
    max_queue_delay_us: int
    decode_instances: int
    max_pixels: int
    # What the checkpoint's vision tower takes (`hub.input_geometry`): ('fixres', H, W) gives siglip [3, H, W]
    # pixels, ('naflex', max_num_patches, patch_size) NaFlex's patches, mask and grid; None keeps the committed
    # [3, 384, 384].
    geometry: tuple[str, int, int] | None = None
    # CUDA devices this host's torch sees: with device=auto, siglip gets one instance on each (KIND_GPU, gpus
    # 0..N-1); none keeps KIND_AUTO.
    visible_gpus: int = 0


def read_config(path: Path):
    """A `config.pbtxt` file -> Triton's ModelConfig protobuf message."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


def render_repository(source: Path, target: Path, options: ModelOptions) -> Path:
    """Copy the repository `source` to `target` with `options` written into every model's config.pbtxt."""
    from google.protobuf import text_format

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.md"))
    for model in names.MODELS:
        path = target / model / "config.pbtxt"
        if not path.is_file():
            raise ServerError(f"{source} is not the siglip model repository: {model}/config.pbtxt is missing")
        config = read_config(path)
        render_config(config, options)
        path.write_text(text_format.MessageToString(config))
    return target


def render_config(config, options: ModelOptions) -> None:
    """Write `options` into one ModelConfig: batching, checkpoint and revision always; the encoder's settings
    (dtype, threads, placement) where it declares `dtype`; the decoder's (instances, pixel limit) where it
    declares `max_pixels`."""
    config.max_batch_size = options.max_batch_size
    config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    declared = set(config.parameters)
    _set_parameter(config, names.PARAM_MODEL, options.name_or_path)
    _set_parameter(config, names.PARAM_REVISION, options.revision or "")
    if names.PARAM_DTYPE in declared:
        _set_parameter(config, names.PARAM_DTYPE, options.dtype)
        _set_parameter(config, names.PARAM_THREADS, str(options.num_threads))
        _place(config.instance_group[0], options.device, visible_gpus=options.visible_gpus)
    if options.geometry is not None and config.input[0].name == names.PIXEL_VALUES:
        kind, a, b = options.geometry
        if kind == "naflex":
            _naflex_inputs(config, max_num_patches=a, patch_size=b)
        else:
            config.input[0].dims[:] = [3, a, b]
    if names.PARAM_MAX_PIXELS in declared:
        config.instance_group[0].count = options.decode_instances
        if options.max_pixels < 1:
            raise ServerError(f"max_pixels={options.max_pixels}: expected a positive number of pixels")
        _set_parameter(config, names.PARAM_MAX_PIXELS, str(options.max_pixels))


def _naflex_inputs(config, max_num_patches: int, patch_size: int) -> None:
    """siglip's inputs for a NaFlex checkpoint: the patches, their mask and their grid (see names.py)."""
    from tritonclient.grpc import model_config_pb2

    types = model_config_pb2.DataType
    del config.input[:]
    for name, dtype, dims in ((names.PIXEL_VALUES, "TYPE_FP32", [max_num_patches, 3 * patch_size ** 2]),
                              (names.PIXEL_ATTENTION_MASK, "TYPE_INT32", [max_num_patches]),
                              (names.SPATIAL_SHAPES, "TYPE_INT64", [2])):
        config.input.add(name=name, data_type=types.Value(dtype), dims=dims)


def _place(group, device: str, *, visible_gpus: int = 0) -> None:
    """device=auto: one instance per visible GPU (KIND_GPU on 0..N-1), KIND_AUTO where torch sees none; else the
    instance goes where it was asked."""
    from tritonclient.grpc import model_config_pb2

    kind = model_config_pb2.ModelInstanceGroup.Kind
    index = device.split(":", 1)[1] if device.startswith("cuda:") else ""
    if device == "auto" and visible_gpus > 0:
        group.kind = kind.Value("KIND_GPU")
        group.count = 1  # per GPU listed
        group.gpus[:] = list(range(visible_gpus))
        return
    if device == "cpu":
        group.kind = kind.Value("KIND_CPU")
    elif device == "cuda" or index.isdigit():
        group.kind = kind.Value("KIND_GPU")
        if index:
            group.gpus[:] = [int(index)]
    elif device != "auto":
        raise ServerError(f"device={device!r}: expected auto, cpu, cuda or cuda:<index>")


def _set_parameter(config, key: str, value: str) -> None:
    config.parameters[key].string_value = value
