"""Bring your own model: cut a whole classification network into a streamable trunk and a head.

:func:`split_model` traces the network with the geometry's tracer, finds the first
operation that is not local (usually the global pooling; earlier in networks with
squeeze-and-excitation), and cuts at the latest point before it where a single
(N, C, H, W) tensor carries everything the rest needs. Both halves are
``torch.fx.GraphModule`` objects that share the original's layers (and so its
parameters and their names), so ``head(trunk(x))`` is ``model(x)``. Layers that become
local by a change of mode (train-mode BatchNorm, dropout, drop path) are not cut at:
the error says how to fix them first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn

from streamcnn.engine.geometry import analyse, trace
from streamcnn.engine.rules import UnsupportedLayerError

__all__ = ["Split", "split_model"]


@dataclass
class Split:
    """The two halves of a network and where and why it was cut. Unpacks as ``trunk, head``."""

    trunk: nn.Module
    head: nn.Module
    cut_after: str      # the trunk's last layer (module path)
    stopped_at: str     # the first layer that is not local
    reason: str         # why that layer is not local, and the fix

    def __iter__(self):
        return iter((self.trunk, self.head))

    def __str__(self) -> str:
        return f"trunk ends after {self.cut_after}; the head starts at the first non-local layer: {self.reason}"


def _copy(graph: torch.fx.Graph, node: torch.fx.Node, env: dict[torch.fx.Node, torch.fx.Node]) -> torch.fx.Node:
    """Copy ``node`` into ``graph``, first copying any input (a constant) not yet there."""
    for arg in node.all_input_nodes:
        if arg not in env:
            env[arg] = _copy(graph, arg, env)
    env[node] = graph.node_copy(node, lambda n: env[n])
    return env[node]


def split_model(model: nn.Module) -> Split:
    """Cut ``model`` into ``(trunk, head)``: the longest local prefix, and the rest.

    Raises :class:`~streamcnn.engine.geometry.UnsupportedLayerError` when the first refusal is
    fixable (e.g. ``call streamcnn.freeze_batchnorm(model)``) or nothing before it is local.
    """
    root, graph = trace(model)
    order = {node: i for i, node in enumerate(graph.nodes)}
    try:
        nodes, _ = analyse(graph, root)
    except UnsupportedLayerError as err:
        if err.fixable or not hasattr(err, "node"):
            raise UnsupportedLayerError(f"split_model: {err}", fixable=err.fixable) from None
        analysed, failure = err.analysed, str(err)  # type: ignore[attr-defined]
        stop = next(n for n in graph.nodes if n.name == err.node)  # type: ignore[attr-defined]
    else:
        raise ValueError(f"{type(model).__name__} is local throughout (its output is a feature map); "
                         "stream it whole with streamcnn.StreamingModule, there is no head to split off")
    by_name = {n.name: n for n in graph.nodes}
    cut, reach = None, -1
    for info in analysed:  # in graph order; reach: the last node that uses anything before `info`
        node = by_name[info.name]
        if reach <= order[node] and not info.is_tuple and info.layout == (0, 1, 2, 3) and node.op != "placeholder":
            cut = node
        reach = max([reach] + [order[u] for u in node.users])
    if cut is None:
        raise UnsupportedLayerError(f"split_model: nothing before the first non-local layer is a trunk: {failure}")

    trunk_graph = torch.fx.Graph()
    trunk_graph.output(_copy(trunk_graph, cut, {}))  # the cut and what it depends on
    head_graph = torch.fx.Graph()
    env = {cut: head_graph.placeholder("features")}
    for node in list(graph.nodes)[order[cut] + 1:]:
        if node.op != "placeholder":
            _copy(head_graph, node, env)
    where = next(i.where for i in analysed if i.name == cut.name)
    return Split(torch.fx.GraphModule(root, trunk_graph, "Trunk"), torch.fx.GraphModule(root, head_graph, "Head"),
                 where, failure.split(" (", 1)[0], failure)
