"""Tiling geometry: sizes, windows and plans by interval arithmetic; refusals of non-local ops."""
from __future__ import annotations

import itertools
import pickle

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import streamcnn
from streamcnn.engine.geometry import Window
from helpers import assert_message, resnet_trunk


@pytest.mark.parametrize("layer", [
    nn.Conv2d(1, 1, k, stride=s, padding=p, dilation=d)
    for k, s, p, d in itertools.product((1, 2, 3, 7), (1, 2, 3), (0, 1, 3), (1, 2)) if p <= (k // 2) * d
] + [
    nn.MaxPool2d(k, stride=s, padding=p, dilation=d, ceil_mode=c)
    for k, s, p, d, c in itertools.product((2, 3), (1, 2, 3), (0, 1), (1, 2), (False, True)) if p <= k // 2
] + [
    nn.AvgPool2d(k, stride=s, padding=p, ceil_mode=c)
    for k, s, p, c in itertools.product((2, 3), (1, 2), (0, 1), (False, True)) if p <= k // 2
] + [nn.Conv2d(1, 1, 4, padding="same"), nn.Conv2d(1, 1, (3, 5), stride=(1, 2), padding="valid")])
def test_output_size_matches_torch(layer):
    geometry = streamcnn.TrunkGeometry(layer)
    for h, w in ((13, 16), (29, 31), (64, 57)):
        assert geometry.output_size((h, w)) == tuple(layer(torch.zeros(1, 1, h, w)).shape[2:])


def test_window_interval_arithmetic():
    w = Window(kernel=7, stride=2, pad_lo=3, pad_hi=3)
    assert w.input_interval(0, 1) == (-3, 4)
    assert w.input_interval(5, 9) == (7, 20)
    assert Window(3, 1, 2, 2, dilation=2).input_interval(10, 12) == (8, 14)


def test_resnet_strides_and_receptive_field():
    for arch, expected in (("resnet18", 435), ("resnet50", 427)):
        geometry = streamcnn.TrunkGeometry(resnet_trunk(arch, dtype=torch.float32))
        assert geometry.stride == geometry.output_stride == (32, 32)
        # one output position far from the borders: its window is the receptive field,
        # aligned down to the stride
        (top, bottom), (left, right) = geometry.input_window(((40, 41), (40, 41)), (4096, 4096))
        assert top % 32 == 0 and left % 32 == 0
        rf_end = 40 * 32 + expected // 2 + 16
        assert bottom - top >= expected and bottom - top < expected + 32, (arch, bottom - top)
        assert rf_end - 32 <= bottom <= rf_end + 32


@pytest.mark.parametrize("image,tile", [((331, 517), 64), ((331, 517), 100), ((97, 33), 7), ((2048, 1536), 512), ((500, 500), (96, 200))])
def test_tile_plan_partitions_the_feature_map(image, tile):
    trunk = resnet_trunk("resnet18", stages=3, dtype=torch.float32)
    plan = streamcnn.tile_plan(trunk, image, tile)
    out = plan.output_size
    covered = torch.zeros(out, dtype=torch.int32)
    for t in plan.tiles:
        (r0, r1), (c0, c1) = t.region
        covered[r0:r1, c0:c1] += 1
        (top, bottom), (left, right) = t.window
        assert top % plan.stride[0] == 0 and left % plan.stride[1] == 0
        assert 0 <= top < bottom <= image[0] and 0 <= left < right <= image[1]
        # the region's position inside the window's own output
        assert t.crop[0][0] == r0 - top // plan.stride[0] and t.crop[1][0] == c0 - left // plan.stride[1]
    assert bool((covered == 1).all()), "regions must partition the feature map"
    assert plan.grid[0] * plan.grid[1] == len(plan.tiles)
    sizes = [t.region[0][1] - t.region[0][0] for t in plan.tiles]
    assert max(sizes) - min(sizes) <= 1, "tiles are balanced"
    area = sum(t.window_shape[0] * t.window_shape[1] for t in plan.tiles)
    assert plan.overlap_factor == pytest.approx(area / (image[0] * image[1]))
    assert plan.overlap_factor >= 1.0
    assert str(plan).startswith(f"TilePlan({image[0]}x{image[1]} image")


def test_tile_size_rounds_down_to_stride():
    trunk = resnet_trunk("resnet18", stages=2, dtype=torch.float32)   # stride 8
    a = streamcnn.tile_plan(trunk, (256, 256), 70)
    b = streamcnn.tile_plan(trunk, (256, 256), 64)
    assert a.region_size == b.region_size == (8, 8)
    assert streamcnn.tile_plan(trunk, (256, 256), 3).region_size == (1, 1)
    with pytest.raises(ValueError, match="tile_size must be positive"):
        streamcnn.tile_plan(trunk, (256, 256), 0)


def test_image_too_small_is_reported():
    trunk = nn.Sequential(nn.Conv2d(1, 1, 5), nn.Conv2d(1, 1, 5))
    with pytest.raises(ValueError) as refused:
        streamcnn.TrunkGeometry(trunk).output_size((6, 6))
    assert_message(refused, "(6, 6)", "too small", "'1'", "size 2", "kernel extent 5")


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), inner)

    def forward(self, x):
        return self.features(x)


@pytest.mark.parametrize("inner,match", [  # every refusal names the module, the reason and the fix
    (nn.BatchNorm2d(4), r"features\.1 \(BatchNorm2d\): BatchNorm in training mode .*Fix: call streamcnn\.freeze_batchnorm"),
    (nn.GroupNorm(2, 4), r"features\.1 \(GroupNorm\): GroupNorm normalises.*Fix: normalise per pixel over channels"),
    (nn.InstanceNorm2d(4), r"features\.1 \(InstanceNorm2d\): InstanceNorm.*Fix: normalise per pixel over channels"),
    (nn.LayerNorm(32), r"features\.1 \(LayerNorm\): LayerNorm over the last dimension, which here is width, mixes "
                       r"positions\. Fix: normalise per pixel over channels"),
    (nn.Dropout(0.5), r"features\.1 \(Dropout\): dropout in training mode.*Fix: put dropout in the head"),
    (nn.Dropout2d(0.2), r"features\.1 \(Dropout2d\): dropout in training mode.*Fix: put dropout in the head"),
    (timm.layers.DropBlock2d(0.2), r"features\.1 \(DropBlock2d\): DropBlock \(p=0\.2\) in training mode .*"
                                   r"Fix: build the model with drop_block_rate=0"),
    (nn.AdaptiveAvgPool2d(1), r"features\.1 \(AdaptiveAvgPool2d\): adaptive/global pooling.*Fix: move it into the head"),
    (nn.Linear(32, 4), r"features\.1 \(Linear\): Linear layers mix all positions along the last dimension, which "
                       r"here is width\. Fix: move it into the head"),
    (nn.Upsample(scale_factor=2), r"features\.1 \(Upsample\): upsampling.*Fix: stream the encoder only"),
    (nn.PixelShuffle(2), r"features\.1 \(PixelShuffle\): unknown layer torch\.nn\.modules\.pixelshuffle\.PixelShuffle\. "
                         r"Fix: if it is local, describe it with streamcnn\.register_rule"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), r"features\.1 \(Conv2d\): circular padding.*"
                                                             r"Fix: use padding_mode='zeros'"),
])
def test_refusals_name_module_and_reason(inner, match):
    with pytest.raises(streamcnn.UnsupportedLayerError, match=match):
        streamcnn.StreamingModule(Wrapper(inner), 32)(torch.zeros(1, 3, 32, 32))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


class GlobalMean(nn.Module):
    def forward(self, x):
        return x - F.adaptive_avg_pool2d(x, 1)


class Rolled(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, dims=2)


class Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


@pytest.mark.parametrize("module,match", [
    (Attention(), r"attn \(MultiheadAttention\): attention mixes all positions\. Fix: move it into the head"),
    (GlobalMean(), r"adaptive_avg_pool2d.*adaptive/global pooling.*Fix: move it into the head"),
    (Rolled(), r"roll.*does not know.*Fix: if it is local, describe it with streamcnn\.register_rule"),
    (Branchy(), r"torch\.fx could not trace Branchy.*Fix: .*streamcnn\.split_model"),
    (nn.Sequential(nn.Conv2d(3, 3, 1), nn.Flatten()), r"1 \(Flatten\): flattening.*Fix: move it into the head"),
])
def test_refusals_of_functions_and_untraceable_modules(module, match):
    with pytest.raises(streamcnn.UnsupportedLayerError, match=match):
        streamcnn.TrunkGeometry(module)


def test_eval_mode_dropout_and_register_rule():
    class Blur(nn.Module):        # a user's local layer, declared with its window
        def forward(self, x):
            return F.avg_pool2d(x, 3, stride=1, padding=1)

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5).eval(), Blur())
    with pytest.raises(streamcnn.UnsupportedLayerError, match="avg_pool2d"):
        streamcnn.TrunkGeometry(net)
    streamcnn.register_rule(Blur, lambda m: (Window(3, 1, 1, 1), Window(3, 1, 1, 1)))
    x = torch.randn(1, 3, 60, 50, dtype=torch.float64)
    net = net.double()
    assert torch.allclose(streamcnn.StreamingModule(net, 8)(x), net(x), rtol=0, atol=1e-12)


def test_freeze_batchnorm_survives_train_and_pickling():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SyncBatchNorm(4))
    keys = list(net.state_dict())
    streamcnn.freeze_batchnorm(net)
    net.train()
    assert not net[1].training and not net[2].training and net.training
    assert net[1].weight.requires_grad and list(net.state_dict()) == keys
    assert isinstance(net[1], nn.BatchNorm2d) and isinstance(net[1], streamcnn.FrozenBatchNorm2d)
    clone = pickle.loads(pickle.dumps(net[1]))
    clone.train()
    assert not clone.training
    streamcnn.TrunkGeometry(net[:2])       # accepted
    with pytest.raises(ValueError) as refused:
        streamcnn.freeze_batchnorm(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1, track_running_stats=False)))
    assert_message(refused, "1", "BatchNorm", "track_running_stats=False")


def test_tile_plan_describes_regions_and_windows():
    trunk = resnet_trunk("resnet18", dtype=torch.float32)
    # tile 1184 px asks for 37-feature regions; balancing 64 features over 2 tiles gives 32
    assert str(streamcnn.tile_plan(trunk, 2048, 1184)) == (
        "TilePlan(2048x2048 image -> 64x64 features, 2x2 tiles: regions of 1024x1024 px (32x32 features), "
        "windows up to 1248x1248 px, overlap factor 1.440)")
    assert "regions of 64-96 x 64-96 px (2-3 x 2-3 features)" in str(streamcnn.tile_plan(trunk, (331, 517), 100))


class BatchSwapped(nn.Module):
    """Stochastic depth on a tensor whose first dimension holds channels, not the batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = torchvision.ops.StochasticDepth(0.5, "row")

    def forward(self, x):
        return self.drop(self.conv(x).transpose(0, 1)).transpose(0, 1)


def test_train_mode_stochastic_depth_needs_the_batch_first():
    streamcnn.TrunkGeometry(nn.Sequential(nn.Conv2d(3, 4, 3), torchvision.ops.StochasticDepth(0.5, "row")).train())
    streamcnn.TrunkGeometry(BatchSwapped().eval())
    with pytest.raises(streamcnn.UnsupportedLayerError) as refused:
        streamcnn.TrunkGeometry(BatchSwapped().train())
    assert_message(refused, "drop", "StochasticDepth", "first dimension", "not the batch")
