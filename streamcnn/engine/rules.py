"""Layer rules: how each kind of layer depends on space, or why it cannot stream.

This module owns the registry the geometry consults (:mod:`streamcnn.engine.geometry` walks
the graph, :mod:`streamcnn.engine.node_rules` applies these rules to each ``torch.fx`` node).
A module rule gives the :class:`Window` along height and width; or it refuses with a
:class:`Refusal` that says why the layer is not local *and the fix for that kind of layer*
(move it into the head, use a variant without it, freeze it).

Modules are looked up by class (most specific first) or by ``"module.QualName"`` for
optional libraries (timm) that are never imported here; a subclass that overrides
``forward`` is traced through instead of trusting its base's rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn
from torchvision.models.shufflenetv2 import channel_shuffle as _tv_channel_shuffle
from torchvision.ops import StochasticDepth

from streamcnn.utils.units import pair as _pair

__all__ = ["Window", "POINTWISE", "Refusal", "UnsupportedLayerError", "register_rule", "conv_windows", "lookup",
           "function_rule", "is_drop_path", "is_leaf", "leaf_functions", "NCHW"]


class UnsupportedLayerError(ValueError):
    """A trunk contains an operation that cannot be streamed exactly.

    ``fixable`` is True when the layer becomes local by a change of mode or setting
    (train-mode BatchNorm, dropout, drop path), False when it is inherently global.
    """

    def __init__(self, message: str, *, fixable: bool = False):
        super().__init__(message)
        self.fixable = fixable


class Refusal(Exception):
    """Raised by a rule: ``why`` the op is not local and ``fix``, what to do instead."""

    def __init__(self, why: str, fix: str, fixable: bool = False):
        super().__init__(f"{why}. Fix: {fix}")
        self.why, self.fix, self.fixable = why, fix, fixable


@dataclass(frozen=True)
class Window:
    """How one spatial axis of a layer's output depends on its input.

    Output position ``j`` reads inputs ``j*stride - pad_lo + dilation*i`` for
    ``i in range(kernel)``. Pointwise layers are ``Window()``.
    """

    kernel: int = 1
    stride: int = 1
    pad_lo: int = 0
    pad_hi: int = 0
    dilation: int = 1
    ceil_mode: bool = False

    @property
    def extent(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    def output_size(self, n: int) -> int:
        span = n + self.pad_lo + self.pad_hi - self.extent
        if span < 0:
            raise ValueError(f"input of size {n} is smaller than the kernel extent {self.extent}")
        if not self.ceil_mode:
            return span // self.stride + 1
        out = -(-span // self.stride) + 1
        # PyTorch: the last pooling window must start inside the input or the left padding.
        if (out - 1) * self.stride >= n + self.pad_lo:
            out -= 1
        return out

    def input_interval(self, a: int, b: int) -> tuple[int, int]:
        """Input interval ``[lo, hi)`` read by output interval ``[a, b)`` (unclamped)."""
        return a * self.stride - self.pad_lo, (b - 1) * self.stride - self.pad_lo + self.extent


POINTWISE = Window()
Windows = "tuple[Window, Window]"
Layout = tuple  # tensor dim -> logical axis (0 batch, 1 channels, 2 height, 3 width)
NCHW: Layout = (0, 1, 2, 3)

# The fixes, one per kind of layer.
HEAD = "move it into the head, after the trunk (streamcnn.split_model(model) cuts a whole network there)"
FREEZE_BN = "call streamcnn.freeze_batchnorm(model) (running statistics; the affine weight and bias stay trainable)"
PER_PIXEL_NORM = ("normalise per pixel over channels instead (LayerNorm2d as in ConvNeXt, or frozen BatchNorm), "
                  "or " + HEAD)
SE_FIX = ("use a variant without SE (e.g. torchvision:mobilenet_v2, torchvision:regnet_x_400mf, timm:resnet50d, "
          "torchvision:convnext_tiny), or cut the trunk before it (streamcnn.split_model) and run it in the head")
REGISTER = "if it is local, describe it with streamcnn.register_rule(cls, rule); otherwise " + HEAD


def conv_windows(m: nn.Conv2d):
    """A convolution's window per axis (also the rule of a Conv2d subclass with its own forward)."""
    if m.padding_mode == "circular":
        raise Refusal("circular padding wraps around the image, so it is not local",
                      "use padding_mode='zeros', 'reflect' or 'replicate'")
    k, s, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
    if m.padding == "valid":
        pads = [(0, 0), (0, 0)]
    elif m.padding == "same":
        pads = []
        for ki, di in zip(k, d):
            total = di * (ki - 1)
            pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in _pair(m.padding)]
    return tuple(Window(k[i], s[i], pads[i][0], pads[i][1], d[i]) for i in range(2))


def _pool_windows(m: nn.Module):
    k = _pair(m.kernel_size)
    s = _pair(m.stride if m.stride is not None else m.kernel_size)
    p = _pair(m.padding)
    d = _pair(getattr(m, "dilation", 1))
    return tuple(Window(k[i], s[i], p[i], p[i], d[i], bool(m.ceil_mode)) for i in range(2))


def _pointwise(_: nn.Module):
    return POINTWISE, POINTWISE


def _batchnorm_windows(m: nn.modules.batchnorm._BatchNorm):
    if m.training or not m.track_running_stats or m.running_mean is None:
        raise Refusal("BatchNorm in training mode normalises with statistics of the whole batch and image, "
                      "so tiles would see different statistics", FREEZE_BN, fixable=True)
    return POINTWISE, POINTWISE


def _norm_act_windows(m: nn.Module):
    """timm's BatchNormAct2d: BatchNorm, then its ``drop`` and ``act`` submodules."""
    _batchnorm_windows(m)
    for child in (getattr(m, "drop", None), getattr(m, "act", None)):
        if child is not None and lookup(type(child))[1] is not None:
            lookup(type(child))[1](child)
        elif child is not None:
            raise Refusal(f"unknown activation {type(child).__name__}", REGISTER)
    return POINTWISE, POINTWISE


def _dropout_windows(m: nn.Module):
    if m.training and m.p > 0:
        raise Refusal("dropout in training mode draws a different mask per tile",
                      "put dropout in the head, or set p=0 / eval mode for the trunk", fixable=True)
    return POINTWISE, POINTWISE


def _drop_path_windows(m: nn.Module):
    # Stochastic depth keeps or drops a whole residual branch per sample (torchvision's "row" and
    # "batch" modes, timm's DropPath): local in training mode too, because the engine draws one
    # mask per image per step and replays it for every tile (streamcnn.engine.droppath).
    return POINTWISE, POINTWISE


def is_drop_path(m: nn.Module) -> bool:
    """True for a per-sample stochastic-depth layer (torchvision ``StochasticDepth``, timm ``DropPath``)
    that runs as one graph node (a subclass with its own ``forward`` is traced through instead)."""
    base, rule = lookup(type(m))
    return rule is _drop_path_windows and type(m).forward is base.forward


def _drop_block_windows(m: nn.Module):
    if m.training and getattr(m, "drop_prob", 0.0) > 0:
        raise Refusal(f"DropBlock (p={m.drop_prob}) in training mode drops spatial blocks placed at random over "
                      "the whole feature map, so tiles would draw different blocks",
                      "build the model with drop_block_rate=0, or put these modules in eval mode", fixable=True)
    return POINTWISE, POINTWISE


def _refuse(why: str, fix: str) -> Callable:
    def rule(_: nn.Module):
        raise Refusal(why, fix)
    return rule


ModuleRule = Callable[[nn.Module], "tuple[Window, Window]"]
_MODULE_RULES: dict[type | str, ModuleRule] = {}


def register_rule(cls: type | Callable, rule: Callable | None = None):
    """Teach the geometry a local module type (or function).

    For a module class, ``rule(module) -> (Window, Window)`` gives the window along
    height and width; it may raise :class:`Refusal`. Without ``rule`` the layer is
    pointwise. A plain function (e.g. a channel shuffle that reshapes channels only) is
    kept as one graph node; ``rule(*args, **kwargs)`` gets the call's arguments.
    Usable as a decorator. ``cls`` may also be a ``"module.QualName"`` string.
    """
    if isinstance(cls, (type, str)):
        _MODULE_RULES[cls] = rule or _pointwise
    else:
        _FUNCTION_RULES[cls] = rule or (lambda *a, **k: (POINTWISE, POINTWISE))
    return cls


register_rule(nn.Conv2d, conv_windows)
for _cls in (nn.MaxPool2d, nn.AvgPool2d):
    register_rule(_cls, _pool_windows)
for _cls in (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm):
    register_rule(_cls, _batchnorm_windows)
for _cls in ("timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct"):
    register_rule(_cls, _norm_act_windows)
for _cls in (nn.Dropout, nn.Dropout2d):
    register_rule(_cls, _dropout_windows)
for _cls in (StochasticDepth, "timm.layers.drop.DropPath"):
    register_rule(_cls, _drop_path_windows)
register_rule("timm.layers.drop.DropBlock2d", _drop_block_windows)
for _cls in (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Identity,
):
    register_rule(_cls)

GLOBAL_POOL = "adaptive/global pooling makes every output depend on the whole image"
_SE = ("squeeze-and-excitation: its global average pool gates every pixel's channels with a value computed "
       "from the whole image")
for _key, _why, _fix in (
    (nn.GroupNorm, "GroupNorm normalises over the whole spatial extent of each group", PER_PIXEL_NORM),
    (nn.modules.instancenorm._InstanceNorm, "InstanceNorm normalises over the whole image", PER_PIXEL_NORM),
    (nn.modules.pooling._AdaptiveAvgPoolNd, GLOBAL_POOL, HEAD),
    (nn.modules.pooling._AdaptiveMaxPoolNd, GLOBAL_POOL, HEAD),
    (nn.MultiheadAttention, "attention mixes all positions", HEAD),
    (nn.Flatten, "flattening destroys the spatial layout", HEAD),
    (nn.Upsample, "upsampling is not supported by the geometry yet", "stream the encoder only; " + HEAD),
    (nn.ConvTranspose2d, "transposed convolutions are not supported by the geometry yet",
     "stream the encoder only; " + HEAD),
    ("torchvision.ops.misc.SqueezeExcitation", _SE, SE_FIX),
    ("timm.layers.squeeze_excite.SEModule", _SE, SE_FIX),
    ("timm.layers.squeeze_excite.EffectiveSEModule", _SE, SE_FIX),
    ("timm.models._efficientnet_blocks.SqueezeExcite", _SE, SE_FIX),
    ("timm.layers.eca.EcaModule", "efficient channel attention (ECA) pools the whole image", SE_FIX),
    ("timm.layers.gather_excite.GatherExcite", "gather-excite pools over large parts of the image", SE_FIX),
    ("timm.layers.grn.GlobalResponseNorm",
     "global response normalisation (ConvNeXt V2) divides by each channel's L2 norm over the whole image",
     "use ConvNeXt V1 (torchvision:convnext_tiny, timm:convnext_atto ...), or cut the trunk before it "
     "(streamcnn.split_model) and run it in the head"),
):
    register_rule(_key, _refuse(_why, _fix))


def _class_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def lookup(cls: type) -> tuple[type | None, ModuleRule | None]:
    """The most specific registered class in ``cls``'s MRO and its rule."""
    for base in cls.__mro__:
        for key in (base, _class_key(base)):
            if key in _MODULE_RULES:
                return base, _MODULE_RULES[key]
    return None, None


def is_leaf(m: nn.Module) -> bool:
    """True when ``m`` is one graph node described by a rule (not traced through).

    A subclass that overrides its registered base's ``forward`` (e.g. LayerNorm2d, which
    permutes around ``F.layer_norm``) is traced through: its base's rule may not hold.
    """
    base, rule = lookup(type(m))
    return rule is not None and type(m).forward is base.forward


# -- functions and methods ---------------------------------------------------------------------
_FUNCTION_RULES: dict[Callable, Callable] = {}
register_rule(_tv_channel_shuffle)  # ShuffleNetV2: view/transpose over channels only


def leaf_functions() -> tuple[Callable, ...]:
    """Functions the tracer keeps as single nodes (``torch.fx`` autowrap)."""
    return tuple(_FUNCTION_RULES)


def function_rule(target: Callable) -> Callable | None:
    """The rule registered for a plain function (``register_rule(fn, rule)``), if any."""
    return _FUNCTION_RULES.get(target)
