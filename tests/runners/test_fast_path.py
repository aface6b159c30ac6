"""The embed job's fast path on CPU: low-precision parity, compile without recompiling, the fused normalisation,
batched decoding on the device, the so400m-random preset and its counted FLOPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from helpers.jobs import runner_job
from torch.utils.flop_counter import FlopCounterMode

from pipelines import store
from pipelines.bench.flops import count_flops
from pipelines.data import EncodedImageDataset, ImageFolderDataset, collate, collate_encoded, decode, list_split
from pipelines.presets import SO400M_PREPROCESSOR, SO400M_VISION, build_so400m_random, build_tiny
from pipelines.runners.local import embed_split, make_loader
from pipelines.siglip import Preprocess, load_encoder


def cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a, b = a.double().numpy(), b.double().numpy()
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def photos_uint8(photo_bytes) -> torch.Tensor:
    """The fixture photos decoded and resized as the workers do: uint8 [7, 3, 384, 384]."""
    preprocess = Preprocess.from_config(SO400M_PREPROCESSOR)
    return torch.stack([preprocess.resize(decode(data)) for data in photo_bytes.values()])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_embeddings_match_float32(dtype, photos_uint8):
    reference = load_encoder("tiny", device="cpu", dtype="float32").embed_uint8(photos_uint8)
    low = load_encoder("tiny", device="cpu", dtype=dtype).embed_uint8(photos_uint8)
    assert low.dtype == torch.float32 and low.shape == reference.shape
    assert cosine(low, reference).min() >= 0.999
    assert not torch.equal(low, reference)  # it did compute in lower precision


def test_compile_does_not_recompile_on_a_smaller_last_batch(photos_uint8):
    eager = load_encoder("tiny", device="cpu", dtype="float32")
    reference = eager.embed_uint8(photos_uint8)
    torch.compiler.reset()
    encoder = load_encoder("tiny", device="cpu", dtype="float32").compile(batch_size=4, backend="eager")
    first = encoder.embed_uint8(photos_uint8[:4])
    with torch._dynamo.config.patch(error_on_recompile=True):
        last = encoder.embed_uint8(photos_uint8[4:])  # 3 images, padded to 4
        every = encoder.embed_uint8(photos_uint8)  # 7 images: 4 + 3 padded
        # The guard is armed: an unpadded batch of another size would recompile.
        with pytest.raises(torch._dynamo.exc.RecompileError):
            encoder.model(pixel_values=encoder.preprocess.normalize(photos_uint8[:2]))
    assert last.shape == (3, 32) and every.shape == (7, 32)
    torch.testing.assert_close(torch.cat([first, last]), reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(every, reference, atol=1e-5, rtol=1e-4)
    torch.compiler.reset()


def test_compile_refuses_a_batch_size_below_one():
    with pytest.raises(ValueError, match="batch_size=0"):
        load_encoder("tiny", device="cpu").compile(batch_size=0)


@pytest.mark.parametrize(
    "config",
    [SO400M_PREPROCESSOR,
     {**SO400M_PREPROCESSOR, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
     {**SO400M_PREPROCESSOR, "do_rescale": False},
     {**SO400M_PREPROCESSOR, "do_normalize": False}],
    ids=["siglip", "imagenet-stats", "no-rescale", "no-normalize"],
)
def test_normalize_equals_rescale_then_normalize(config, photos_uint8):
    preprocess = Preprocess.from_config(config)
    channels_last = photos_uint8.contiguous(memory_format=torch.channels_last)
    before = channels_last.clone()
    out = preprocess.normalize(channels_last, dtype=torch.float32)
    expected = photos_uint8.double()
    if preprocess.do_rescale:
        expected = expected * preprocess.rescale_factor
    if preprocess.do_normalize:
        expected = (expected - torch.tensor(preprocess.mean).double().view(-1, 1, 1)) / torch.tensor(
            preprocess.std).double().view(-1, 1, 1)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert (out.double() - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item() / 255)
    assert torch.equal(channels_last, before)  # the input is left alone
    assert preprocess.normalize(photos_uint8, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_device_decode_equals_the_workers_path(image_root):
    """Batched decode_jpeg on the device (here the CPU) gives the very pixels the workers give, failures included."""
    (image_root / "valid" / "bag" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    (image_root / "valid" / "bag" / "empty.jpg").write_bytes(b"")
    preprocess = Preprocess.from_config(SO400M_PREPROCESSOR)
    records = list_split(image_root, "valid")
    workers = collate([ImageFolderDataset(image_root, records, preprocess)[i] for i in range(len(records))])
    encoded_items = [EncodedImageDataset(image_root, records, preprocess)[i] for i in range(len(records))]
    assert any(item["pixels"] is not None and item["pixels"].ndim == 1 for item in encoded_items)  # JPEGs stay encoded
    on_device = collate_encoded(encoded_items).decoded(preprocess, torch.device("cpu"))
    assert sorted(on_device.indices) == sorted(workers.indices)
    order = [on_device.indices.index(i) for i in workers.indices]
    assert torch.equal(on_device.pixels[order], workers.pixels)
    failed = {records[i].path for i, _ in on_device.failed}
    assert failed == {records[i].path for i, _ in workers.failed} == {"valid/bag/broken.jpg", "valid/bag/empty.jpg"}


def test_job_with_device_decode_writes_the_same_embeddings(tmp_path, image_root):
    encoder = load_encoder("tiny", device="cpu", dtype="float32")
    records = list_split(image_root, "train")
    settings = {"batch_size": 3, "num_workers": 1, "rows_per_part": 100}
    worker_stats = embed_split(encoder, runner_job(image_root, tmp_path / "workers", **settings), split="train",
                               records=records, device_decode=False)
    device_stats = embed_split(encoder, runner_job(image_root, tmp_path / "device", **settings), split="train",
                               records=records, device_decode=True)
    assert worker_stats.embedded == device_stats.embedded == len(records)
    assert 0 < device_stats.first_batch_s <= device_stats.read_s <= device_stats.wall_s
    a, b = store.read_split(tmp_path / "workers", "train"), store.read_split(tmp_path / "device", "train")
    assert a.paths == b.paths == [r.path for r in records]
    np.testing.assert_array_equal(a.embeddings, b.embeddings)


def test_collated_batches_keep_the_decoders_channels_last_layout(image_root):
    preprocess = Preprocess.from_config(SO400M_PREPROCESSOR)
    records = list_split(image_root, "train")
    items = [ImageFolderDataset(image_root, records, preprocess)[i] for i in range(len(records))]
    batch = collate(items)
    expected = torch.stack([item["pixels"].contiguous() for item in items if item["error"] is None])
    assert batch.pixels.is_contiguous(memory_format=torch.channels_last) and torch.equal(batch.pixels, expected)
    torch.testing.assert_close(preprocess.normalize(batch.pixels), preprocess.normalize(expected), rtol=0, atol=0)
    assert preprocess.normalize(batch.pixels).is_contiguous()


def test_loader_pins_for_cuda_only_when_workers_decode(image_root):
    preprocess = Preprocess.from_config(SO400M_PREPROCESSOR)
    records = list_split(image_root, "valid")

    def loader(device: str, device_decode: bool):
        return make_loader(root=image_root, records=records, preprocess=preprocess, batch_size=2, num_workers=0,
                           device=torch.device(device), device_decode=device_decode)

    assert loader("cuda", False).pin_memory and not loader("cpu", False).pin_memory
    assert not loader("cuda", True).pin_memory
    batch = next(iter(loader("cpu", False)))
    assert batch.pixels.dtype == torch.uint8 and batch.pixels.shape[1:] == (3, 384, 384)


def analytic_flops(vision: dict, *, with_attention: bool = True) -> float:
    """FLOPs of one image through a SigLIP vision tower with its attention-pooling head, from the geometry."""
    d, i, layers = vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]
    n = (vision["image_size"] // vision["patch_size"]) ** 2
    patch = 2 * n * 3 * vision["patch_size"] ** 2 * d
    per_layer = 2 * n * 4 * d * d + 2 * n * 2 * d * i + (2 * 2 * n * n * d if with_attention else 0)
    head = 2 * (n * 2 * d * d + 2 * d * d) + 2 * 2 * n * d + 2 * 2 * d * i  # k/v of n tokens, q/out, attend, MLP
    return patch + layers * per_layer + head


def test_flops_are_counted_with_attention():
    tiny = build_tiny()
    counted = count_flops(tiny, height=384, width=384)
    expected = analytic_flops(tiny.config.to_dict())
    assert abs(counted - expected) / expected < 0.01
    # The reason for the eager twin: on CPU, the SDPA kernel is invisible to the counter.
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tiny(pixel_values=torch.zeros(1, 3, 384, 384))
    assert counter.get_total_flops() < counted - 0.9 * (expected - analytic_flops(tiny.config.to_dict(),
                                                                                   with_attention=False))


def test_so400m_random_has_the_real_geometry():
    model = build_so400m_random(device="meta")  # no memory, no compute
    assert model.config.hidden_size == 1152 and model.config.num_hidden_layers == 27
    assert 428.0e6 < sum(p.numel() for p in model.parameters()) < 428.5e6
    counted = count_flops(model, height=384, width=384)
    assert abs(counted - analytic_flops(SO400M_VISION)) / counted < 0.01
    assert 660e9 < counted < 680e9  # the ~670 GFLOP per image the MFU figures rest on
