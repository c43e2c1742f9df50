"""Trunks that train from scratch and still stream exactly: ResNet-18 layouts without batch statistics.

A streamed trunk cannot use train-mode BatchNorm (its statistics span the whole image and
batch, so tiles would see different ones), and no ImageNet weights can be downloaded here.
These are ResNet-18 layouts (a 7x7 stride-2 stem, max pooling, four stages of two
torchvision ``BasicBlock`` s, widths ``w, 2w, 4w, 8w``) whose normalisation is local, so
every plan computes the same function:

- ``affine``: a per-channel scale and bias where BatchNorm was; the last one of each
  residual branch starts at zero. This is what a frozen, freshly initialised BatchNorm is,
  i.e. what ``resnet18`` without weights trains as (the reference for the others).
- ``fixup``: ``affine`` plus Fixup's rescaling (Zhang et al. 2019): the first convolution of
  each residual branch is scaled by ``L ** -0.5`` for ``L`` residual blocks.
- ``ws``: weight standardisation (every convolution's filters standardised to zero mean and
  unit variance, times the He gain ``sqrt(2 / fan_in)``) with the ``affine`` scale and bias.
- ``ln``: :class:`ChannelLayerNorm2d`, ConvNeXt's LayerNorm2d: every pixel's channel vector
  normalised on its own (local, so exact under streaming, in train mode too).
- ``sws``: ``ws`` with each scale and bias folded into the convolution before it
  (:class:`ScaledStdConv2d`, as NF-ResNets do): the same function of the same parameters, so the
  same training, but one pass over each activation fewer forward and backward and one saved
  activation fewer per convolution; and the stem's max pooling before its ReLU (they commute:
  the same values and gradients), so the ReLU runs on a map 4x smaller (``docs/learning.md``,
  the default run, has the figures).

One parametric family of trunk names (:func:`scratch_factory`, timm-style), not a name per
variant: ``resnet18-<kind>`` (width 64, four stages), ``resnet18-<kind>-w<width>`` for any
width, and ``-s<stages>`` for the first 1..3 stages only (``-s2``: stride 8, receptive field
99 px, the miniature benchmark's trunk, see ``docs/learning.md``). ``docs/learning.md`` has the pilot that chose between them.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torchvision.models.resnet import BasicBlock, conv1x1

from streamcnn.engine.geometry import register_rule
from streamcnn.engine.rules import conv_windows
from streamcnn.models.classifier import register_family

__all__ = ["ChannelLayerNorm2d", "ChannelAffine", "ScaledStdConv2d", "scratch_resnet18", "scratch_factory", "SCRATCH_KINDS"]


@register_rule
class ChannelLayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel separately (ConvNeXt's LayerNorm2d)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


@register_rule
class ChannelAffine(nn.Module):
    """A per-channel scale and bias (a BatchNorm without statistics)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def _standardise(weight: torch.Tensor, eps: float, gain: torch.Tensor | None = None) -> torch.Tensor:
    """Filters at zero mean and unit variance times the He gain (times ``gain`` per filter)."""
    fan_in = weight[0].numel()
    mean = weight.mean(dim=(1, 2, 3), keepdim=True)
    var = weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
    scale = torch.rsqrt(var * fan_in / 2 + eps / fan_in)
    return (weight - mean) * (scale if gain is None else scale * gain[:, None, None, None])


class _Standardised(nn.Module):
    """Weight standardisation with the He gain, as a parametrisation of a convolution's weight."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _standardise(weight, self.eps)


class ScaledStdConv2d(nn.Conv2d):
    """A weight-standardised convolution followed by a per-channel scale (``gain``) and bias,
    computed as one convolution with standardised weights times ``gain``."""

    def __init__(self, conv: nn.Conv2d, affine: ChannelAffine, eps: float = 1e-5):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, bias=True)
        self.eps = eps
        self.gain = nn.Parameter(affine.weight.detach().clone())
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            self.bias.copy_(affine.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _standardise(self.weight, self.eps, self.gain), self.bias)


register_rule(ScaledStdConv2d, conv_windows)  # its own forward, the same window as any convolution


def _fold_affines(trunk: nn.Sequential) -> None:
    """Replace every convolution + :class:`ChannelAffine` pair by one :class:`ScaledStdConv2d`."""
    pairs = [(trunk, "conv1", "bn1")]
    for block in trunk.modules():
        if isinstance(block, BasicBlock):
            pairs += [(block, "conv1", "bn1"), (block, "conv2", "bn2")]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    for parent, conv, affine in pairs:
        setattr(parent, conv, ScaledStdConv2d(getattr(parent, conv), getattr(parent, affine)))
        setattr(parent, affine, nn.Identity())


def _stage(inplanes: int, planes: int, stride: int, norm: Callable[[int], nn.Module]) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(conv1x1(inplanes, planes, stride), norm(planes))
    return nn.Sequential(BasicBlock(inplanes, planes, stride, downsample, norm_layer=norm),
                         BasicBlock(planes, planes, 1, None, norm_layer=norm))


SCRATCH_KINDS = ("affine", "fixup", "ws", "ln", "sws")


def scratch_resnet18(kind: str, in_channels: int = 3, width: int = 64, stages: int = 4) -> tuple[nn.Sequential, int]:
    """A ResNet-18 layout of ``kind`` (one of :data:`SCRATCH_KINDS`) up to stage ``stages``
    (1..4; 2 stops at stride 8 with a 99 px receptive field); returns (trunk, channels)."""
    if kind not in SCRATCH_KINDS:
        raise ValueError(f"unknown from-scratch trunk kind {kind!r}; choose one of {SCRATCH_KINDS}")
    norm = ChannelLayerNorm2d if kind == "ln" else ChannelAffine
    trunk = nn.Sequential()
    trunk.add_module("conv1", nn.Conv2d(in_channels, width, 7, 2, 3, bias=False))
    trunk.add_module("bn1", norm(width))
    stem = [("relu", nn.ReLU(inplace=True)), ("maxpool", nn.MaxPool2d(3, 2, 1))]
    for name, layer in (stem[::-1] if kind == "sws" else stem):  # sws: the ReLU on the pooled, 4x smaller map
        trunk.add_module(name, layer)
    planes = width
    for i, (out, stride) in enumerate([(width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)][:stages], 1):
        trunk.add_module(f"layer{i}", _stage(planes, out, stride, norm))
        planes = out
    blocks = [m for m in trunk.modules() if isinstance(m, BasicBlock)]
    for m in trunk.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    with torch.no_grad():
        for block in blocks:
            block.bn2.weight.zero_()  # each residual branch starts as zero: the block is the identity
            if kind == "fixup":
                block.conv1.weight.mul_(len(blocks) ** -0.5)
    if kind == "sws":
        with torch.random.fork_rng(devices=[]):  # draws nothing: a seed gives the ws trunk's weights
            _fold_affines(trunk)
    if kind == "ws":
        for m in list(trunk.modules()):
            if isinstance(m, nn.Conv2d):
                parametrize.register_parametrization(m, "weight", _Standardised())
    return trunk, planes


_NAME = re.compile(r"resnet18-(?P<kind>[a-z]+)(?:-w(?P<width>[1-9][0-9]*))?(?:-s(?P<stages>[1-4]))?")


@register_family("resnet18-<kind>[-w<width>][-s<stages>] (kind: " + ", ".join(SCRATCH_KINDS) + ")")
def scratch_factory(name: str) -> Callable[..., tuple[nn.Module, int]] | None:
    """The factory of a from-scratch trunk name (``resnet18-ws-w16-s2``: kind ``ws``, width 16,
    two stages), or None when ``name`` is not one."""
    match = _NAME.fullmatch(name)
    if match is None or match["kind"] not in SCRATCH_KINDS:
        return None
    kind, width, stages = match["kind"], int(match["width"] or 64), int(match["stages"] or 4)

    def factory(in_channels: int = 3, weights=None) -> tuple[nn.Module, int]:
        if weights is not None:
            raise ValueError(f"{name} trains from scratch and has no pretrained weights; leave model.weights empty")
        return scratch_resnet18(kind, in_channels, width, stages)

    return factory
