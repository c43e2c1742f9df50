"""StreamingModule reproduces full-image outputs and gradients exactly."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import streamcnn
from helpers import assert_message, assert_same_gradients, forward_backward, randomise_batchnorm, relative_error, resnet_trunk

EXACT = 1e-10


@pytest.mark.parametrize("tile_size", [100, 160])
def test_resnet18_trunk_float64_exact(tile_size):
    trunk = resnet_trunk("resnet18")
    x = torch.randn(2, 3, 96, 480, dtype=torch.float64)
    streamed = streamcnn.StreamingModule(trunk, tile_size)
    plan = streamed.plan((96, 480))
    # only meaningful if some windows are real crops of the image
    assert plan.max_window[1] < 480 or any(0 < t.window[1][0] for t in plan.tiles)
    assert len(plan.tiles) > 1
    assert_same_gradients(trunk, streamed, x, EXACT)


def test_resnet50_trunk_float64_exact():
    trunk = resnet_trunk("resnet50")
    assert_same_gradients(trunk, streamcnn.StreamingModule(trunk, 64), torch.randn(1, 3, 96, 130, dtype=torch.float64), EXACT)


@pytest.mark.parametrize("tile_size", [64, (72, 96)])
def test_resnet50_two_stages_interior_windows_exact(tile_size):
    trunk = resnet_trunk("resnet50", stages=2)
    x = torch.randn(1, 3, 200, 208, dtype=torch.float64)
    streamed = streamcnn.StreamingModule(trunk, tile_size)
    plan = streamed.plan((200, 208))
    inner = [t for t in plan.tiles if 0 < t.window[0][0] and t.window[0][1] < 200 and 0 < t.window[1][0]]
    assert inner, "expected windows that are clamped on no side"
    assert_same_gradients(trunk, streamed, x, EXACT)


class EveryLayer(nn.Module):
    """Every supported layer kind, in odd configurations, with branches that merge."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 5, stride=2, padding=3, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.same = nn.Conv2d(8, 6, 4, padding="same")
        self.reflect = nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect")
        self.avg = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.avg2 = nn.AvgPool2d(2, ceil_mode=True)
        self.down = nn.Conv2d(12, 12, 1, stride=2)
        self.dpool = nn.MaxPool2d(3, stride=1, dilation=2)
        self.prelu = nn.PReLU(12)
        self.acts = nn.Sequential(nn.GELU(), nn.SiLU(), nn.LeakyReLU(0.1), nn.Hardswish(), nn.Identity(), nn.Dropout(0.0))
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 12).view(1, 12, 1, 1))

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.stem(x))))
        x = x + self.dilated(x)                                  # residual add
        a = self.same(x)
        b = self.reflect(x)
        y = torch.cat([a, b], dim=1).relu()                      # concat + method
        y = self.avg(y)
        z = self.acts(self.down(y)) * self.scale                 # broadcast parameter
        w = self.avg2(y)
        return self.prelu(self.dpool(torch.sigmoid(z) + w))


@pytest.mark.parametrize("tile_size", [8, 16, 17, 30, (24, 40), 1000])
@pytest.mark.parametrize("size", [(97, 131), (128, 64)])
def test_every_layer_kind_exact(tile_size, size):
    torch.manual_seed(1)
    net = EveryLayer().double()
    randomise_batchnorm(net)
    streamcnn.freeze_batchnorm(net)
    assert_same_gradients(net, streamcnn.StreamingModule(net, tile_size), torch.randn(2, 3, *size, dtype=torch.float64), EXACT)


class WholeMapPool(nn.Module):
    """The reference for ``pool="meanmax"``: the trunk on the whole image, then mean and max."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x):
        features = self.trunk(x)
        return torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)


@pytest.mark.parametrize("tile_size", [8, 17, (24, 40)])
def test_every_layer_kind_pooled_tile_by_tile_exact(tile_size):
    torch.manual_seed(1)
    net = EveryLayer().double()
    randomise_batchnorm(net)
    streamcnn.freeze_batchnorm(net)
    streamed = streamcnn.StreamingModule(net, tile_size, forward_tile_size=1000, pool="meanmax")
    assert_same_gradients(WholeMapPool(net), streamed, torch.randn(2, 3, 97, 131, dtype=torch.float64), EXACT)


def test_valid_padding_and_even_kernels_exact():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(2, 4, 4, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 2, stride=2, padding="valid"),
                        nn.AvgPool2d(2, count_include_pad=True, padding=1), nn.Conv2d(4, 3, 3, padding=1)).double()
    for tile in (8, 12, 20):
        assert_same_gradients(net, streamcnn.StreamingModule(net, tile), torch.randn(1, 2, 91, 77, dtype=torch.float64), EXACT)


@pytest.mark.parametrize("tile, forward_tile", [(48, 4096), ((64, 48), (96, 128)), (96, 32)])
def test_separate_forward_tiles_exact(tile, forward_tile):
    trunk = resnet_trunk("resnet18", stages=3)
    streamed = streamcnn.StreamingModule(trunk, tile, forward_tile_size=forward_tile)
    backward, forward = streamed.plan((130, 150)), streamed.forward_plan((130, 150))
    assert backward.grid != forward.grid and len(backward.tiles) > 1
    assert_same_gradients(trunk, streamed, torch.randn(2, 3, 130, 150, dtype=torch.float64), EXACT)


def test_channels_last_windows_exact():
    """A trunk converted to channels-last (the bf16 CPU default) is fed channels-last windows
    and gives the contiguous full-image gradients."""
    reference = resnet_trunk("resnet18", stages=3)
    trunk = copy.deepcopy(reference).to(memory_format=torch.channels_last)
    layouts = []
    trunk.register_forward_pre_hook(lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    streamed = streamcnn.StreamingModule(trunk, 48, forward_tile_size=96, memory_format=torch.channels_last)
    x = torch.randn(2, 3, 130, 150, dtype=torch.float64)
    f0, g0, x0 = forward_backward(reference, list(reference.parameters()), x)
    f1, g1, x1 = forward_backward(streamed, list(trunk.parameters()), x)
    assert layouts and all(layouts) and len(streamed.plan((130, 150)).tiles) > 1
    assert relative_error(f0, f1) <= EXACT and relative_error(x0, x1) <= EXACT
    assert max(relative_error(a, b) for a, b in zip(g0, g1)) <= EXACT


def test_checkpoint_inside_tile_exact():
    trunk = resnet_trunk("resnet18", stages=3)
    streamed = streamcnn.StreamingModule(trunk, 64, checkpoint=True)
    assert_same_gradients(trunk, streamed, torch.randn(2, 3, 128, 150, dtype=torch.float64), EXACT)


def test_conventional_mode_with_checkpoint_exact():
    trunk = resnet_trunk("resnet18", stages=2)
    streamed = streamcnn.StreamingModule(trunk, None, checkpoint=True)
    assert_same_gradients(trunk, streamed, torch.randn(1, 3, 120, 100, dtype=torch.float64), EXACT)


def test_float32_close():
    trunk = resnet_trunk("resnet18", dtype=torch.float32)
    assert_same_gradients(trunk, streamcnn.StreamingModule(trunk, 160), torch.randn(1, 3, 96, 480), 1e-4)


def test_image_smaller_than_tile_and_trainable_subset():
    trunk = resnet_trunk("resnet18", stages=2)
    for p in trunk[0].parameters():          # frozen stem: only the rest gets gradients
        p.requires_grad_(False)
    assert_same_gradients(trunk, streamcnn.StreamingModule(trunk, 4096), torch.randn(1, 3, 45, 70, dtype=torch.float64), EXACT)
    assert trunk[0].weight.grad is None


def test_optimizer_step_matches_conventional():
    trunk = resnet_trunk("resnet18", stages=2)
    twin = copy.deepcopy(trunk)
    x = torch.randn(1, 3, 100, 120, dtype=torch.float64)
    for model, params in ((trunk, trunk.parameters()), (streamcnn.StreamingModule(twin, 48), twin.parameters())):
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        for _ in range(2):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(trunk.parameters(), twin.parameters()):
        assert relative_error(a.detach(), b.detach()) <= EXACT


class ArraySource:
    """A RegionSource over a numpy array that records every region it is asked for."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = array.shape
        self.reads: list[tuple[int, int, int, int]] = []

    def read_region(self, top, left, height, width):
        self.reads.append((top, left, height, width))
        return self.array[:, top:top + height, left:left + width]


def test_region_source_input_reads_only_windows():
    trunk = resnet_trunk("resnet18", stages=2)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(3, 96, 140), dtype=np.uint8) for _ in range(2)]
    sources = [ArraySource(a) for a in images]
    streamed = streamcnn.StreamingModule(trunk, 48)
    params = list(trunk.parameters())
    weight = torch.randn(2, 128, 12, 18, dtype=torch.float64)
    f_src, g_src, _ = forward_backward(lambda _: streamed(sources), params, torch.zeros(1), weight)
    dense = torch.from_numpy(np.stack(images)).double() / 255
    f_ref, g_ref, _ = forward_backward(trunk, params, dense, weight)
    assert relative_error(f_ref, f_src) <= EXACT
    assert all(relative_error(a, b) <= EXACT for a, b in zip(g_ref, g_src))
    plan = streamed.plan((96, 140))
    expected = [(t.window[0][0], t.window[1][0], *t.window_shape) for t in plan.tiles]
    assert sources[0].reads == expected * 2          # each window once forward, once backward
    assert max(h * w for _, _, h, w in sources[0].reads) < 96 * 140
    # a whole-image forward reads the image once, then the backward's windows
    for s in sources:
        s.reads.clear()
    streamed.forward_tile_size = 4096
    f_whole, g_whole, _ = forward_backward(lambda _: streamed(sources), params, torch.zeros(1), weight)
    assert sources[0].reads == [(0, 0, 96, 140)] + expected
    assert relative_error(f_ref, f_whole) <= EXACT
    assert all(relative_error(a, b) <= EXACT for a, b in zip(g_ref, g_whole))


def test_single_region_source_and_bad_inputs():
    trunk = resnet_trunk("resnet18", stages=1)
    src = ArraySource(np.zeros((3, 64, 64), dtype=np.uint8))
    assert streamcnn.StreamingModule(trunk, 32)(src).shape == (1, 64, 16, 16)
    with pytest.raises(ValueError) as refused:
        streamcnn.StreamingModule(trunk, 32)(torch.zeros(3, 64, 64, dtype=torch.float64))
    assert_message(refused, "(N, C, H, W)", "(3, 64, 64)")
    with pytest.raises(TypeError, match="read_region"):
        streamcnn.StreamingModule(trunk, 32)("image.tif")
    with pytest.raises(ValueError, match="must share one shape"):
        streamcnn.StreamingModule(trunk, 32)([src, ArraySource(np.zeros((3, 64, 80), dtype=np.uint8))])


def test_output_device_and_no_grad_inference():
    trunk = resnet_trunk("resnet18", stages=2)
    x = torch.randn(1, 3, 100, 120, dtype=torch.float64)
    streamed = streamcnn.StreamingModule(trunk, 32, output_device="cpu")
    with torch.no_grad():
        out = streamed(x)
    assert out.device.type == "cpu" and not out.requires_grad
    assert relative_error(trunk(x).detach(), out) <= EXACT


def test_autocast_bfloat16_with_grad_scaler():
    trunk = resnet_trunk("resnet18", stages=2, dtype=torch.float32)
    x = torch.randn(1, 3, 128, 160)
    params = list(trunk.parameters())

    def scaled_step(model):
        for p in params:
            p.grad = None
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model(x)
            loss = features.float().square().mean()
        scaler.scale(loss).backward()
        return features, [p.grad / 256.0 for p in params], scaler

    f_ref, g_ref, _ = scaled_step(trunk)
    f_str, g_str, scaler = scaled_step(streamcnn.StreamingModule(trunk, 32))
    assert f_str.dtype == f_ref.dtype == torch.bfloat16
    # bf16 rounds crop and full-image convolutions differently: close, not bitwise
    assert relative_error(f_ref.float(), f_str.float()) < 0.03
    for a, b in zip(g_ref, g_str):
        assert ((a - b).norm() / a.norm()).item() < 0.03
    before = [p.detach().clone() for p in params]
    scaler.step(torch.optim.SGD(params, lr=0.1))
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


def test_plan_is_recomputed_when_modes_change():
    trunk = resnet_trunk("resnet18", stages=1)
    streamed = streamcnn.StreamingModule(trunk, 32)
    streamed(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    trunk[1].__class__ = nn.BatchNorm2d       # undo the freeze, then switch to training mode
    trunk.train()
    with pytest.raises(streamcnn.UnsupportedLayerError, match="freeze_batchnorm"):
        streamed(torch.randn(1, 3, 64, 64, dtype=torch.float64))
