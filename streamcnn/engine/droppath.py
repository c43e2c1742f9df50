"""Exact streamed stochastic depth: one mask per image per step, replayed for every tile.

torchvision's ``StochasticDepth`` ("row": keep or drop the residual branch per sample,
"batch": once for the batch) and timm's ``DropPath`` multiply a branch by a random
per-sample mask drawn anew at every call. The engine calls each layer once per tile in the
forward and again per tile in the backward's recomputation, so left alone they would drop
different branches for different tiles of one image. :meth:`DropMasks.draw` draws each
active layer's mask once, as the layer itself would for the whole image (the same shape,
the same random draws in the same order, the same ``1 / keep`` scaling); inside
:meth:`DropMasks.replay` every call of the layer multiplies by that mask and draws nothing.
With the same seed, a streamed step therefore drops the same branches as the whole image.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from streamcnn.engine.rules import is_drop_path

__all__ = ["DropMasks", "replaying"]


def _drop_probability(m: nn.Module) -> float:
    return float(getattr(m, "p", getattr(m, "drop_prob", 0.0)) or 0.0)


@dataclass
class DropMasks:
    """The per-sample masks of a trunk's active drop-path layers for one step."""

    layers: list[nn.Module]
    masks: list[torch.Tensor]     # (N,) per sample, or (1,) for torchvision's "batch" mode

    @classmethod
    def draw(cls, trunk: nn.Module, batch: int, device: torch.device, dtype: torch.dtype) -> "DropMasks | None":
        """Masks for every drop-path layer of ``trunk`` in training mode with p > 0 (None if there is none)."""
        layers = [m for m in trunk.modules() if is_drop_path(m) and m.training and _drop_probability(m) > 0]
        if not layers:
            return None
        masks = []
        for m in layers:
            keep = 1.0 - _drop_probability(m)
            rows = 1 if getattr(m, "mode", "row") == "batch" else batch
            mask = torch.empty(rows, dtype=dtype, device=device).bernoulli_(keep)
            if keep > 0 and getattr(m, "scale_by_keep", True):
                mask.div_(keep)
            masks.append(mask)
        return cls(layers, masks)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Every call of a masked layer returns ``input * mask`` (the layer in eval mode draws nothing)."""
        handles = [m.register_forward_hook(_multiply_by(mask)) for m, mask in zip(self.layers, self.masks)]
        modes = [m.training for m in self.layers]
        for m in self.layers:
            m.train(False)
        try:
            yield
        finally:
            for m, mode in zip(self.layers, modes):
                m.train(mode)
            for handle in handles:
                handle.remove()


def _multiply_by(mask: torch.Tensor):
    def hook(_module: nn.Module, args: tuple, _output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return x * mask.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return hook


@contextmanager
def replaying(masks: DropMasks | None) -> Iterator[None]:
    """:meth:`DropMasks.replay`, or nothing when there are no masks."""
    if masks is None:
        yield
    else:
        with masks.replay():
            yield
