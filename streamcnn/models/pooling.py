"""Global mean + max pooling whose backward allocates one feature-map-sized tensor.

A streamed trunk's feature map ``F`` and its gradient ``dF`` are the only tensors of a
training step that grow with the image (at 16384^2 px a ResNet-18's are 512 MiB each in
float32). Written as ``cat([F.mean(), F.amax()])``, autograd's backward makes three
``F``-sized tensors at once: the mean's expanded gradient, the max's masked gradient and
their sum (plus a boolean mask). :class:`GlobalMeanMax` computes the same gradient (the
mean's share ``g / HW`` everywhere, plus the max's ``g / count`` split evenly between tied
maxima, as autograd's ``amax`` does) straight into one tensor, a few channels at a time,
so the step's memory grows with the image no faster than ``F + dF``.
"""
from __future__ import annotations

import torch

__all__ = ["GlobalMeanMax", "global_mean_max"]

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
