"""streamcnn.models.scratch: from-scratch trunks stream exactly, in train mode, and start as expected."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers import assert_message, assert_same_gradients
from streamcnn import StreamingModule, TrunkGeometry
from streamcnn.models.classifier import build_trunk, trunk_factory
from streamcnn.models.scratch import SCRATCH_KINDS, ChannelLayerNorm2d, scratch_resnet18

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", SCRATCH_KINDS)
def test_streams_exactly_in_float64(kind):
    torch.manual_seed(0)
    trunk, _ = scratch_resnet18(kind, in_channels=1, width=8)
    trunk = trunk.double().train()  # nothing in it depends on the mode
    with torch.no_grad():  # residual branches start at zero; make them count
        for name, p in trunk.named_parameters():
            if name.endswith(("bn2.weight", "conv2.gain")):
                p.uniform_(0.5, 1.5)
    streamed = StreamingModule(trunk, 64)
    assert len(streamed.plan((256, 192)).tiles) == 12
    assert_same_gradients(trunk, streamed, torch.rand(1, 1, 256, 192, dtype=torch.float64), tol=1e-10)


def test_channel_layernorm_normalises_each_pixel_over_channels_only():
    norm = ChannelLayerNorm2d(6).double()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64) * 3 + 1
    y = norm(x)
    assert torch.allclose(y.mean(dim=1), torch.zeros(2, 5, 7, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(y.var(dim=1, unbiased=False), torch.ones(2, 5, 7, dtype=torch.float64), atol=1e-5)
    # one pixel's output does not depend on another pixel
    x2 = x.clone()
    x2[:, :, 0, 0] += 5
    assert torch.equal(norm(x2)[:, :, 1:, :], y[:, :, 1:, :])


def test_every_block_starts_as_the_identity_and_weights_are_refused():
    trunk, channels = build_trunk("resnet18-ws-w16", in_channels=1)
    assert channels == 128 and callable(trunk_factory("resnet18-ln")) and callable(trunk_factory("resnet18-fixup-w8"))
    block = trunk.layer1[0]
    x = torch.rand(1, 16, 20, 20)
    assert torch.equal(block(x), torch.relu(x))
    TrunkGeometry(trunk)  # weight-standardised convolutions are still convolutions to the geometry
    with pytest.raises(ValueError) as error:
        build_trunk("resnet18-ln", weights="some.pth")
    assert_message(error, "resnet18-ln", "weights")


def _ws_name(sws_name: str) -> str:
    """The ws trunk's name of an sws trunk's parameter (the scale and bias sit in the affine after)."""
    module, _, leaf = sws_name.rpartition(".")
    if leaf == "weight":
        return f"{module}.parametrizations.weight.original"
    affine = module.replace("conv", "bn") if not module.endswith("downsample.0") else module[:-1] + "1"
    return f"{affine}.{'weight' if leaf == 'gain' else 'bias'}"


def test_sws_is_ws_with_the_affine_folded_into_the_convolution():
    trunks = {}
    for kind in ("ws", "sws"):
        torch.manual_seed(0)  # the same draws: the fold takes none
        trunks[kind] = scratch_resnet18(kind, in_channels=1, width=8, stages=2)[0].double()
    ws, sws = (dict(trunks[k].named_parameters()) for k in ("ws", "sws"))
    assert sorted(_ws_name(n) for n in sws) == sorted(ws)
    with torch.no_grad():
        for name, p in sws.items():
            if not name.endswith(".weight"):   # every scale and bias away from its start
                p.uniform_(-1.5, 1.5)
                ws[_ws_name(name)].copy_(p)
            assert torch.equal(p, ws[_ws_name(name)])
    assert not any(isinstance(m, nn.Module) and type(m).__name__ == "ChannelAffine" for m in trunks["sws"].modules())
    x = torch.rand(2, 1, 64, 48, dtype=torch.float64)
    out = {k: trunks[k](x) for k in trunks}
    torch.testing.assert_close(out["sws"], out["ws"], rtol=1e-12, atol=1e-12)
    for k in trunks:
        out[k].pow(2).sum().backward()
    for name, p in sws.items():
        torch.testing.assert_close(p.grad, ws[_ws_name(name)].grad, rtol=1e-10, atol=1e-12)


def test_sws_saves_less_for_backward_than_ws():
    from streamcnn.planning.memory import predict_step_memory
    from streamcnn.models.classifier import build_model

    peaks = {}
    for kind in ("ws", "sws"):
        model = build_model(f"resnet18-{kind}-w16-s2", "pool", num_classes=10, in_channels=1)
        peaks[kind] = predict_step_memory(model, (128, 128), batch=8, device="cpu").live_bytes
    # one activation fewer per convolution + affine pair: 11 of 64 x 64 and 32 x 32 feature maps
    assert peaks["sws"] < 0.8 * peaks["ws"]
