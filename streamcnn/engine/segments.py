"""Running a trunk with activation checkpointing, in segments that start at heavy layers.

Used by :class:`~streamcnn.engine.streaming.StreamingModule` inside each tile's backward
recomputation (or over the whole image when it does not stream) when ``checkpoint`` is set.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as _checkpoint

__all__ = ["segments", "run"]


def segments(module: nn.Module) -> list[nn.Module]:
    """Checkpoint segments of ``module``.

    The leaves of nested ``nn.Sequential`` containers, grouped so that each segment
    starts at a convolution or a composite block (e.g. a residual block) and carries
    the light layers after it (norm, activation, pooling). A segment therefore never
    starts at an in-place activation, whose input the previous segment would have saved.
    """
    def leaves(m: nn.Module):
        if isinstance(m, nn.Sequential):
            for child in m:
                yield from leaves(child)
        else:
            yield m

    groups: list[list[nn.Module]] = []
    for leaf in leaves(module):
        heavy = isinstance(leaf, nn.modules.conv._ConvNd) or any(True for _ in leaf.children())
        if heavy or not groups:
            groups.append([leaf])
        else:
            groups[-1].append(leaf)
    return [g[0] if len(g) == 1 else nn.Sequential(*g) for g in groups]


def run(module: nn.Module, x: torch.Tensor, checkpoint: bool) -> torch.Tensor:
    """``module(x)``; with ``checkpoint`` and grad enabled, each segment's activations are recomputed."""
    if not checkpoint or not torch.is_grad_enabled():
        return module(x)
    for seg in segments(module):
        x = _checkpoint(seg, x, use_reentrant=False)
    return x
