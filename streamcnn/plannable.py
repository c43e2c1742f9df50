"""What the planner needs of a model, and the copies it simulates and measures on.

A plannable model is a :class:`~streamcnn.models.StreamingClassifier`-like module: its
first convolution gives the input channels, its :class:`StreamingModule` s carry the
tiling knobs. :func:`model_copy` makes a copy with converted parameters (meta, fake or
real tensors) without copying the real weights.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .streaming import StreamingModule
from .units import pair

__all__ = ["streaming_modules", "meta_copy", "model_copy", "input_shape"]


def streaming_modules(model: nn.Module) -> list[StreamingModule]:
    """The :class:`StreamingModule` s inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, StreamingModule)]


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device (shapes only), made without copying weights."""
    return model_copy(model, lambda t: torch.empty_like(t, device="meta"))


def model_copy(model: nn.Module, convert: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are ``convert(t)``; the real
    tensors are never copied. Cached tiling geometry is shared, not copied."""
    memo: dict[int, object] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        new = convert(t.detach())
        memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    for s in streaming_modules(model):
        memo[id(s._geometry)] = s._geometry
        memo[id(s._plans)] = {}
    return copy.deepcopy(model, memo)


def _input_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.in_channels
    raise ValueError(f"{type(model).__name__} has no convolution to take the number of input channels from")


def input_shape(model: nn.Module, image_size: int | Sequence[int], batch: int) -> tuple[int, int, int, int]:
    """(N, C, H, W) of a batch of ``batch`` images of ``image_size`` for ``model``."""
    return (batch, _input_channels(model), *pair(image_size))
