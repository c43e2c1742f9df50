"""Models by name: streamable trunks and the heads that sit on their feature maps.

Two timm-style registries (``TRUNKS``, ``HEADS``) and one factory, :func:`build_model`,
which returns a :class:`StreamingClassifier`: a trunk wrapped in a
:class:`~streamcnn.engine.streaming.StreamingModule` (conventional, checkpointed or streamed,
as a memory plan decides) followed by a head that runs conventionally on the feature
map. Trunk BatchNorm is always frozen (eval mode, affine trainable) so that every plan
computes the same function; without pretrained weights the last BatchNorm of each
residual block starts at zero (``zero_init_residual``), so each block starts as the
identity and the un-normalised trunk still trains.

Trunk names: the short names in ``TRUNKS`` (``resnet18`` ...) and ``torchvision:<arch>`` /
``timm:<arch>`` (:mod:`streamcnn.models.backbones`). No weights are downloaded: pass ``weights=``
a local file (:mod:`streamcnn.models.weights`).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from streamcnn.models.backbones import SOURCES, torchvision_trunk
from streamcnn.engine.batchnorm import freeze_batchnorm
from streamcnn.engine.pooling import global_mean_max
from streamcnn.engine.streaming import StreamingModule

__all__ = ["TRUNKS", "HEADS", "FAMILIES", "register_trunk", "register_head", "register_family", "trunk_factory",
           "trunk_families", "build_trunk", "build_head", "StreamingClassifier", "build_model"]

TrunkFactory = Callable[..., "tuple[nn.Module, int]"]
HeadFactory = Callable[..., nn.Module]
TRUNKS: dict[str, TrunkFactory] = {}
HEADS: dict[str, HeadFactory] = {}
#: Parametric trunk names, timm-style: the pattern users read -> fn(name) -> factory, or None
#: when ``name`` is not one of the family's (e.g. ``resnet18-<kind>[-w<width>][-s<stages>]``).
FAMILIES: dict[str, Callable[[str], "TrunkFactory | None"]] = {}


def _registrar(table: dict):
    def register(name: str):
        def add(fn):
            table[name] = fn
            return fn
        return add
    return register


register_trunk = _registrar(TRUNKS)   # @register_trunk("name"): fn(in_channels, weights) -> (trunk, channels)
register_head = _registrar(HEADS)     # @register_head("name"): fn(channels, num_classes, **kwargs) -> head
register_family = _registrar(FAMILIES)  # @register_family("pattern"): fn(name) -> factory or None


def _short_resnet(arch: str):
    def factory(in_channels: int = 3, weights: str | Path | None = None, **kwargs) -> tuple[nn.Module, int]:
        kwargs.setdefault("zero_init_residual", weights is None)
        return torchvision_trunk(arch, in_channels, weights, **kwargs)
    return factory


for _arch in ("resnet18", "resnet34", "resnet50", "resnet101"):  # = torchvision:<arch>, zero-init residuals
    register_trunk(_arch)(_short_resnet(_arch))


@register_trunk("tiny-cnn")
def tiny_cnn(in_channels: int = 1, weights=None, width: int = 16) -> tuple[nn.Module, int]:
    """Four 3x3 convolutions (strides 1, 2, 2, 2): a stride-8 trunk with a 29 px receptive field,
    for tests and smoke runs (it learns :class:`streamcnn.training.SyntheticTextures` in seconds)."""
    if weights is not None:
        raise ValueError("tiny-cnn has no pretrained weights; leave model.weights empty")
    layers = nn.Sequential()
    channels = in_channels
    for i, (out, stride) in enumerate([(width, 1), (2 * width, 2), (2 * width, 2), (4 * width, 2)]):
        layers.add_module(f"conv{i}", nn.Conv2d(channels, out, 3, stride=stride, padding=1))
        layers.add_module(f"relu{i}", nn.ReLU(inplace=True))
        channels = out
    return layers, channels


@register_head("pool")
def pool_head(channels: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """Global average + max pooling and a linear classifier."""
    return nn.Sequential(_GlobalPool(), nn.Dropout(dropout), nn.Linear(2 * channels, num_classes))


@register_head("conv")
def conv_head(channels: int, num_classes: int, width: int = 256, depth: int = 4, dropout: float = 0.0) -> nn.Module:
    """Strided 3x3 convolutions over the feature map, then global pooling.

    Each block halves the feature map, so ``depth`` blocks on a stride-32 trunk relate
    positions up to ``32 * 2**(depth+1)`` image pixels apart: far beyond the trunk's own
    receptive field (427 px for ResNet-50) and enough for digits of 2100 px. GroupNorm,
    not BatchNorm, because huge images come one or two per batch.
    """
    layers: list[nn.Module] = [nn.Conv2d(channels, width, 1, bias=False), nn.GroupNorm(8, width), nn.ReLU(inplace=True)]
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, width), nn.ReLU(inplace=True)]
    layers += [_GlobalPool(), nn.Dropout(dropout), nn.Linear(2 * width, num_classes)]
    return nn.Sequential(*layers)


class _GlobalPool(nn.Module):
    """Mean and max over positions (:func:`streamcnn.engine.pooling.global_mean_max`: its backward
    makes one feature-map-sized gradient, not three)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return global_mean_max(x)


def head_after_pool(head: nn.Module) -> nn.Module:
    """The layers of a pool head after its global pooling: what runs when the trunk pools tile by tile
    (``StreamingModule(pool="meanmax")`` returns what :class:`_GlobalPool` would)."""
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[0], _GlobalPool):
        return head[1:]
    raise ValueError("the trunk pools tile by tile (trunk.pool='meanmax') but the head does not start with global "
                     "mean + max pooling; use the 'pool' head, or set trunk.pool = None")


def trunk_factory(name: str) -> TrunkFactory:
    """The factory behind a trunk name: a short name in ``TRUNKS`` or ``<source>:<arch>``
    (``torchvision:convnext_tiny``, ``timm:resnet50d``; see :data:`streamcnn.models.backbones.SOURCES`)."""
    source, sep, arch = name.partition(":")
    if sep and source in SOURCES and arch:
        return partial(SOURCES[source], arch)
    if name in TRUNKS:
        return TRUNKS[name]
    for resolve in FAMILIES.values():
        factory = resolve(name)
        if factory is not None:
            return factory
    raise ValueError(f"unknown trunk {name!r}; choose one of {sorted(TRUNKS)} or "
                     f"{', '.join(trunk_families()[len(TRUNKS):])}")


def trunk_families() -> list[str]:
    """Every trunk name and name pattern, as a person reads them: the short names, the
    parametric families and the ``<source>:<arch>`` prefixes."""
    return [*sorted(TRUNKS), *sorted(FAMILIES), *(f"{s}:<arch>" for s in sorted(SOURCES))]


def build_trunk(name: str, in_channels: int = 3, weights: str | Path | None = None,
                **kwargs) -> tuple[nn.Module, int]:
    """A trunk by name, with frozen BatchNorm; returns (trunk, output channels).

    ``kwargs`` go to the model's constructor (e.g. ``depths=(1, 1)`` for a timm ConvNeXt,
    ``drop_path_rate=0.1``); keys the trunk does not take are a ``ValueError`` naming them.
    """
    try:
        trunk, channels = trunk_factory(name)(in_channels=in_channels, weights=weights, **kwargs)
    except TypeError as error:
        if not kwargs or "keyword argument" not in str(error):
            raise
        raise ValueError(f"trunk {name!r} does not take the arguments {sorted(kwargs)} ({error}): remove them from "
                         "model.trunk_kwargs") from None
    return freeze_batchnorm(trunk), channels


def build_head(name: str, channels: int, num_classes: int, **kwargs) -> nn.Module:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {sorted(HEADS)}")
    return HEADS[name](channels, num_classes, **kwargs)


def _saved_on(host: torch.device):
    """Autograd saves tensors on ``host`` and brings them back for the backward."""
    def pack(t: torch.Tensor):
        if t.device == host:
            return t.device, t
        if host.type == "cpu" and t.is_cuda:
            copy = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, device=host, pin_memory=True)
            return t.device, copy.copy_(t, non_blocking=True)
        return t.device, t.to(host)

    def unpack(packed) -> torch.Tensor:
        device, t = packed
        return t.to(device, non_blocking=True)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class StreamingClassifier(nn.Module):
    """``head(trunk(x))`` where the trunk streams, as ``self.trunk`` is configured.

    ``trunk.tile_size`` / ``trunk.checkpoint`` / ``trunk.output_device`` and
    ``head_checkpoint`` are the knobs a memory plan sets; none changes the result.
    When the feature map is kept off the head's device (offload), the head's saved
    activations are kept there too (``saved_tensors_hooks``), so the device holds the
    head's tensors only while they are computed.
    """

    def __init__(self, trunk: StreamingModule, head: nn.Module, head_checkpoint: bool = False):
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.head_checkpoint = head_checkpoint

    @property
    def trunk_pools(self) -> tuple[str, ...]:
        """The trunk's tile-by-tile pool modes this head can start from: ``("meanmax",)`` when
        its first layer is the global mean + max pooling (the pool head)."""
        first = self.head[0] if isinstance(self.head, nn.Sequential) and len(self.head) else None
        return ("meanmax",) if isinstance(first, _GlobalPool) else ()

    def configure_plan(self, *, tile_size: int | None, checkpoint: bool, head_checkpoint: bool,
                       output_device: torch.device | str | None, forward_tile_size: int | None = None,
                       pool: str | None = None) -> None:
        """Set the knobs a memory plan chooses (:class:`streamcnn.planning.plannable.Plannable`);
        ``pool``: the trunk pools tile by tile (one of :attr:`trunk_pools`) and the head starts after its pooling."""
        if pool is not None and pool not in self.trunk_pools:
            raise ValueError(f"this head cannot take a pooled trunk ({pool!r}); a pool head can")
        self.trunk.pool = pool
        self.trunk.tile_size = tile_size
        self.trunk.forward_tile_size = forward_tile_size
        self.trunk.checkpoint = checkpoint
        self.trunk.output_device = torch.device(output_device) if output_device is not None else None
        self.head_checkpoint = head_checkpoint

    def use_memory_format(self, memory_format: torch.memory_format) -> "StreamingClassifier":
        """Convert every parameter to ``memory_format`` and have the trunk read its windows in it
        (``torch.channels_last``: see :func:`streamcnn.utils.cpu.preferred_memory_format`)."""
        self.to(memory_format=memory_format)
        self.trunk.memory_format = memory_format
        return self

    def forward(self, x) -> torch.Tensor:
        features = self.trunk(x)
        device = next(self.head.parameters()).device
        host = features.device
        features = features.to(device, non_blocking=True)
        head = self.head if self.trunk.pool is None else head_after_pool(self.head)  # pooled by the trunk
        if self.head_checkpoint and torch.is_grad_enabled():
            run = lambda f: _checkpoint(head, f, use_reentrant=False)  # noqa: E731
        else:
            run = head
        if host == device or not torch.is_grad_enabled():
            return run(features)
        with _saved_on(host):
            return run(features)


def build_model(trunk: str = "resnet18", head: str = "conv", *, num_classes: int, in_channels: int = 3,
                weights: str | Path | None = None, tile_size: int | None = None, checkpoint: bool = False,
                head_checkpoint: bool = False, output_device: str | None = None,
                head_kwargs: dict | None = None, trunk_kwargs: dict | None = None) -> StreamingClassifier:
    """The standard model: a named trunk, streamed as configured, and a named head.

    ``num_classes`` comes from the data (there is no default); ``in_channels`` likewise
    for anything but RGB. ``trunk_kwargs`` / ``head_kwargs`` go to the trunk's / head's factory."""
    body, channels = build_trunk(trunk, in_channels, weights, **(trunk_kwargs or {}))
    streamed = StreamingModule(body, tile_size, checkpoint=checkpoint, output_device=output_device)
    return StreamingClassifier(streamed, build_head(head, channels, num_classes, **(head_kwargs or {})),
                               head_checkpoint)
