"""The engine's public primitives: the streamed backward, tile-by-tile pooling, the element limit.

Every gradient is compared, in float64, with full-image autograd on the same model.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import streamcnn
from streamcnn.engine import streaming
from streamcnn.engine.pooling import global_mean_max
from streamcnn.engine.streaming import stream_backward
from streamcnn.models.classifier import build_model
from streamcnn.planning.tracking import LiveStorageTracker
from streamcnn.training.heatmaps import explain
from helpers import forward_backward, relative_error, resnet_trunk

EXACT = 1e-10


@pytest.mark.parametrize("tile_size", [40, None])
def test_stream_backward_gives_full_image_parameter_and_input_gradients(tile_size):
    trunk = resnet_trunk("resnet18", stages=2)
    engine = streamcnn.StreamingModule(trunk, tile_size)
    x = torch.randn(2, 3, 90, 110, dtype=torch.float64)
    params = list(trunk.parameters())
    weight = torch.randn(trunk(x).shape, dtype=torch.float64)
    _, g_ref, x_ref = forward_backward(trunk, params, x, weight)
    grad_x = torch.zeros_like(x)

    def add(tile, g):
        (t, b), (l, r) = tile.window
        grad_x[:, :, t:b, l:r] += g

    grads = stream_backward(engine, x, weight, params=params, on_input_grad=add)
    assert tile_size is None or len(engine.plan((90, 110)).tiles) > 1
    assert max(relative_error(a, b) for a, b in zip(g_ref, grads)) <= EXACT
    assert relative_error(x_ref, grad_x) <= EXACT
    with pytest.raises(ValueError, match="needs parameters or an input-gradient receiver"):
        stream_backward(engine, x, weight)


@pytest.mark.parametrize("pool", [None, "meanmax"])
def test_heatmap_input_gradient_equals_full_image_autograd(pool):
    torch.manual_seed(0)
    model = build_model("tiny-cnn", "pool", num_classes=3, in_channels=3, tile_size=24).double().eval()
    model.trunk.pool = pool                 # the map for the CAM is streamed whatever the trunk returns
    image = torch.rand(3, 70, 90, dtype=torch.float64)
    explained = explain(model, image, target=2)
    pixels = image[None].clone().requires_grad_(True)
    model.trunk.tile_size, model.trunk.pool = None, None
    logits = model(pixels)[0]
    logits[2].backward()
    assert len(streamcnn.tile_plan(model.trunk.geometry, (70, 90), 24).tiles) > 1
    assert relative_error(torch.from_numpy(explained.input_gradient), pixels.grad[0]) <= EXACT
    assert relative_error(explained.logits.double(), logits.detach()) <= 1e-6     # reported in float32


def _relu_trunk() -> nn.Module:
    """Convolutions whose ReLU leaves whole channels at zero: their maxima tie at every position."""
    torch.manual_seed(3)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1),
                          nn.ReLU()).double()
    with torch.no_grad():
        trunk[2].bias[:4] = -100.0                  # channels 0-3: zero everywhere
    return trunk


@pytest.fixture
def limited_cpu(monkeypatch):
    """The element limit, which applies to CUDA devices, applied to the CPU too."""
    monkeypatch.setattr(streaming, "LIMITED_DEVICES", ("cuda", "cpu"))


def test_pooled_streaming_equals_the_whole_map_head_with_ties_under_a_lowered_limit(limited_cpu):
    trunk = _relu_trunk()
    head = nn.Linear(24, 5).double()
    x = torch.full((2, 3, 64, 80), 0.5, dtype=torch.float64)     # flat, with one patch copied far apart:
    patch = torch.rand(2, 3, 6, 6, dtype=torch.float64)           # positive maxima tie within and across tiles
    x[:, :, 8:14, 8:14] = x[:, :, 44:50, 60:66] = patch
    params = list(trunk.parameters()) + list(head.parameters())
    weight = torch.randn(2, 5, dtype=torch.float64)

    def whole(inp):
        f = trunk(inp)
        return head(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1))

    features = trunk(x).detach()
    ties = (features == features.amax(dim=(2, 3), keepdim=True)).sum(dim=(2, 3))
    assert (ties[:, :4] == 32 * 40).all() and (ties[:, 4:] > 1).sum() > ties[:, 4:].numel() // 2  # dead, positive ties
    _, g_ref, x_ref = forward_backward(whole, params, x, weight)

    limit = features.numel() - 1                    # the whole map would reach the limit
    engine = streamcnn.StreamingModule(trunk, 16, forward_tile_size=40, pool="meanmax", max_elements=limit)
    assert len(engine.plan((64, 80)).tiles) >= 4
    _, g_str, x_str = forward_backward(lambda inp: head(engine(inp)), params, x, weight)
    assert max(relative_error(a, b) for a, b in zip(g_ref, g_str)) <= EXACT
    assert relative_error(x_ref, x_str) <= EXACT
    with torch.no_grad():                           # inference pools on the forward's own tiles
        assert relative_error(torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], 1), engine(x)) <= EXACT

    engine.pool = None
    with pytest.raises(ValueError) as error:
        engine(x)
    message = str(error.value)
    assert "\n" not in message and "feature map" in message and f"{limit:,}" in message and "pool='meanmax'" in message


def test_a_pooled_step_never_makes_a_tensor_the_size_of_the_feature_map():
    trunk = _relu_trunk()
    x = torch.rand(1, 3, 96, 96, dtype=torch.float64)
    map_elements = 12 * 48 * 48
    for pool, makes_map in ((None, True), ("meanmax", False)):
        engine = streamcnn.StreamingModule(trunk, 16, forward_tile_size=32, pool=pool)
        with LiveStorageTracker("cpu") as tracker:
            out = engine(x)
            out.backward(torch.ones_like(out))
        assert (tracker.largest_elements >= map_elements) == makes_map, (pool, tracker.largest_elements)


class ArraySource:
    """A RegionSource over a uint8 array (a slide read a window at a time)."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape = array, array.shape

    def read_region(self, top, left, height, width):
        return self.array[:, top:top + height, left:left + width]


def test_pooled_streaming_of_region_sources_with_checkpoints_equals_the_whole_map():
    trunk = _relu_trunk()
    images = [np.random.default_rng(i).integers(0, 256, size=(3, 70, 90), dtype=np.uint8) for i in range(2)]
    images[1][:, 10:30, 10:50] = 128                # flat: tied maxima
    dense = torch.from_numpy(np.stack(images)).double() / 255
    params = list(trunk.parameters())
    weight = torch.randn(2, 24, dtype=torch.float64)
    _, g_ref, _ = forward_backward(lambda inp: global_mean_max(trunk(inp)), params, dense, weight)
    engine = streamcnn.StreamingModule(trunk, 24, forward_tile_size=64, checkpoint=True, pool="meanmax")
    _, g_str, _ = forward_backward(lambda _: engine([ArraySource(a) for a in images]), params, torch.zeros(1), weight)
    assert len(engine.plan((70, 90)).tiles) > 4
    assert max(relative_error(a, b) for a, b in zip(g_ref, g_str)) <= EXACT


def test_pooled_streaming_under_bfloat16_autocast_is_close_to_the_whole_map():
    trunk = _relu_trunk().float()
    x = torch.rand(1, 3, 64, 80)
    params = list(trunk.parameters())
    weight = torch.randn(1, 24)

    def step(model):
        for p in params:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pooled = model(x)
        (pooled.float() * weight).sum().backward()
        return pooled, [p.grad.clone() for p in params]

    whole, g_whole = step(lambda inp: global_mean_max(trunk(inp)))
    pooled, g_pooled = step(streamcnn.StreamingModule(trunk, 16, pool="meanmax"))
    assert pooled.dtype == whole.dtype == torch.bfloat16 and pooled.shape == (1, 24)
    assert relative_error(whole.float(), pooled.float()) < 0.03
    for a, b in zip(g_whole, g_pooled):
        assert ((a - b).norm() / a.norm()).item() < 0.03


def test_pool_head_classifier_pools_in_the_trunk_and_other_heads_are_refused():
    torch.manual_seed(0)
    model = build_model("tiny-cnn", "pool", num_classes=2, in_channels=1, tile_size=16).double()
    x = torch.rand(1, 1, 48, 56, dtype=torch.float64)
    params = list(model.parameters())
    weight = torch.randn(1, 2, dtype=torch.float64)
    f_ref, g_ref, x_ref = forward_backward(model, params, x, weight)
    model.trunk.pool = "meanmax"
    for tile in (16, None):                         # streamed, and conventional (the map pooled whole)
        model.trunk.tile_size = tile
        f_str, g_str, x_str = forward_backward(model, params, x, weight)
        assert relative_error(f_ref, f_str) <= EXACT and relative_error(x_ref, x_str) <= EXACT
        assert max(relative_error(a, b) for a, b in zip(g_ref, g_str)) <= EXACT
    conv = build_model("tiny-cnn", "conv", num_classes=2, in_channels=1, tile_size=16, head_kwargs={"width": 8})
    conv.trunk.pool = "meanmax"
    with pytest.raises(ValueError, match=r"^the trunk pools tile by tile .*use the 'pool' head"):
        conv(x.float())
    with pytest.raises(ValueError, match=r"unknown pool 'mean'; choose one of meanmax or None"):
        streamcnn.StreamingModule(_relu_trunk(), 16, pool="mean")
    engine = streamcnn.StreamingModule(_relu_trunk(), 16)
    engine.pool = "max"
    with pytest.raises(ValueError, match=r"unknown pool 'max'"):
        engine(torch.zeros(1, 3, 32, 32, dtype=torch.float64))


def test_windows_and_whole_images_over_the_limit_are_refused_in_one_line(limited_cpu):
    trunk = _relu_trunk()
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^an input window of 1x3x\d+x\d+ = [\d,]+ elements reaches the limit of "
                                         r"1,000 elements .*Fix: a smaller tile_size"):
        streamcnn.StreamingModule(trunk, 32, max_elements=1000)(x)
    with pytest.raises(ValueError, match=r"^the image of 1x3x64x64 elements reaches the limit .*Fix: stream it"):
        streamcnn.StreamingModule(trunk, None, max_elements=1000)(x)
    assert streamcnn.StreamingModule(trunk, 32, max_elements=None)(x).shape == (1, 12, 32, 32)


def test_the_element_limit_leaves_cpu_computation_alone():
    trunk = _relu_trunk()
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    for tile in (32, None):
        assert streamcnn.StreamingModule(trunk, tile, max_elements=1000)(x).shape == (1, 12, 32, 32)
