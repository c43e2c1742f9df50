"""Geometry of a streamable trunk: which input window each output tile needs.

This module owns the tiling arithmetic, and nothing else does. It traces the trunk
with ``torch.fx``, gives every node a *window rule* (kernel, stride, padding,
dilation, ceil_mode per spatial axis), and then answers two questions by interval
arithmetic, never by experiment:

* ``output_size``: the feature-map size for an image size;
* ``input_window``: for an output interval ``[a, b)``, the input interval whose
  values determine it (walking the graph backwards, taking the hull where branches
  meet, clamping to each tensor's extent, and aligning the start down to the trunk's
  total stride so the strided sampling grid of a crop matches the full image).

Anything that is not local (global pooling, Linear, attention, normalisation over
space or batch, train-mode dropout, ops the analysis does not know) is refused
with an :class:`UnsupportedLayerError` naming the module path. New local layers can
be taught with :func:`register_rule` (timm-style registry, no if/else chains).

:func:`tile_plan` partitions the feature map into disjoint rectangles and returns
each tile's region and input window, and the overlap factor (total window area /
image area) that prices the plan.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .units import pair as _pair

__all__ = [
    "UnsupportedLayerError",
    "Window",
    "POINTWISE",
    "register_rule",
    "TrunkGeometry",
    "Tile",
    "TilePlan",
    "tile_plan",
]


class UnsupportedLayerError(ValueError):
    """A trunk contains an operation that cannot be streamed exactly."""


# --------------------------------------------------------------------------------------
# Window rules
# --------------------------------------------------------------------------------------


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


def _conv_windows(m: nn.Conv2d) -> tuple[Window, Window]:
    if m.padding_mode == "circular":
        raise UnsupportedLayerError("circular padding wraps around the image, so it is not local")
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
    return tuple(Window(k[i], s[i], pads[i][0], pads[i][1], d[i]) for i in range(2))  # type: ignore[return-value]


def _pool_windows(m: nn.Module) -> tuple[Window, Window]:
    k = _pair(m.kernel_size)
    s = _pair(m.stride if m.stride is not None else m.kernel_size)
    p = _pair(m.padding)
    d = _pair(getattr(m, "dilation", 1))
    return tuple(Window(k[i], s[i], p[i], p[i], d[i], bool(m.ceil_mode)) for i in range(2))  # type: ignore[return-value]


def _pointwise(_: nn.Module) -> tuple[Window, Window]:
    return POINTWISE, POINTWISE


def _batchnorm_windows(m: nn.modules.batchnorm._BatchNorm) -> tuple[Window, Window]:
    if m.training or not m.track_running_stats or m.running_mean is None:
        raise UnsupportedLayerError(
            "BatchNorm in training mode normalises with statistics of the whole batch and image, "
            "so tiles would see different statistics; call streamcnn.freeze_batchnorm(trunk) to use "
            "running statistics (eval mode; the affine weight and bias stay trainable)"
        )
    return POINTWISE, POINTWISE


def _dropout_windows(m: nn.Module) -> tuple[Window, Window]:
    if m.training and m.p > 0:
        raise UnsupportedLayerError(
            "dropout in training mode draws a different mask per tile; put dropout in the head, "
            "or set p=0 / eval mode for the trunk"
        )
    return POINTWISE, POINTWISE


# A rule maps a module (or a call's args and kwargs) to one Window per spatial axis,
# or raises UnsupportedLayerError with the reason.
ModuleRule = Callable[[nn.Module], "tuple[Window, Window]"]
_MODULE_RULES: dict[type, ModuleRule] = {}
_REFUSED_MODULES: dict[type, str] = {}

# Functions and tensor methods that are pointwise in space (any number of tensor args).
_POINTWISE_FUNCTIONS: set = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd,
    operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.sigmoid,
    torch.tanh, torch.clamp, torch.abs, torch.exp, torch.neg, F.relu, F.relu6, F.gelu, F.silu,
    F.leaky_relu, F.hardswish, F.hardsigmoid, F.elu, F.mish, F.sigmoid, F.tanh, torch.maximum,
    torch.minimum,
}
_POINTWISE_METHODS: set[str] = {
    "add", "add_", "sub", "mul", "mul_", "div", "relu", "relu_", "sigmoid", "tanh", "clamp",
    "clamp_min", "abs", "neg", "exp", "contiguous", "clone", "float", "to", "type_as", "half",
    "bfloat16", "double",
}


def register_rule(cls: type, rule: ModuleRule | None = None):
    """Teach the geometry a local module type.

    ``rule(module) -> (Window, Window)`` gives the window along height and width.
    Without ``rule`` the module is registered as pointwise. Usable as a decorator.
    """
    if rule is None:
        rule = _pointwise
    _MODULE_RULES[cls] = rule
    return cls


for _cls in (nn.Conv2d,):
    register_rule(_cls, _conv_windows)
for _cls in (nn.MaxPool2d, nn.AvgPool2d):
    register_rule(_cls, _pool_windows)
register_rule(nn.modules.batchnorm._BatchNorm, _batchnorm_windows)
for _cls in (nn.Dropout, nn.Dropout2d):
    register_rule(_cls, _dropout_windows)
for _cls in (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Identity,
):
    register_rule(_cls)

_REFUSED_MODULES.update({
    nn.GroupNorm: "GroupNorm normalises over the whole spatial extent of each group",
    nn.modules.instancenorm._InstanceNorm: "InstanceNorm normalises over the whole image",
    nn.LayerNorm: "LayerNorm over spatial dimensions mixes the whole image",
    nn.modules.pooling._AdaptiveAvgPoolNd: "adaptive/global pooling mixes the whole image",
    nn.modules.pooling._AdaptiveMaxPoolNd: "adaptive/global pooling mixes the whole image",
    nn.Linear: "Linear layers mix all positions they see",
    nn.MultiheadAttention: "attention mixes all positions",
    nn.Flatten: "flattening destroys the spatial layout",
    nn.Upsample: "upsampling is not supported by the geometry yet",
    nn.ConvTranspose2d: "transposed convolutions are not supported by the geometry yet",
})

_NONLOCAL_FUNCTIONS = {
    F.adaptive_avg_pool2d: "adaptive/global pooling mixes the whole image",
    F.adaptive_max_pool2d: "adaptive/global pooling mixes the whole image",
    torch.flatten: "flattening destroys the spatial layout",
    F.linear: "Linear layers mix all positions they see",
    F.group_norm: "GroupNorm normalises over the whole spatial extent",
    F.instance_norm: "InstanceNorm normalises over the whole image",
    F.layer_norm: "LayerNorm over spatial dimensions mixes the whole image",
    F.interpolate: "interpolation is not supported by the geometry yet",
    F.scaled_dot_product_attention: "attention mixes all positions",
}


def _lookup(table: dict, cls: type):
    for base in cls.__mro__:
        if base in table:
            return table[base]
    return None


# --------------------------------------------------------------------------------------
# Graph analysis
# --------------------------------------------------------------------------------------


@dataclass
class _Node:
    name: str           # fx node name
    where: str          # human-readable module path for errors
    inputs: list[int]   # indices of spatial producer nodes
    windows: tuple[Window, Window]
    stride: tuple[int, int] = (1, 1)  # cumulative stride from the image


def _node_location(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        path = path[0] if isinstance(path, tuple) else path
        return f"{path} ({node.name})" if path else node.name
    return node.name


def _call_name(node: torch.fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return f"Tensor.{target}"
    name = getattr(target, "__name__", None)
    if name is None:
        return str(target)
    module = getattr(target, "__module__", None) or "torch"
    return f"{module.lstrip('_')}.{name}"


class _LeafTracer(torch.fx.Tracer):
    """Keeps every module with a known rule (or a known refusal) as one graph node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _lookup(_MODULE_RULES, type(m)) or _lookup(_REFUSED_MODULES, type(m)):
            return True
        return super().is_leaf_module(m, qualname)


class TrunkGeometry:
    """The window rules of a trunk, derived from its ``torch.fx`` graph.

    Raises :class:`UnsupportedLayerError` if any operation cannot be streamed exactly.
    Re-create it (or call :meth:`validate`) after changing train/eval modes.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        # fx never treats the root as a leaf: wrap a lone layer so its rule applies.
        self._root = nn.Sequential(module) if _LeafTracer().is_leaf_module(module, "") else module
        try:
            graph = _LeafTracer().trace(self._root)
        except Exception as exc:  # noqa: BLE001 - fx raises many exception types
            raise UnsupportedLayerError(
                f"torch.fx could not trace {type(module).__name__}: {exc}. Streaming needs a trunk "
                "without data-dependent control flow; wrap such a block as a leaf and describe it "
                "with streamcnn.register_rule."
            ) from exc
        self._nodes: list[_Node] = []
        index: dict[str, int] = {}
        constants: set[str] = set()
        output_seen = False
        for node in graph.nodes:
            if node.op == "placeholder":
                if index:
                    raise UnsupportedLayerError("the trunk must take exactly one tensor input")
                index[node.name] = len(self._nodes)
                self._nodes.append(_Node(node.name, "input", [], (POINTWISE, POINTWISE)))
                continue
            if node.op == "get_attr":
                constants.add(node.name)
                continue
            if node.op == "output":
                out = node.args[0]
                if not isinstance(out, torch.fx.Node) or out.name not in index:
                    raise UnsupportedLayerError("the trunk must return a single feature-map tensor")
                self._output = index[out.name]
                output_seen = True
                continue
            spatial = [a.name for a in node.all_input_nodes if a.name in index]
            others = [a.name for a in node.all_input_nodes if a.name not in index and a.name not in constants]
            where = _node_location(node)
            if others:
                raise UnsupportedLayerError(f"{where}: uses a value the geometry cannot follow ({others})")
            if not spatial:  # a pure function of constants
                constants.add(node.name)
                continue
            windows = self._windows_for(node, where, len(spatial))
            index[node.name] = len(self._nodes)
            self._nodes.append(_Node(node.name, where, [index[n] for n in spatial], windows))
        if not output_seen:
            raise UnsupportedLayerError("the trunk has no output")
        self._assign_strides()

    def _windows_for(self, node: torch.fx.Node, where: str, n_spatial: int) -> tuple[Window, Window]:
        if node.op == "call_module":
            sub = self._root.get_submodule(str(node.target))
            refused = _lookup(_REFUSED_MODULES, type(sub))
            if refused:
                raise UnsupportedLayerError(f"{where} ({type(sub).__name__}): {refused}")
            rule = _lookup(_MODULE_RULES, type(sub))
            if rule is None:
                raise UnsupportedLayerError(
                    f"{where} ({type(sub).__module__}.{type(sub).__name__}): unknown layer; if it is "
                    "local, describe it with streamcnn.register_rule"
                )
            try:
                return rule(sub)
            except UnsupportedLayerError as exc:
                raise UnsupportedLayerError(f"{where} ({type(sub).__name__}): {exc}") from None
        target = node.target
        if node.op == "call_function" and target in _NONLOCAL_FUNCTIONS:
            raise UnsupportedLayerError(f"{where} ({_call_name(node)}): {_NONLOCAL_FUNCTIONS[target]}")
        if node.op == "call_function" and target in (torch.cat, torch.concat):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim not in (1, -3):
                raise UnsupportedLayerError(f"{where}: concatenation along dim {dim}; only channels (dim=1) stream")
            return POINTWISE, POINTWISE
        if (node.op == "call_function" and target in _POINTWISE_FUNCTIONS) or (
            node.op == "call_method" and target in _POINTWISE_METHODS
        ):
            return POINTWISE, POINTWISE
        raise UnsupportedLayerError(
            f"{where} ({_call_name(node)}): an operation the streaming geometry does not know; "
            "only local layers (convolution, pooling, pointwise ops, eval-mode BatchNorm, residual "
            "additions, channel concatenation) can be streamed"
        )

    def _assign_strides(self) -> None:
        for node in self._nodes[1:]:
            ins = {self._nodes[i].stride for i in node.inputs}
            if len(ins) > 1:
                raise UnsupportedLayerError(f"{node.where}: combines tensors of different resolutions {sorted(ins)}")
            base = ins.pop()
            node.stride = (base[0] * node.windows[0].stride, base[1] * node.windows[1].stride)

    # ----------------------------------------------------------------------------------
    @property
    def stride(self) -> tuple[int, int]:
        """Alignment of input windows: lcm of every node's cumulative stride, per axis."""
        return tuple(math.lcm(*(n.stride[ax] for n in self._nodes)) for ax in range(2))  # type: ignore[return-value]

    @property
    def output_stride(self) -> tuple[int, int]:
        return self._nodes[self._output].stride

    def node_sizes(self, image_size: Sequence[int]) -> list[tuple[int, int]]:
        sizes: list[tuple[int, int]] = [tuple(image_size)]  # type: ignore[list-item]
        for node in self._nodes[1:]:
            src = sizes[node.inputs[0]]
            try:
                sizes.append(tuple(node.windows[ax].output_size(src[ax]) for ax in range(2)))  # type: ignore[arg-type]
            except ValueError as exc:
                raise ValueError(f"image of size {tuple(image_size)} is too small for layer '{node.where}': {exc}") from None
        return sizes

    def output_size(self, image_size: Sequence[int]) -> tuple[int, int]:
        return self.node_sizes(image_size)[self._output]

    def input_window(
        self, region: Sequence[tuple[int, int]], image_size: Sequence[int], sizes=None
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """Input interval per axis needed for the output ``region`` ((r0, r1), (c0, c1)).

        Clamped to the image and aligned down to :attr:`stride`, so that running the trunk
        on the crop reproduces the full-image values of every position of ``region``.
        """
        sizes = sizes or self.node_sizes(image_size)
        needed: dict[int, list[list[int]]] = {self._output: [list(region[0]), list(region[1])]}
        for i in range(len(self._nodes) - 1, 0, -1):
            if i not in needed:
                continue
            node = self._nodes[i]
            for src in node.inputs:
                want = []
                for ax in range(2):
                    lo, hi = node.windows[ax].input_interval(*needed[i][ax])
                    want.append([max(lo, 0), min(hi, sizes[src][ax])])
                if src in needed:
                    have = needed[src]
                    want = [[min(w[0], h[0]), max(w[1], h[1])] for w, h in zip(want, have)]
                needed[src] = want
        window = needed[0]
        align = self.stride
        return tuple((w[0] // align[ax] * align[ax], w[1]) for ax, w in enumerate(window))  # type: ignore[return-value]

    def offset_in_output(self, window_start: Sequence[int]) -> tuple[int, int]:
        """Output position of the first output of a crop starting at ``window_start``."""
        s = self.output_stride
        return window_start[0] // s[0], window_start[1] // s[1]


# --------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """One tile: a disjoint ``region`` of the feature map and the input ``window`` it needs.

    ``region`` is ((r0, r1), (c0, c1)) in feature-map positions; ``window`` is
    ((top, bottom), (left, right)) in image pixels; ``crop`` locates ``region`` inside
    the trunk's output on the window, as ((r0, r1), (c0, c1)).
    """

    region: tuple[tuple[int, int], tuple[int, int]]
    window: tuple[tuple[int, int], tuple[int, int]]
    crop: tuple[tuple[int, int], tuple[int, int]]

    @property
    def window_shape(self) -> tuple[int, int]:
        return self.window[0][1] - self.window[0][0], self.window[1][1] - self.window[1][0]


@dataclass(frozen=True)
class TilePlan:
    """How an image is streamed: its tiles and what they cost."""

    image_size: tuple[int, int]
    output_size: tuple[int, int]
    tile_size: tuple[int, int]        # the requested tile side in image pixels
    region_size: tuple[int, int]      # feature-map positions per tile (the largest)
    stride: tuple[int, int]           # total output stride of the trunk
    grid: tuple[int, int]             # tiles along height and width
    tiles: tuple[Tile, ...]

    @property
    def overlap_factor(self) -> float:
        """Total window area / image area: how much trunk compute streaming repeats."""
        area = sum(t.window_shape[0] * t.window_shape[1] for t in self.tiles)
        return area / (self.image_size[0] * self.image_size[1])

    @property
    def max_window(self) -> tuple[int, int]:
        return tuple(max(t.window_shape[ax] for t in self.tiles) for ax in range(2))  # type: ignore[return-value]

    def __str__(self) -> str:
        h, w = self.image_size
        sides = [[f(t.region[ax][1] - t.region[ax][0] for t in self.tiles) for f in (min, max)] for ax in range(2)]

        def span(scale: tuple[int, int]) -> str:
            parts = [f"{lo * s}" if lo == hi else f"{lo * s}-{hi * s}" for (lo, hi), s in zip(sides, scale)]
            return ("x" if all("-" not in p for p in parts) else " x ").join(parts)

        regions, features = span(self.stride), span((1, 1))
        return (
            f"TilePlan({h}x{w} image -> {self.output_size[0]}x{self.output_size[1]} features, "
            f"{self.grid[0]}x{self.grid[1]} tiles: regions of {regions} px ({features} features), "
            f"windows up to {self.max_window[0]}x{self.max_window[1]} px, "
            f"overlap factor {self.overlap_factor:.3f})"
        )


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into ``parts`` contiguous intervals whose sizes differ by at most 1."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def tile_plan(
    trunk: nn.Module | TrunkGeometry,
    image_size: int | Sequence[int],
    tile_size: int | Sequence[int],
) -> TilePlan:
    """Partition the trunk's feature map for an image into tiles of about ``tile_size`` px.

    ``tile_size`` is the side of the disjoint image area a tile is responsible for; it is
    rounded down to a multiple of the trunk's output stride (at least one stride). Each
    tile's window adds the receptive-field halo the trunk needs, clamped at the image
    borders. Tiles are balanced: their regions differ by at most one feature position.
    """
    geometry = trunk if isinstance(trunk, TrunkGeometry) else TrunkGeometry(trunk)
    image = _pair(image_size)
    tile = _pair(tile_size)
    if min(tile) < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    sizes = geometry.node_sizes(image)
    out = sizes[geometry._output]
    if min(out) < 1:
        raise ValueError(f"image of size {image} produces an empty feature map")
    stride = geometry.output_stride
    region = tuple(max(1, tile[ax] // stride[ax]) for ax in range(2))
    grid = tuple(-(-out[ax] // region[ax]) for ax in range(2))
    rows, cols = _split(out[0], grid[0]), _split(out[1], grid[1])
    tiles = []
    for r in rows:
        for c in cols:
            window = geometry.input_window((r, c), image, sizes)
            first = geometry.offset_in_output((window[0][0], window[1][0]))
            crop = ((r[0] - first[0], r[1] - first[0]), (c[0] - first[1], c[1] - first[1]))
            tiles.append(Tile((r, c), window, crop))
    return TilePlan(image, out, tile, region, stride, grid, tuple(tiles))  # type: ignore[arg-type]
