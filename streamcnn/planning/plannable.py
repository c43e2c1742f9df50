"""What the planner needs of a model, and the copies it simulates and measures on.

:class:`Plannable` is the protocol: a ``trunk`` (:class:`StreamingModule`: its geometry
gives the tile plans, its FLOPs the cost), a ``head`` that runs on the feature map, and
:meth:`Plannable.configure_plan` to set a plan's knobs.
:class:`~streamcnn.models.classifier.StreamingClassifier` is one. :func:`model_copy` makes a copy
with converted parameters (meta, fake or real tensors) without copying the real weights.
"""
from __future__ import annotations

import copy
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn as nn

from streamcnn.engine.streaming import StreamingModule
from streamcnn.utils.units import pair

__all__ = ["Plannable", "meta_copy"]


@runtime_checkable
class Plannable(Protocol):
    """A model the planner can plan: ``head(trunk(images))`` with the knobs a plan sets."""

    trunk: StreamingModule
    head: nn.Module

    def configure_plan(self, *, tile_size: int | None, checkpoint: bool, head_checkpoint: bool,
                       output_device: torch.device | str | None, forward_tile_size: int | None = None,
                       pool: str | None = None) -> None:
        """Run as the plan says; none of the knobs changes the result. ``pool`` (only passed to
        a model with ``trunk_pools``, the tile-by-tile pool modes its head can start from):
        the trunk pools and the head starts after its pooling."""
        ...


def streaming_modules(model: nn.Module) -> list[StreamingModule]:
    """The :class:`StreamingModule` s inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, StreamingModule)]


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device (shapes only), made without copying weights."""
    return model_copy(model, lambda t: torch.empty_like(t, device="meta"))


def model_copy(model: nn.Module, convert: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are ``convert(t)``; the real
    tensors are never copied."""
    memo: dict[int, object] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        new = convert(t.detach())
        memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    return copy.deepcopy(model, memo)


def _input_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.in_channels
    raise ValueError(f"{type(model).__name__} has no convolution to take the number of input channels from")


def input_shape(model: nn.Module, image_size: int | Sequence[int], batch: int) -> tuple[int, int, int, int]:
    """(N, C, H, W) of a batch of ``batch`` images of ``image_size`` for ``model``."""
    return (batch, _input_channels(model), *pair(image_size))
