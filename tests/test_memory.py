"""Sizes (units), the live-storage tracker, predicted (memory) vs measured (measurement) peaks, FLOPs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers import assert_message
from streamcnn.planning.flops import step_flops
from streamcnn.planning.measurement import measure_step_memory
from streamcnn.planning.memory import CUDA_BLOCK_BYTES, predict_step_memory
from streamcnn.engine.step import allocate_optimizer_state, make_optimizer, training_step
from streamcnn.planning.tracking import LiveStorageTracker
from streamcnn.utils.units import format_size, parse_size, resolve_dtype
from streamcnn.models.classifier import StreamingClassifier, build_model
from streamcnn.engine.streaming import StreamingModule


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny real CPU steps: see conftest.py


def small_cnn(tile_size=None, checkpoint=False, output_device=None, channels=8) -> StreamingClassifier:
    """A four-stage stride-16 CNN with a small receptive field: real multi-tile plans at 256 px."""
    torch.manual_seed(0)
    layers, c_in = [], 1
    for c_out in (channels, 2 * channels, 2 * channels, 4 * channels):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
                   nn.ReLU()]
        c_in = c_out
    trunk = StreamingModule(nn.Sequential(*layers), tile_size, checkpoint=checkpoint, output_device=output_device)
    head = nn.Sequential(nn.Conv2d(c_in, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 5))
    return StreamingClassifier(trunk, head)


# -- sizes ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("11GB", 11 * 10**9), ("11GiB", 11 * 2**30), ("512MB", 512 * 10**6), ("11 GB", 11 * 10**9),
    ("1.5GiB", 3 * 2**29), ("800mib", 800 * 2**20), ("2tb", 2 * 10**12), ("4096", 4096), (4096, 4096),
    (" 7 kB ", 7000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["11 gigs", "GB", "", "-3GB", "1e9", "0GB", "11GBs"])
def test_parse_size_rejects_with_the_accepted_forms(text):
    with pytest.raises(ValueError) as err:
        parse_size(text)
    assert_message(err, "memory size", repr(text))
    if "0" not in text and "-" not in text:
        assert_message(err, "'11GB'", "10^9", "'11GiB'", "2^30")


def test_format_size_uses_decimal_units():
    assert format_size(11 * 10**9) == "11.00 GB"
    assert format_size(11 * 2**30) == "11.81 GB"
    assert format_size(512 * 10**6) == "512.00 MB"
    assert format_size(999) == "999 B"


def test_resolve_dtype():
    assert resolve_dtype(None) is None and resolve_dtype("fp32") is None
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError) as refused:
        resolve_dtype("int8")
    assert_message(refused, "dtype", "'int8'", "fp32", "bf16", "fp16")


# -- tracker ----------------------------------------------------------------------------

def test_tracker_counts_each_storage_once_and_sees_frees():
    tracker = LiveStorageTracker("cpu")
    with tracker:
        a = torch.empty(1000)                  # 4000 bytes
        view = a[10:].view(-1, 10)             # shares a's storage
        b = torch.empty(250, dtype=torch.float64)
        assert tracker.current == 6000
        del a, view
        assert tracker.current == 2000         # a's storage died with its last view
        c = torch.empty(100)
        del b, c
    assert tracker.peak == 6000 and tracker.current == 0


def test_tracker_rounds_like_the_cuda_allocator():
    tracker = LiveStorageTracker("cpu", block=CUDA_BLOCK_BYTES)
    with tracker:
        x = torch.empty(1)
        y = torch.empty(129)                   # 516 bytes -> 1024
        assert tracker.current == 512 + 1024
        del x, y


# -- predicted vs measured --------------------------------------------------------------

def small_resnet18(**config) -> StreamingClassifier:
    torch.manual_seed(0)
    return build_model("resnet18", head="conv", num_classes=5, in_channels=1, head_kwargs={"width": 32, "depth": 1},
                       **config)


@pytest.mark.parametrize("size, config", [
    ((256, 256), dict()),
    ((256, 256), dict(checkpoint=True)),
    ((192, 192), dict(tile_size=96, checkpoint=True)),      # 2x2 tiles
])
def test_prediction_within_10_percent_of_cpu_allocator_peak(size, config):
    model = small_resnet18(**config)
    predicted = predict_step_memory(model, size, device="cpu")
    measured = measure_step_memory(model, size, device="cpu", warmup=False)
    if config.get("tile_size"):
        assert len(model.trunk.plan(size).tiles) >= 4
    assert abs(predicted.allocated_bytes / measured.allocated_bytes - 1) < 0.10, (predicted, measured)


def test_fake_run_sees_exactly_the_tensors_of_a_real_run():
    """The fake simulation allocates the same tensors as the real CPU step (kernels' own scratch
    buffers, which only the allocator sees, are what separates prediction and allocator peak)."""
    model = small_cnn(tile_size=64, checkpoint=True, channels=8)
    assert len(model.trunk.plan((256, 192)).tiles) == 12
    images, labels = torch.rand(2, 1, 256, 192), torch.zeros(2, dtype=torch.long)
    optimizer = allocate_optimizer_state(make_optimizer("adamw", model, foreach=False))
    tracker = LiveStorageTracker("cpu")
    with tracker:
        for t in [*model.parameters(), images, labels, *(v for s in optimizer.state.values() for v in s.values())]:
            tracker.track(t)
        training_step(model, images, labels, optimizer, device_type="cpu")
    model = small_cnn(tile_size=64, checkpoint=True, channels=8)
    assert tracker.peak == predict_step_memory(model, (256, 192), batch=2, device="cpu", full_plan=True).live_bytes


@pytest.mark.parametrize("config", [
    dict(tile_size=48), dict(tile_size=80, checkpoint=True), dict(tile_size=64, output_device="cpu"),
])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_largest_window_shortcut_equals_the_full_plan(config, device):
    model = small_cnn(**config)
    assert len({t.window_shape for t in model.trunk.plan((320, 256)).tiles}) > 1   # uneven windows
    quick = predict_step_memory(model, (320, 256), device=device, dtype="bf16")
    full = predict_step_memory(model, (320, 256), device=device, dtype="bf16", full_plan=True)
    assert quick == full


def test_prediction_orders_the_plans_as_expected():
    def peak(**config):
        return predict_step_memory(small_cnn(**config, channels=16), 512, device="cuda").live_bytes

    conventional, checkpoint = peak(), peak(checkpoint=True)
    streamed, offloaded = peak(tile_size=64), peak(tile_size=64, output_device="cpu")
    # conv+ReLU segments save the same tensors with or without checkpointing
    assert checkpoint == conventional and streamed < conventional / 3
    assert offloaded < streamed                # F and dF leave the device during the trunk's backward
    resnet = [predict_step_memory(small_resnet18(checkpoint=c), 1024, device="cuda").live_bytes for c in (False, True)]
    assert resnet[1] < resnet[0] * 0.8         # residual blocks' insides are recomputed


def test_bf16_autocast_lowers_the_prediction():
    model = small_cnn(channels=16)
    assert (predict_step_memory(model, 384, device="cuda", dtype="bf16").live_bytes
            < predict_step_memory(model, 384, device="cuda").live_bytes)


def test_prediction_leaves_the_model_alone():
    model = small_cnn(tile_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predict_step_memory(model, 256, device="cuda")
    assert all(torch.equal(before[k], v) and v.device.type == "cpu" for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_base_is_parameters_buffers_and_adamw_state():
    model = small_cnn()
    params = sum(p.numel() * 4 for p in model.parameters())
    estimate = predict_step_memory(model, 128, device="cuda", optimizer="adamw")
    # parameters + exp_avg + exp_avg_sq (+ 4-byte step counters, each rounded to 512 B)
    n = len(list(model.parameters()))
    assert 3 * params <= estimate.base_bytes <= 3 * params + n * 4 * CUDA_BLOCK_BYTES


# -- FLOPs ------------------------------------------------------------------------------

def test_step_flops_match_the_convolution_formula():
    trunk = StreamingModule(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False)), None)
    head = nn.Sequential(nn.Conv2d(4, 6, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    flops = step_flops(StreamingClassifier(trunk, head), (32, 48), batch=2)
    trunk_fwd = 2 * 2 * 32 * 48 * 4 * 1 * 9
    head_fwd = 2 * 2 * 32 * 48 * 6 * 4
    assert flops.trunk_forward == trunk_fwd
    assert flops.trunk_backward == trunk_fwd            # weight gradient only: the image needs none
    assert flops.head_forward == head_fwd
    assert flops.head_backward == 2 * head_fwd          # weight and input gradients
    assert flops.conventional == 2 * trunk_fwd + 3 * head_fwd


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_memory_grows_with_the_image_no_faster_than_the_feature_map_and_its_gradient(dtype):
    """Same tiles, image side doubled: the step's peak grows by at most the growth of F + dF (a
    lazily read image takes no memory; the pool head's backward holds one F-sized gradient, where
    autograd's mean + amax held three F-sized tensors and grew 1.26x faster than F + dF here)."""
    model = build_model("tiny-cnn", head="pool", num_classes=3, in_channels=1, tile_size=256)
    peaks = {s: predict_step_memory(model, s, device="cpu", dtype=dtype, lazy_input=True).live_bytes
             for s in (1024, 2048)}
    element = 4 if dtype is None else 2
    f_and_df = {s: 2 * element * 64 * (s // 8) ** 2 for s in peaks}          # tiny-cnn: 64 channels, stride 8
    grown, bound = peaks[2048] - peaks[1024], f_and_df[2048] - f_and_df[1024]
    assert 0.5 * bound < grown <= bound, (grown, bound)
