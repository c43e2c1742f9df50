"""torchvision and timm families stream exactly (float64), or are refused with the reason and the fix.

Float64 at small odd image sizes, two tile sizes each. Models are the families' own
classes shrunk through their constructors (fewer blocks, fewer channels) so every layer
kind of the family is present and the tests stay fast; timm models go through the same
``build_trunk("timm:<arch>", **kwargs)`` path users take, torchvision ones through the
same trunk extraction (``torchvision_features``) as ``torchvision:<arch>`` names.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models import convnext, densenet, mobilenetv2, regnet, shufflenetv2

import streamcnn
from streamcnn.engine.droppath import DropMasks
from streamcnn.models.backbones import torchvision_features
from streamcnn.models.classifier import build_trunk
from helpers import assert_message, assert_same_gradients, forward_backward, randomise_batchnorm, relative_error

EXACT = 1e-10
timm = pytest.importorskip("timm")


def _randomise(trunk: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, norm affines and layer scales, so no layer is an identity."""
    randomise_batchnorm(trunk)
    with torch.no_grad():
        for name, p in trunk.named_parameters():
            if name.endswith(("layer_scale", "gamma")) or (p.dim() == 1 and "norm" in name):
                p.uniform_(0.5, 1.5)
    return trunk


def _tv(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return torchvision_features(model)[0]


FAMILIES = {  # name: (trunk factory, image size, two tile sizes, train mode)
    "torchvision-convnext": (lambda: _tv(convnext.ConvNeXt(
        [convnext.CNBlockConfig(8, 16, 1), convnext.CNBlockConfig(16, None, 2)], layer_scale=0.5)),
        (61, 83), (32, 40), True),
    "timm-convnext": (lambda: build_trunk("timm:convnext_atto", depths=(1, 2, 1, 1), dims=(8, 16, 16, 24),
                                          ls_init_value=0.5)[0], (97, 131), (64, 96), True),
    "timm-convnext-conv-mlp": (lambda: build_trunk("timm:convnext_atto", depths=(1, 1, 1, 1), dims=(8, 8, 16, 16),
                                                   conv_mlp=True, ls_init_value=0.5)[0], (99, 67), (32, 64), True),
    "timm-resnet-d": (lambda: build_trunk("timm:resnet18d", layers=(1, 1, 1, 1), stem_width=8,
                                          channels=(8, 16, 24, 32))[0], (193, 261), (64, 96), False),
    "densenet": (lambda: _tv(densenet.DenseNet(4, (2, 2), 8, bn_size=2)), (61, 83), (32, 40), False),
    "mobilenet-v2": (lambda: _tv(mobilenetv2.MobileNetV2(
        width_mult=0.25, inverted_residual_setting=[[1, 8, 1, 1], [6, 8, 2, 2], [6, 16, 1, 2]])),
        (61, 83), (32, 40), False),
    "regnet-x": (lambda: _tv(regnet.RegNet(regnet.BlockParams.from_init_params(
        depth=3, w_0=8, w_a=8.0, w_m=2.0, group_width=8))), (97, 67), (32, 48), False),
    "shufflenet-v2": (lambda: _tv(shufflenetv2.ShuffleNetV2([1, 1, 1], [8, 16, 32, 48, 64])),
                      (97, 131), (64, 96), False),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_streams_exactly(family):
    factory, size, tiles, train = FAMILIES[family]
    trunk = streamcnn.freeze_batchnorm(_randomise(factory().double())).train(train)
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    for tile in tiles:
        streamed = streamcnn.StreamingModule(trunk, tile)
        plan = streamed.plan(size)
        assert len(plan.tiles) > 1 and any(t.window_shape != size for t in plan.tiles)  # real crops
        assert_same_gradients(trunk, streamed, x, EXACT)


def test_split_model_trunk_streams_exactly():
    torch.manual_seed(0)
    model = shufflenetv2.ShuffleNetV2([1, 1, 1], [8, 16, 32, 48, 64], num_classes=5).double()
    streamcnn.freeze_batchnorm(_randomise(model))
    split = streamcnn.split_model(model)
    assert split.cut_after == "conv5.2" and split.stopped_at == "mean"
    assert "Tensor.mean over dims [2, 3] is global pooling. Fix: move it into the head" in split.reason
    x = torch.randn(2, 3, 97, 75, dtype=torch.float64)
    trunk, head = split
    assert torch.equal(head(trunk(x)), model(x))
    assert_same_gradients(trunk, streamcnn.StreamingModule(trunk, 32), x, EXACT)
    assert trunk.get_submodule("conv1.0") is model.conv1[0]        # shares the model's layers


def test_split_model_cuts_before_squeeze_excitation_and_refuses_fixable_layers():
    with torch.device("meta"):
        model = torchvision.models.mobilenet_v3_small()
    with pytest.raises(streamcnn.UnsupportedLayerError) as refused:
        streamcnn.split_model(model)
    assert_message(refused, "split_model", "features.0.1", "BatchNorm2d", "streamcnn.freeze_batchnorm(model)")
    split = streamcnn.split_model(streamcnn.freeze_batchnorm(model))
    assert split.cut_after == "features.1.block.0.2" and split.stopped_at == "features.1.block.1"
    assert "squeeze-and-excitation" in split.reason and "use a variant without SE" in split.reason
    assert streamcnn.TrunkGeometry(split.trunk).output_stride == (4, 4)


def _meta_trunk(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return build_trunk(name, **kwargs)[0]


@pytest.mark.parametrize("name,parts", [
    ("torchvision:efficientnet_b0", ("1.0.block.1", "SqueezeExcitation", "squeeze-and-excitation",
                                     "without SE", "torchvision:mobilenet_v2", "streamcnn.split_model")),
    ("torchvision:regnet_y_400mf", ("trunk_output.block1.block1-0.f.se", "SqueezeExcitation",
                                    "squeeze-and-excitation", "without SE")),
    ("timm:efficientnet_b0", ("model.blocks.0.0.se", "SqueezeExcite", "squeeze-and-excitation", "without SE")),
    ("timm:convnextv2_atto", ("grn", "GlobalResponseNorm", "global response normalisation", "ConvNeXt V1")),
])
def test_refused_families_name_the_layer_and_the_fix(name, parts):
    with pytest.raises(streamcnn.UnsupportedLayerError) as refused:
        streamcnn.TrunkGeometry(_meta_trunk(name))
    assert_message(refused, *parts)


def _net(layer: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), layer)


def test_train_mode_stochastic_depth_is_local_when_off_or_in_eval():
    for layer in (torchvision.ops.StochasticDepth(0.0, "row").train(), torchvision.ops.StochasticDepth(0.3, "row").eval(),
                  timm.layers.DropPath(0.3).eval()):
        streamcnn.TrunkGeometry(_net(layer))
    trunk = _meta_trunk("torchvision:convnext_tiny")      # named trunks switch stochastic depth off
    assert all(m.p == 0 for m in trunk.modules() if isinstance(m, torchvision.ops.StochasticDepth))
    streamcnn.TrunkGeometry(trunk.train())


def _with_drop_path(family: str, p: float) -> nn.Module:
    if family == "torchvision":
        return _tv(convnext.ConvNeXt([convnext.CNBlockConfig(8, 16, 1), convnext.CNBlockConfig(16, None, 2)],
                                     stochastic_depth_prob=p, layer_scale=0.5))
    torch.manual_seed(0)               # a named trunk keeps the drop path it is asked for
    return build_trunk("timm:convnext_atto", depths=(1, 2, 1, 1), dims=(8, 16, 16, 24), ls_init_value=0.5,
                       drop_path_rate=p)[0]


@pytest.mark.parametrize("family", ["torchvision", "timm"])
def test_train_mode_stochastic_depth_streams_with_the_whole_image_masks(family):
    """One mask per image per step, reused by every tile and the backward's recomputation: with the
    same seed, a streamed train-mode ConvNeXt drops the same branches as the whole image."""
    trunk = _randomise(_with_drop_path(family, 0.6)).double().train()
    layers = [m for m in trunk.modules() if isinstance(m, (torchvision.ops.StochasticDepth, timm.layers.DropPath))]
    assert all(m.training for m in layers) and sum(getattr(m, "p", getattr(m, "drop_prob", 0)) > 0 for m in layers) >= 2
    streamed = streamcnn.StreamingModule(trunk, 32, forward_tile_size=48, checkpoint=True)
    x = torch.randn(4, 3, 61, 83, dtype=torch.float64)
    assert len(streamed.plan((61, 83)).tiles) > 1
    params = [p for p in trunk.parameters() if p.requires_grad]
    results = []
    for model in (trunk, streamed):
        torch.manual_seed(7)
        results.append((*forward_backward(model, params, x), torch.get_rng_state()))
    (f0, g0, x0, rng0), (f1, g1, x1, rng1) = results
    assert relative_error(f0, f1) <= EXACT and relative_error(x0, x1) <= EXACT
    assert max(relative_error(a, b) for a, b in zip(g0, g1)) <= EXACT
    assert torch.equal(rng0, rng1)                  # the same random draws, once per layer
    torch.manual_seed(7)
    masks = torch.cat(DropMasks.draw(trunk, 4, torch.device("cpu"), torch.float64).masks)
    assert (masks == 0).any() and (masks > 0).any()             # some branches dropped, some kept
    assert all(m.training for m in layers)
    torch.manual_seed(8)
    assert relative_error(f0, streamed(x).detach()) > 1e-3      # other masks, other features


def test_image_channels_must_match_the_trunk_in_one_line():
    model = streamcnn.build_model("resnet18", "pool", num_classes=3, in_channels=3)
    for tile in (None, 64):
        model.trunk.tile_size = tile
        with pytest.raises(ValueError) as refused:
            model(torch.zeros(1, 1, 64, 64))
        assert_message(refused, "1 channel", "'conv1'", "3", "in_channels=1", "--in-channels")


@pytest.mark.parametrize("name,channels,stride", [
    ("torchvision:convnext_tiny", 768, 32), ("torchvision:densenet121", 1024, 32), ("torchvision:regnet_x_400mf", 400, 32),
    ("torchvision:shufflenet_v2_x0_5", 1024, 32), ("timm:resnet50d", 2048, 32), ("timm:convnext_atto", 320, 32),
    ("resnet18", 512, 32),
])
def test_names_resolve_to_streamable_trunks(name, channels, stride):
    with torch.device("meta"):
        trunk, out = build_trunk(name, in_channels=1)
    assert out == channels
    geometry = streamcnn.TrunkGeometry(trunk)
    assert geometry.output_stride == (stride, stride) and geometry.first_conv[1] == 1


def test_unknown_names_and_missing_timm(monkeypatch):
    with pytest.raises(ValueError) as refused:
        build_trunk("torchvision:convnext_tiniest")
    assert_message(refused, "'convnext_tiniest'", "torchvision", "convnext_tiny")
    with pytest.raises(ValueError) as refused:
        build_trunk("vgg")
    # one line: the name at fault and every way to name a trunk
    assert_message(refused, "'vgg'", "resnet18", "timm:<arch>", "torchvision:<arch>")
    monkeypatch.setitem(__import__("sys").modules, "timm", None)
    with pytest.raises(ImportError) as refused:
        build_trunk("timm:resnet50d")
    assert_message(refused, "timm", "not installed", 'pip install -e ".[timm]"')


def test_weights_from_torchvision_state_dict_for_any_family(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.mobilenet_v2()
    torch.save(reference.state_dict(), tmp_path / "mnv2.pth")
    trunk, _ = build_trunk("torchvision:mobilenet_v2", in_channels=1, weights=tmp_path / "mnv2.pth")
    assert torch.equal(trunk[18][0].weight, reference.features[18][0].weight)
    assert torch.allclose(trunk[0][0].weight[:, 0], reference.features[0][0].weight.sum(dim=1))
    trunk, _ = build_trunk("torchvision:mobilenet_v2", in_channels=4, weights=tmp_path / "mnv2.pth")
    assert torch.allclose(trunk[0][0].weight[:, 3], reference.features[0][0].weight.sum(dim=1) / 4)
    with pytest.raises(ValueError) as refused:
        build_trunk("torchvision:mobilenet_v3_small", weights=tmp_path / "mnv2.pth")
    assert_message(refused, "mnv2.pth", "mobilenet_v3_small", "missing")


def test_weights_from_timm_checkpoints_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    kwargs = dict(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16))
    torch.manual_seed(2)
    reference = timm.create_model("convnext_atto", num_classes=7, **kwargs)   # any classifier: it is dropped
    state = reference.state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pth.tar")
    save_file(state, str(tmp_path / "model.safetensors"))
    for name in ("ckpt.pth.tar", "model.safetensors"):
        trunk, channels = build_trunk("timm:convnext_atto", in_channels=1, weights=tmp_path / name, **kwargs)
        assert channels == 16
        assert torch.equal(trunk.model.stages[3].blocks[0].mlp.fc2.weight, reference.stages[3].blocks[0].mlp.fc2.weight)
        stem = trunk.model.stem[0]                              # the first conv has a bias: kept
        assert torch.allclose(stem.weight[:, 0], reference.stem[0].weight.sum(dim=1))
        assert torch.equal(stem.bias, reference.stem[0].bias)
        assert isinstance(trunk.model.head, nn.Identity)        # unused classifier parameters removed
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError) as refused:
        build_trunk("timm:convnext_atto", weights=tmp_path / "broken.safetensors", **kwargs)
    assert_message(refused, "broken.safetensors", "not a readable weights file")
    with pytest.raises(FileNotFoundError) as refused:
        build_trunk("timm:convnext_atto", weights=tmp_path / "nothere.pt", **kwargs)
    assert_message(refused, "nothere.pt", "not found")


def test_plan_cli_takes_ecosystem_names_and_says_what_is_wrong_in_one_line(capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("plan_cli", Path(__file__).parents[1] / "tools" / "plan.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.build_parser().parse_args(["--model", "timm:resnet50d", "--image-size", "64", "--budget", "1GB",
                                     "--num-classes", "2"]).model \
        == "timm:resnet50d"
    for model, error in (("torchvision:convnext_tiniest", "unknown torchvision model 'convnext_tiniest'"),
                         ("torchvision:efficientnet_b0", "1.0.block.1 (SqueezeExcitation): squeeze-and-excitation")):
        assert cli.main(["--model", model, "--image-size", "256", "--budget", "1GB", "--device", "cpu",
                         "--num-classes", "2"]) == 1
        err = capsys.readouterr().err
        assert "error: " in err and error in err and err.count("\n") == 1      # one line naming the cause
