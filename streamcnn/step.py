"""The training step whose memory is predicted and measured, and the optimizers it may use.

:data:`OPTIMIZERS` is the one list of optimizers; :func:`training_step` is one step as
the trainer takes it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["OPTIMIZERS", "make_optimizer", "training_step"]

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": lambda params, foreach: torch.optim.AdamW(params, lr=1e-4, foreach=foreach),
    "adam": lambda params, foreach: torch.optim.Adam(params, lr=1e-4, foreach=foreach),
    "sgd": lambda params, foreach: torch.optim.SGD(params, lr=1e-2, momentum=0.9, foreach=foreach),
}


def make_optimizer(model: nn.Module, name: str, foreach: bool) -> torch.optim.Optimizer:
    """Optimizer ``name`` over ``model``'s trainable parameters, its state already allocated."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    optimizer = OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad], foreach)
    # Allocate the state as the first real step would, so the predicted step is a steady one.
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def training_step(model: nn.Module, images, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
                  autocast_dtype: torch.dtype | None, device_type: str) -> None:
    """One step as the trainer takes it: autocast forward, cross-entropy, backward, step, zero_grad."""
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
