"""Node rules: what one ``torch.fx`` node of a trunk does to space and to the tensor layout.

:func:`node_rule` applies the layer rules of :mod:`streamcnn.engine.rules` to module calls
and knows the functions and tensor methods itself (pointwise arithmetic, permutes,
channel concatenation, reductions, indexing). It follows which tensor dimension holds
batch, channels, height and width (``(0, 1, 2, 3)`` is NCHW), so the channels-last pattern
of ConvNeXt (``permute(0, 2, 3, 1)``, ``LayerNorm``/``Linear`` over the last dimension,
permute back) is recognised as per-pixel and local, in train mode too, while the same
layers over a spatial dimension are refused.
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

from streamcnn.engine.rules import (GLOBAL_POOL, HEAD, NCHW, PER_PIXEL_NORM, POINTWISE, REGISTER, Layout, Refusal,
                                    function_rule, is_drop_path, lookup)

__all__ = ["NodeRule", "node_rule", "within_squeeze_excitation"]

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
    F.adaptive_avg_pool2d: (GLOBAL_POOL, HEAD),
    F.adaptive_max_pool2d: (GLOBAL_POOL, HEAD),
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
        if is_drop_path(sub) and sub.training and layout[0] != 0:
            raise Refusal("stochastic depth draws one mask per index of the first dimension, which here is not "
                          "the batch", "apply it to an (N, ...) tensor")
        if isinstance(sub, nn.LayerNorm):
            return NodeRule(_layer_norm(layout, sub.normalized_shape), layout)
        if isinstance(sub, nn.Linear):
            return NodeRule(_channels_last_only(layout, "Linear"), layout)
        _, rule = lookup(type(sub))
        if rule is None:
            raise Refusal(f"unknown layer {type(sub).__module__}.{type(sub).__name__}", REGISTER)
        windows = rule(sub)
        return NodeRule(windows, _require_nchw(layout, windows))
    if node.op == "call_function":
        function = function_rule(target)
        if function is not None:
            windows = function(*node.args, **node.kwargs)
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
