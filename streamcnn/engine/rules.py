"""Layer rules: how each operation of a trunk depends on space, or why it cannot stream.

This module owns the registry the geometry consults (:mod:`streamcnn.engine.geometry` walks
the graph; this says what each node does). Every rule answers for one ``torch.fx``
node: the :class:`Window` along height and width, and the tensor layout it produces;
or it refuses with a :class:`Refusal` that says why the op is not local *and the fix
for that kind of layer* (move it into the head, use a variant without it, freeze it).

Layouts: the geometry follows which tensor dimension holds batch, channels, height and
width (``(0, 1, 2, 3)`` is NCHW), so the channels-last pattern of ConvNeXt
(``permute(0, 2, 3, 1)``, ``LayerNorm``/``Linear`` over the last dimension, permute back)
is recognised as per-pixel and local, in train mode too, while the same layers over a
spatial dimension are refused. Modules are looked up by class (most specific first) or
by ``"module.QualName"`` for optional libraries (timm) that are never imported here; a
subclass that overrides ``forward`` is traced through instead of trusting its base's rule.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.shufflenetv2 import channel_shuffle as _tv_channel_shuffle
from torchvision.ops import StochasticDepth

from streamcnn.utils.units import pair as _pair

__all__ = ["Window", "POINTWISE", "Refusal", "UnsupportedLayerError", "register_rule", "conv_windows", "node_rule",
           "is_leaf", "leaf_functions", "NCHW"]


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
        if child is not None and _lookup(type(child))[1] is not None:
            _lookup(type(child))[1](child)
        elif child is not None:
            raise Refusal(f"unknown activation {type(child).__name__}", REGISTER)
    return POINTWISE, POINTWISE


def _dropout_windows(m: nn.Module):
    if m.training and m.p > 0:
        raise Refusal("dropout in training mode draws a different mask per tile",
                      "put dropout in the head, or set p=0 / eval mode for the trunk", fixable=True)
    return POINTWISE, POINTWISE


def _drop_path_windows(m: nn.Module):
    # Stochastic depth drops whole residual branches per sample. Refused in training mode:
    # tiles and the backward's recomputation would each draw their own masks.
    p = getattr(m, "drop_prob", getattr(m, "p", 0.0))
    if m.training and p > 0:
        raise Refusal(f"stochastic depth (drop path, p={p}) in training mode draws a random mask per call, "
                      "so the tiles and the backward's recomputation would drop different branches",
                      "build the model with drop_path_rate=0 / stochastic_depth_prob=0 (streamcnn's named "
                      "trunks do), or put these modules in eval mode", fixable=True)
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
for _cls in (StochasticDepth, "timm.layers.drop.DropPath", "timm.layers.drop.DropBlock2d"):
    register_rule(_cls, _drop_path_windows)
for _cls in (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Identity,
):
    register_rule(_cls)

_GLOBAL_POOL = "adaptive/global pooling makes every output depend on the whole image"
_SE = ("squeeze-and-excitation: its global average pool gates every pixel's channels with a value computed "
       "from the whole image")
for _key, _why, _fix in (
    (nn.GroupNorm, "GroupNorm normalises over the whole spatial extent of each group", PER_PIXEL_NORM),
    (nn.modules.instancenorm._InstanceNorm, "InstanceNorm normalises over the whole image", PER_PIXEL_NORM),
    (nn.modules.pooling._AdaptiveAvgPoolNd, _GLOBAL_POOL, HEAD),
    (nn.modules.pooling._AdaptiveMaxPoolNd, _GLOBAL_POOL, HEAD),
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


def _lookup(cls: type) -> tuple[type | None, ModuleRule | None]:
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
    base, rule = _lookup(type(m))
    return rule is not None and type(m).forward is base.forward


# -- functions and methods ---------------------------------------------------------------------
_FUNCTION_RULES: dict[Callable, Callable] = {}
register_rule(_tv_channel_shuffle)  # ShuffleNetV2: view/transpose over channels only


def leaf_functions() -> tuple[Callable, ...]:
    """Functions the tracer keeps as single nodes (``torch.fx`` autowrap)."""
    return tuple(_FUNCTION_RULES)


_POINTWISE_FUNCTIONS: set = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd,
    operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.sigmoid,
    torch.tanh, torch.clamp, torch.abs, torch.exp, torch.neg, F.relu, F.relu6, F.gelu, F.silu,
    F.leaky_relu, F.hardswish, F.hardsigmoid, F.elu, F.mish, F.sigmoid, F.tanh, torch.maximum,
    torch.minimum, F.hardtanh,
}
_POINTWISE_METHODS: set[str] = {
    "add", "add_", "sub", "mul", "mul_", "div", "relu", "relu_", "sigmoid", "tanh", "clamp",
    "clamp_min", "abs", "neg", "exp", "contiguous", "clone", "float", "to", "type_as", "half",
    "bfloat16", "double",
}
_NONLOCAL_FUNCTIONS: dict[Callable, tuple[str, str]] = {
    F.adaptive_avg_pool2d: (_GLOBAL_POOL, HEAD),
    F.adaptive_max_pool2d: (_GLOBAL_POOL, HEAD),
    torch.flatten: ("flattening destroys the spatial layout", HEAD),
    F.group_norm: ("GroupNorm normalises over the whole spatial extent", PER_PIXEL_NORM),
    F.instance_norm: ("InstanceNorm normalises over the whole image", PER_PIXEL_NORM),
    F.interpolate: ("interpolation is not supported by the geometry yet", "stream the encoder only; " + HEAD),
    F.scaled_dot_product_attention: ("attention mixes all positions", HEAD),
}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp"}


def _arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.kwargs.get(name, node.args[i] if len(node.args) > i else default)


def _dims(value: Any, rank: int) -> list[int]:
    dims = [value] if isinstance(value, int) else list(value)
    return [d % rank for d in dims]


def _channels_last_only(layout: Layout, what: str):
    """LayerNorm / Linear act on the last dimension: local only when it holds channels."""
    if layout[-1] != 1:
        axis = "height" if layout[-1] == 2 else "width" if layout[-1] == 3 else "batch"
        if what == "Linear":
            raise Refusal(f"Linear layers mix all positions along the last dimension, which here is {axis}", HEAD)
        raise Refusal(f"LayerNorm over the last dimension, which here is {axis}, mixes positions", PER_PIXEL_NORM)
    return POINTWISE, POINTWISE


def _layer_norm(layout: Layout, shape: Sequence[int] | int):
    if not isinstance(shape, int) and len(shape) != 1:
        raise Refusal(f"LayerNorm over the last {len(shape)} dimensions mixes positions", PER_PIXEL_NORM)
    return _channels_last_only(layout, "LayerNorm")


@dataclass
class NodeRule:
    """What the geometry needs of one node: its windows and its output's layout."""

    windows: tuple
    layout: Layout
    is_tuple: bool = False  # a tuple of tensors (chunk/split); getitem picks one


def node_rule(node: torch.fx.Node, root: nn.Module, inputs: list[tuple[Layout, bool]]) -> NodeRule:
    """The rule for ``node`` given its spatial inputs' (layout, is_tuple); raises :class:`Refusal`."""
    layout = inputs[0][0]
    if len({lay for lay, _ in inputs}) > 1:
        raise Refusal("combines tensors whose dimensions are permuted differently",
                      "permute them to the same layout first")
    rank = len(layout)
    target = node.target
    if node.op == "call_module":
        sub = root.get_submodule(str(target))
        if isinstance(sub, nn.LayerNorm):
            return NodeRule(_layer_norm(layout, sub.normalized_shape), layout)
        if isinstance(sub, nn.Linear):
            return NodeRule(_channels_last_only(layout, "Linear"), layout)
        _, rule = _lookup(type(sub))
        if rule is None:
            raise Refusal(f"unknown layer {type(sub).__module__}.{type(sub).__name__}", REGISTER)
        windows = rule(sub)
        return NodeRule(windows, _require_nchw(layout, windows))
    if node.op == "call_function":
        if target in _FUNCTION_RULES:
            windows = _FUNCTION_RULES[target](*node.args, **node.kwargs)
            return NodeRule(windows, _require_nchw(layout, windows))
        if target in _NONLOCAL_FUNCTIONS:
            raise Refusal(*_NONLOCAL_FUNCTIONS[target])
        if target is F.layer_norm:
            return NodeRule(_layer_norm(layout, _arg(node, 1, "normalized_shape")), layout)
        if target is F.linear:
            return NodeRule(_channels_last_only(layout, "Linear"), layout)
        if target is operator.getitem:
            return _getitem(node, inputs[0])
    name = target if node.op == "call_method" else getattr(target, "__name__", None)
    if name == "permute" and node.op in ("call_method", "call_function"):
        dims = node.args[1:] if node.op == "call_method" and len(node.args) > 2 else _arg(node, 1, "dims")
        return NodeRule((POINTWISE, POINTWISE), tuple(layout[d] for d in _dims(dims, rank)))
    if name == "transpose":
        a, b = _dims([_arg(node, 1, "dim0"), _arg(node, 2, "dim1")], rank)
        new = list(layout)
        new[a], new[b] = new[b], new[a]
        return NodeRule((POINTWISE, POINTWISE), tuple(new))
    if name in ("cat", "concat", "chunk", "split"):
        index = {"cat": 1, "concat": 1, "chunk": 2, "split": 2}[name]
        dim = _dims(_arg(node, index, "dim", 0), rank)[0]
        if layout[dim] != 1:
            raise Refusal(f"{name} along dim {dim}, which is not the channel dimension", "only channel "
                          "concatenation/splitting streams; " + HEAD)
        return NodeRule((POINTWISE, POINTWISE), layout, is_tuple=name in ("chunk", "split"))
    if name in _REDUCTIONS:
        dims = _arg(node, 1, "dim")
        reduced = {layout[d] for d in _dims(dims, rank)} if dims is not None else {0, 1, 2, 3}
        over = "all dimensions" if dims is None else f"dims {dims}"
        what = "is global pooling" if reduced & {2, 3} else "changes the tensor's rank"
        raise Refusal(f"Tensor.{name} over {over} {what}", HEAD)
    if (node.op == "call_function" and target in _POINTWISE_FUNCTIONS) or (
            node.op == "call_method" and target in _POINTWISE_METHODS):
        return NodeRule((POINTWISE, POINTWISE), layout)
    raise Refusal("an operation the streaming geometry does not know; only local layers (convolution, "
                  "pooling, pointwise ops, per-pixel norms, eval-mode BatchNorm, residual additions, channel "
                  "concatenation) can be streamed", REGISTER)


def _require_nchw(layout: Layout, windows) -> Layout:
    if layout != NCHW and any(w != POINTWISE for w in windows):
        raise Refusal("a spatial layer applied to a tensor whose dimensions are permuted",
                      "permute back to (N, C, H, W) first")
    return layout


def _getitem(node: torch.fx.Node, source: tuple[Layout, bool]) -> NodeRule:
    layout, is_tuple = source
    index = node.args[1]
    if is_tuple and isinstance(index, int):
        return NodeRule((POINTWISE, POINTWISE), layout)
    if not is_tuple and isinstance(index, tuple) and Ellipsis not in index and None not in index:
        spatial = [i for i, ax in enumerate(layout) if ax in (0, 2, 3)]
        if all(i >= len(index) or index[i] == slice(None) for i in spatial):
            return NodeRule((POINTWISE, POINTWISE), layout)  # a channel slice
    raise Refusal(f"indexing with {index!r} selects spatial positions", "index channels only; " + HEAD)


_SE_NAME = re.compile(r"(?i:squeeze|excit)|(^|[a-z0-9_])SE([A-Z_]|$)|Eca[A-Z]")


def within_squeeze_excitation(node: torch.fx.Node) -> str | None:
    """The module path of an enclosing squeeze-and-excitation-like module, if any."""
    for path, entry in reversed(list((node.meta.get("nn_module_stack") or {}).items())):
        cls = entry[1] if isinstance(entry, tuple) else entry
        name = getattr(cls, "__name__", str(cls)).rsplit(".", 1)[-1]
        if _SE_NAME.search(name):
            return entry[0] if isinstance(entry, tuple) else path
    return None
