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

Anything that is not local (global pooling, Linear over space, attention, normalisation
over space or batch, train-mode dropout, ops the analysis does not know) is refused
with an :class:`UnsupportedLayerError` naming the module path, the reason and the fix.
The rules themselves live in :mod:`streamcnn.engine.rules` (per kind of layer) and
:mod:`streamcnn.engine.node_rules` (per graph node); new local layers can be taught with
:func:`register_rule` (a registry, no if/else chains).

:func:`tile_plan` partitions the feature map into disjoint rectangles and returns
each tile's region and input window, and the overlap factor (total window area /
image area) that prices the plan.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx
import torch.nn as nn

from streamcnn.engine.node_rules import node_rule, within_squeeze_excitation
from streamcnn.engine.rules import (HEAD, NCHW, POINTWISE, SE_FIX, Refusal, UnsupportedLayerError, Window, is_leaf,
                                    leaf_functions, register_rule)
from streamcnn.utils.units import pair as _pair

__all__ = [
    "UnsupportedLayerError",
    "Window",
    "POINTWISE",
    "register_rule",
    "trace",
    "analyse",
    "TrunkGeometry",
    "Tile",
    "TilePlan",
    "tile_plan",
]


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
    layout: tuple = NCHW              # which logical axis each tensor dimension holds
    is_tuple: bool = False            # a tuple of tensors (chunk/split)
    image_channels: bool = False      # still has the image's channels (no conv or channel op yet)
    module: nn.Module | None = None   # the layer, for module nodes


def _node_location(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        path = path[0] if isinstance(path, tuple) else path
        return f"{path} ({node.name})" if path else node.name
    return node.name


def _call_name(node: torch.fx.Node, root: nn.Module) -> str:
    target = node.target
    if node.op == "call_module":
        return type(root.get_submodule(str(target))).__name__
    if node.op == "call_method":
        return f"Tensor.{target}"
    name = getattr(target, "__name__", None)
    if name is None:
        return str(target)
    module = getattr(target, "__module__", None) or "torch"
    return f"{module.lstrip('_')}.{name}"


class _LeafTracer(torch.fx.Tracer):
    """Keeps every module with a rule as one graph node, and the functions rules describe."""

    def __init__(self):
        super().__init__(autowrap_functions=leaf_functions())

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_leaf(m) or super().is_leaf_module(m, qualname)


def trace(module: nn.Module) -> tuple[nn.Module, torch.fx.Graph]:
    """``(root, graph)``: the module's ``torch.fx`` graph with rule-described layers as leaves."""
    # fx never treats the root as a leaf: wrap a lone layer so its rule applies.
    root = nn.Sequential(module) if is_leaf(module) else module
    try:
        return root, _LeafTracer().trace(root)
    except Exception as exc:  # noqa: BLE001 - fx raises many exception types
        raise UnsupportedLayerError(
            f"torch.fx could not trace {type(module).__name__}: {exc}. Fix: streaming needs a trunk without "
            "data-dependent control flow; wrap such a block as a leaf and describe it with "
            "streamcnn.register_rule, or cut the network before it with streamcnn.split_model"
        ) from exc


def _refused(node: torch.fx.Node, root: nn.Module, where: str, refusal: Refusal) -> UnsupportedLayerError:
    se = within_squeeze_excitation(node) if "global pooling" in refusal.why else None
    if se is not None:
        where = se
        refusal = Refusal("squeeze-and-excitation: its global average pool gates every pixel's channels "
                          "with a value computed from the whole image", SE_FIX)
    err = UnsupportedLayerError(f"{where} ({_call_name(node, root)}): {refusal}", fixable=refusal.fixable)
    err.node = node.name  # type: ignore[attr-defined]
    return err


def analyse(graph: torch.fx.Graph, root: nn.Module) -> tuple[list[_Node], int]:
    """The spatial nodes of ``graph`` (input first) and the index of the output node.

    Raises :class:`UnsupportedLayerError` at the first node that is not local; its
    ``node`` attribute names that fx node and ``analysed`` holds the nodes before it
    (so :func:`streamcnn.split_model` can cut there).
    """
    nodes: list[_Node] = []
    try:
        return _analyse(graph, root, nodes)
    except UnsupportedLayerError as err:
        err.analysed = nodes  # type: ignore[attr-defined]
        raise


def _analyse(graph: torch.fx.Graph, root: nn.Module, nodes: list[_Node]) -> tuple[list[_Node], int]:
    index: dict[str, int] = {}
    constants: set[str] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if index:
                raise UnsupportedLayerError("the trunk must take exactly one tensor input")
            index[node.name] = len(nodes)
            nodes.append(_Node(node.name, "input", [], (POINTWISE, POINTWISE), image_channels=True))
            continue
        if node.op == "get_attr":
            constants.add(node.name)
            continue
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, torch.fx.Node) or out.name not in index or nodes[index[out.name]].is_tuple:
                raise UnsupportedLayerError("the trunk must return a single feature-map tensor")
            if nodes[index[out.name]].layout != NCHW:
                raise UnsupportedLayerError(f"{nodes[index[out.name]].where}: the trunk returns a tensor whose "
                                            "dimensions are permuted. Fix: permute it back to (N, C, H, W)")
            return nodes, index[out.name]
        spatial = [index[a.name] for a in node.all_input_nodes if a.name in index]
        others = [a.name for a in node.all_input_nodes if a.name not in index and a.name not in constants]
        where = _node_location(node)
        if others:
            raise _refused(node, root, where, Refusal(f"uses a value the geometry cannot follow ({others})",
                                                      "compute it from the image tensor only, or " + HEAD))
        if not spatial:  # a pure function of constants
            constants.add(node.name)
            continue
        try:
            rule = node_rule(node, root, [(nodes[i].layout, nodes[i].is_tuple) for i in spatial])
        except Refusal as refusal:
            raise _refused(node, root, where, refusal) from None
        strides = {nodes[i].stride for i in spatial}
        if len(strides) > 1:
            raise _refused(node, root, where, Refusal(f"combines tensors of different resolutions {sorted(strides)}",
                                                      "stream only the part before the merge; " + HEAD))
        base = strides.pop()
        windows = rule.windows
        sub = root.get_submodule(str(node.target)) if node.op == "call_module" else None
        keeps_channels = (len(spatial) == 1 and nodes[spatial[0]].image_channels and rule.layout == NCHW
                          and not rule.is_tuple and all(w == POINTWISE for w in windows)
                          and not isinstance(sub, (nn.Conv2d, nn.Linear)) and node.target is not operator.getitem)
        index[node.name] = len(nodes)
        nodes.append(_Node(node.name, where, spatial, windows,
                           (base[0] * windows[0].stride, base[1] * windows[1].stride),
                           rule.layout, rule.is_tuple, keeps_channels, sub))
    raise UnsupportedLayerError("the trunk has no output")


class TrunkGeometry:
    """The window rules of a trunk, derived from its ``torch.fx`` graph.

    Raises :class:`UnsupportedLayerError` if any operation cannot be streamed exactly.
    Re-create it after changing train/eval modes.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self._root, graph = trace(module)
        self._nodes, self._output = analyse(graph, self._root)
        first = next((n for n in self._nodes[1:] if isinstance(n.module, nn.Conv2d)
                      and self._nodes[n.inputs[0]].image_channels), None)
        # (module path, in_channels) of the convolution that reads the image, if one does
        self.first_conv: tuple[str, int] | None = None if first is None else (first.where, first.module.in_channels)

    def check_channels(self, channels: int) -> None:
        """Raise a one-line ``ValueError`` if images of ``channels`` channels cannot enter the trunk."""
        if self.first_conv is not None and self.first_conv[1] != channels:
            where, expected = self.first_conv
            raise ValueError(
                f"the image has {channels} channel{'s' if channels != 1 else ''} but the trunk's first layer "
                f"'{where}' expects {expected}; build the model with in_channels={channels} "
                f"(streamcnn.build_model(..., in_channels={channels}), model.in_channels in a config, "
                f"--in-channels for tools/plan.py)")

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
