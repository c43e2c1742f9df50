"""Trunks from torchvision and timm by name, and the local weights files they load.

``torchvision:<arch>`` and ``timm:<arch>`` resolve through :data:`SOURCES` (one factory
per ecosystem, no if/else chains); :func:`streamcnn.models.classifier.build_trunk` also keeps its
short names (``resnet18`` ...). Each factory builds the classification network without
downloading anything, loads ``weights`` from a local file if given, adapts the first
convolution to ``in_channels``, switches stochastic depth off unless asked for
(``stochastic_depth_prob`` / ``drop_path_rate``: streamed exactly, one mask per image for
every tile, see :mod:`streamcnn.engine.droppath`) and returns the layers before global
pooling with their output channels:

* torchvision: ``model.features`` where the model has one (VGG, DenseNet, MobileNet,
  EfficientNet, ConvNeXt, SqueezeNet), else its children before ``avgpool``/``fc``/
  ``classifier`` (ResNet, ResNeXt, Wide ResNet, RegNet, ShuffleNetV2);
* timm (optional extra, ``pip install -e ".[timm]"``): the model built with
  ``num_classes=0, global_pool=''``, run through ``forward_features``; classifier
  modules that ``forward_features`` never calls are removed.

Whether the result streams is decided later, by the geometry (which names the layer,
why and the fix when it does not).
"""
from __future__ import annotations

import difflib
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torchvision

from streamcnn.models.weights import adapt_in_channels, load_weights

__all__ = ["SOURCES", "register_source", "torchvision_trunk", "timm_trunk", "torchvision_features",
           "TimmFeatures", "disable_stochastic_depth"]

SourceFactory = Callable[..., "tuple[nn.Module, int]"]
SOURCES: dict[str, SourceFactory] = {}
TIMM_MISSING = 'timm is not installed; install the extra: pip install -e ".[timm]"'
_HEAD_NAMES = ("avgpool", "fc", "classifier", "head", "global_pool")


def register_source(prefix: str):
    """``@register_source("zoo")``: ``fn(arch, in_channels, weights, **kwargs) -> (trunk, channels)``
    serves the trunk names ``zoo:<arch>``."""
    def add(fn: SourceFactory) -> SourceFactory:
        SOURCES[prefix] = fn
        return fn
    return add


def _unknown(kind: str, arch: str, names: list[str], listing: str) -> ValueError:
    close = difflib.get_close_matches(arch, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown {kind} model {arch!r}{hint} (see {listing})")


def disable_stochastic_depth(model: nn.Module) -> nn.Module:
    """Set every stochastic-depth / drop-path probability in ``model`` to 0."""
    for m in model.modules():
        for attr in ("drop_prob", "p"):
            if type(m).__name__ in ("StochasticDepth", "DropPath") and hasattr(m, attr):
                setattr(m, attr, 0.0)
    return model


def _probe(trunk: nn.Module, in_channels: int) -> tuple[int, set[int]]:
    """Output channels of ``trunk`` on a small image, and the ids of the modules it called."""
    called: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _: called.add(id(mod))) for m in trunk.modules()]
    modes = [(m, m.training) for m in trunk.modules()]
    trunk.eval()
    ref = next(trunk.parameters())
    try:
        with torch.no_grad():
            out = trunk(torch.zeros(1, in_channels, 64, 64, device=ref.device, dtype=ref.dtype))
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return int(out.shape[1]), called


def torchvision_features(model: nn.Module) -> tuple[nn.Module, str]:
    """The layers of a torchvision classifier before global pooling, and their state-dict prefix."""
    if isinstance(getattr(model, "features", None), nn.Module):
        return model.features, "features."
    layers = OrderedDict()
    for name, child in model.named_children():
        if name in _HEAD_NAMES:
            break
        layers[name] = child
    return nn.Sequential(layers), ""


@register_source("torchvision")
def torchvision_trunk(arch: str, in_channels: int = 3, weights: str | Path | None = None,
                      **kwargs) -> tuple[nn.Module, int]:
    """A torchvision classification model's trunk; ``kwargs`` go to its builder."""
    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise _unknown("torchvision", arch, names, "torchvision.models.list_models()")
    try:
        net = torchvision.models.get_model(arch, weights=None, **kwargs)
    except NotImplementedError:  # builders that compute widths with tensors (RegNet) on the meta device
        with torch.device("cpu"):
            net = torchvision.models.get_model(arch, weights=None, **kwargs)
        net = net.to(torch.empty(0).device)
    trunk, prefix = torchvision_features(net)
    if weights is not None:
        head = tuple(f"{n}." for n in _HEAD_NAMES)
        load_weights(trunk, weights, f"torchvision {arch}", prefix=prefix,
                     ignore=lambda k: not k.startswith(prefix) or (not prefix and k.startswith(head)))
    adapt_in_channels(trunk, in_channels, pretrained=weights is not None)
    channels, _ = _probe(trunk, in_channels)
    return (trunk if "stochastic_depth_prob" in kwargs else disable_stochastic_depth(trunk)), channels


def _import_timm():
    try:
        import timm
    except ImportError:
        raise ImportError(TIMM_MISSING) from None
    return timm


class TimmFeatures(nn.Module):
    """A timm model seen through ``forward_features``: the feature map before pooling."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


@register_source("timm")
def timm_trunk(arch: str, in_channels: int = 3, weights: str | Path | None = None,
               **kwargs) -> tuple[nn.Module, int]:
    """A timm model's trunk (``forward_features``); ``kwargs`` go to ``timm.create_model``."""
    timm = _import_timm()
    if not timm.is_model(arch):
        raise _unknown("timm", arch, timm.list_models(), "timm.list_models()")
    net = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="", **kwargs)
    if weights is not None:
        classifier = net.pretrained_cfg.get("classifier") or "fc"
        load_weights(net, weights, f"timm {arch}", ignore=lambda k: k.startswith(f"{classifier}."))
    adapt_in_channels(net, in_channels, pretrained=weights is not None)
    trunk = TimmFeatures(net if "drop_path_rate" in kwargs else disable_stochastic_depth(net))
    channels, called = _probe(trunk, in_channels)
    for name, child in list(net.named_children()):
        if id(child) not in called and any(True for _ in child.parameters()):
            setattr(net, name, nn.Identity())  # e.g. ConvNeXt's head norm: no unused parameters
    return trunk, channels
