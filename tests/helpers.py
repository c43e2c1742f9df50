"""Shared test utilities: reference gradients and trunks with randomised BatchNorm."""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

import streamcnn


def resnet_trunk(arch: str, stages: int = 4, dtype=torch.float64, seed: int = 0) -> nn.Sequential:
    """A torchvision ResNet trunk (stem + ``stages`` layers), frozen BN with random statistics."""
    torch.manual_seed(seed)
    r = getattr(torchvision.models, arch)(weights=None)
    layers = [r.conv1, r.bn1, r.relu, r.maxpool] + [getattr(r, f"layer{i}") for i in range(1, stages + 1)]
    trunk = nn.Sequential(*layers).to(dtype)
    randomise_batchnorm(trunk)
    return streamcnn.freeze_batchnorm(trunk)


def randomise_batchnorm(module: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so BN is not an identity."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def forward_backward(model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, weight: torch.Tensor | None = None):
    """Features, parameter gradients and input gradient of ``sum(model(x) * weight)``."""
    for p in params:
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    features = model(x)
    if weight is None:
        weight = torch.linspace(-1, 1, features.numel(), dtype=features.dtype).reshape(features.shape)
    (features * weight).sum().backward()
    return features.detach(), [p.grad.clone() for p in params], None if x.grad is None else x.grad.clone()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = a.abs().max().clamp_min(torch.finfo(a.dtype).tiny)
    return ((a - b).abs().max() / scale).item()


def assert_same_gradients(module: nn.Module, streamed: nn.Module, x: torch.Tensor, tol: float) -> None:
    """Streamed features, every parameter gradient and the input gradient match the module's."""
    params = [p for p in module.parameters() if p.requires_grad]
    f0, g0, x0 = forward_backward(module, params, x)
    f1, g1, x1 = forward_backward(streamed, params, x)
    assert f0.shape == f1.shape
    assert relative_error(f0, f1) <= tol, relative_error(f0, f1)
    for (name, _), a, b in zip(((n, p) for n, p in module.named_parameters() if p.requires_grad), g0, g1):
        assert relative_error(a, b) <= tol, (name, relative_error(a, b))
    assert relative_error(x0, x1) <= tol, relative_error(x0, x1)


def assert_message(error, *parts: str) -> str:
    """A message for a user: one line that names each of ``parts`` (the value at fault, the file, the
    setting to change), whatever the wording around them. ``error``: an exception or ``pytest.raises`` info."""
    message = str(getattr(error, "value", error))
    assert message.strip() and "\n" not in message.strip(), f"not one line: {message!r}"
    missing = [part for part in parts if part not in message]
    assert not missing, f"{message!r} does not name {missing}"
    return message
