"""The model factory: every plan configuration computes the same function and gradients."""
from __future__ import annotations

import pytest
import torch

from streamcnn.planning.memory import predict_step_memory
from streamcnn.models.classifier import HEADS, TRUNKS, build_model, build_trunk
from helpers import assert_message, relative_error


def _gradients(model, x):
    model.zero_grad()
    logits = model(x)
    logits.logsumexp(dim=1).sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def test_plan_knobs_do_not_change_the_result():
    torch.manual_seed(0)
    model = build_model("resnet18", "conv", num_classes=5, in_channels=1, head_kwargs={"width": 32, "depth": 2}).double()
    with torch.no_grad():  # leave zero-init residuals: make every block contribute
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.rand(1, 1, 96, 200, dtype=torch.float64)
    ref_logits, ref = _gradients(model, x)
    for tile, checkpoint, head_checkpoint in ((64, False, False), (96, True, True), (None, True, False)):
        model.trunk.tile_size, model.trunk.checkpoint, model.head_checkpoint = tile, checkpoint, head_checkpoint
        logits, grads = _gradients(model, x)
        assert relative_error(ref_logits, logits) <= 1e-10
        assert all(relative_error(a, b) <= 1e-10 for a, b in zip(ref, grads)), (tile, checkpoint, head_checkpoint)


def test_grey_input_and_registries():
    assert {"resnet18", "resnet34", "resnet50"} <= set(TRUNKS) and {"pool", "conv"} <= set(HEADS)
    trunk, channels = build_trunk("resnet34", in_channels=1)
    assert channels == 512 and trunk.conv1.in_channels == 1
    assert not any(m.training for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with pytest.raises(ValueError) as error:
        build_trunk("resnet7")
    assert_message(error, "'resnet7'", "resnet101", "resnet18")      # the name at fault, and the choices
    with pytest.raises(ValueError) as error:
        build_model(head="mlp", num_classes=2)
    assert_message(error, "'mlp'", "conv", "pool")


def test_pretrained_weights_file(tmp_path):
    import torchvision

    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pt")
    trunk, _ = build_trunk("resnet18", in_channels=3, weights=tmp_path / "r18.pt")
    assert torch.equal(trunk.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    grey, _ = build_trunk("resnet18", in_channels=1, weights=tmp_path / "r18.pt")
    assert torch.allclose(grey.conv1.weight[:, 0], reference.conv1.weight.sum(dim=1))
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as error:
        build_trunk("resnet18", weights=tmp_path / "bad.pt")
    assert_message(error, "bad.pt", "resnet18", "state dict")


def test_offloaded_feature_map_lowers_predicted_device_memory():
    model = build_model("resnet18", "conv", num_classes=28, in_channels=1)
    model.trunk.tile_size = 1024
    on_device = predict_step_memory(model, 4096, device="cuda").allocated_bytes
    model.trunk.output_device = torch.device("cpu")
    offloaded = predict_step_memory(model, 4096, device="cuda").allocated_bytes
    # the peak is in a tile's backward: the feature map's gradient now waits on the host,
    # and only the tile's slice of it (1024 / 4096 of each side) comes to the device
    gradient = 512 * (4096 // 32) ** 2 * 4
    assert on_device - offloaded >= gradient * (1 - 1 / 16) - 2**20


def test_trunk_kwargs_reach_the_constructor_from_a_config_and_unknown_ones_are_named():
    from streamcnn.training.config import load_config
    from streamcnn.training.runner import build_training_model

    base = ["model.in_channels=1", "model.num_classes=3", "model.trunk=resnet50"]
    plain = build_training_model(load_config(overrides=base))
    wide = build_training_model(load_config(overrides=[*base, "model.trunk_kwargs={width_per_group: 96}"]))
    count = lambda m: sum(p.numel() for p in m.trunk.parameters())   # noqa: E731
    assert count(wide) > 1.5 * count(plain)      # torchvision ResNet(width_per_group=96): wider bottlenecks
    with pytest.raises(ValueError) as error:
        build_training_model(load_config(overrides=["model.in_channels=1", "model.num_classes=3",
                                                    "model.trunk_kwargs={depth: 2}"]))
    assert_message(error, "'depth'", "model.trunk_kwargs")
    patchgd = build_training_model(load_config(overrides=[*base, "model.mode=patchgd", "model.patch_size=32",
                                                          "model.trunk_kwargs={width_per_group: 96}"]))
    assert sum(p.numel() for p in patchgd.parameters()) > count(wide)
