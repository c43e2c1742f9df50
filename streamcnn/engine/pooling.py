"""Global mean + max pooling: over a whole feature map with a lean backward, or tile by tile.

``cat([F.mean((2, 3)), F.amax((2, 3))])`` per channel is the pool head's first layer. Its
gradient is the mean's share ``g / HW`` at every position plus the max's ``g / count``
split evenly between the tied maxima (as autograd's ``amax`` does). Two ways to compute it:

- :class:`GlobalMeanMax` (whole map): written naively, autograd's backward makes three
  map-sized tensors at once (the mean's expanded gradient, the max's masked gradient and
  their sum, plus a boolean mask). This writes the same gradient straight into one
  tensor, a few channels at a time, so a step grows with the image no faster than
  ``F + dF``.
- :class:`MeanMaxPool` (tile by tile, for :class:`~streamcnn.engine.streaming.StreamingModule`
  with ``pool="meanmax"``): the feature map never exists whole. The forward adds each tile's
  region to running sums and keeps each tile's maximum and number of ties per channel (a few
  numbers per tile); the backward gives each recomputed region its share of the gradient.
  Ties across tiles are counted globally, so the gradient is autograd's, ties included.
"""
from __future__ import annotations

import torch

__all__ = ["GlobalMeanMax", "global_mean_max", "MeanMaxPool", "POOLS"]

#: The pooling modes of :class:`~streamcnn.engine.streaming.StreamingModule` (``pool=``).
POOLS = ("meanmax",)

#: Channels per chunk of the backward: bounds the boolean mask and product temporaries.
_CHUNK_ELEMENTS = 2**20


class GlobalMeanMax(torch.autograd.Function):
    """``(N, C, H, W) -> (N, 2C)``: per channel, the mean then the max over positions."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        mean, amax = x.mean(dim=(2, 3)), x.amax(dim=(2, 3))
        ctx.save_for_backward(x, amax)
        return torch.cat([mean, amax], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, amax = ctx.saved_tensors
        n, c, h, w = x.shape
        g_mean, g_max = grad[:, :c], grad[:, c:]
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        step = max(1, _CHUNK_ELEMENTS // max(1, n * h * w))
        for c0 in range(0, c, step):
            part = slice(c0, min(c, c0 + step))
            mask = x[:, part] == amax[:, part, None, None]
            share = g_max[:, part, None, None] / mask.sum(dim=(2, 3), keepdim=True)
            torch.div(g_mean[:, part, None, None].expand(-1, -1, h, w), h * w, out=out[:, part])
            out[:, part].add_(mask.to(out.dtype).mul_(share))
        return out


def global_mean_max(x: torch.Tensor) -> torch.Tensor:
    """:class:`GlobalMeanMax` applied to ``x`` (N, C, H, W)."""
    return GlobalMeanMax.apply(x)


class MeanMaxPool:
    """Global mean + max of a feature map of ``output_size`` (H, W), accumulated tile by tile.

    :meth:`add` each tile's region in the order of the plan's tiles, :meth:`pooled` gives
    the (N, 2C) result; after it, :meth:`gradient` gives the gradient of a tile's region
    (recomputed with the same plan) from the gradient of the pooled result.
    """

    def __init__(self, output_size: tuple[int, int]):
        self.positions = output_size[0] * output_size[1]
        self.sums: torch.Tensor | None = None
        self.tile_max: list[torch.Tensor] = []     # per tile: (N, C) maximum of its region
        self.tile_ties: list[torch.Tensor] = []    # per tile: (N, C) positions equal to it
        self.amax: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def add(self, region: torch.Tensor) -> None:
        accumulate = torch.float64 if region.dtype == torch.float64 else torch.float32
        part = region.sum(dim=(2, 3), dtype=accumulate)
        self.sums = part if self.sums is None else self.sums.add_(part)
        local = region.amax(dim=(2, 3))
        self.tile_max.append(local)
        self.tile_ties.append((region == local[:, :, None, None]).sum(dim=(2, 3)))

    def pooled(self, dtype: torch.dtype) -> torch.Tensor:
        if self.sums is None:
            raise ValueError("no tile was pooled")
        maxima = torch.stack(self.tile_max)
        self.amax = maxima.amax(dim=0)
        on_max = maxima == self.amax
        self.count = (torch.stack(self.tile_ties) * on_max).sum(dim=0)
        mean = self.sums / self.positions
        return torch.cat([mean.to(dtype), self.amax.to(dtype)], dim=1)

    @property
    def tiles(self) -> int:
        return len(self.tile_max)

    def gradient(self, index: int, region: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """dL/d(region of tile ``index``) from ``grad`` = dL/d(pooled), (N, 2C).

        The maximum's share goes to the positions of the recomputed region that equal its
        own maximum, in tiles whose forward maximum was the global one.
        """
        if self.amax is None or self.count is None:
            raise ValueError("pooled() must run before gradient()")
        c = region.shape[1]
        g_mean, g_max = grad[:, :c].to(region.dtype), grad[:, c:].to(region.dtype)
        holds_max = (self.tile_max[index] == self.amax).to(region.device)
        share = torch.where(holds_max, g_max / self.count.to(region.device, region.dtype), 0)
        local = region.amax(dim=(2, 3), keepdim=True)
        out = (region == local).to(region.dtype).mul_(share[:, :, None, None])
        return out.add_((g_mean / self.positions)[:, :, None, None])
