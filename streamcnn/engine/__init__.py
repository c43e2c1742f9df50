"""The exact tiled streaming engine: tiling arithmetic, layer rules, autograd integration.

- :mod:`streamcnn.engine.geometry`: a trunk's fx graph, window arithmetic, refusals, :func:`tile_plan`.
- :mod:`streamcnn.engine.rules`: how each kind of layer maps an output window to the input it reads.
- :mod:`streamcnn.engine.node_rules`: the rules applied to each fx node (functions, methods, layouts).
- :mod:`streamcnn.engine.windows`: input windows read from a tensor or region sources.
- :mod:`streamcnn.engine.streaming`: :class:`StreamingModule`, the tile loop inside autograd, and
  :func:`stream_backward`, the streamed backward everything else uses.
- :mod:`streamcnn.engine.pooling`: global mean + max pooling, whole or tile by tile.
- :mod:`streamcnn.engine.droppath`: train-mode stochastic depth, one mask per image for every tile.
- :mod:`streamcnn.engine.segments`: activation checkpointing in segments.
- :mod:`streamcnn.engine.batchnorm`: frozen BatchNorm (a local, streamable affine map).
- :mod:`streamcnn.engine.step`: the training step the trainer runs and the planner simulates.
"""
from streamcnn.engine.batchnorm import FrozenBatchNorm2d, freeze_batchnorm
from streamcnn.engine.geometry import TilePlan, TrunkGeometry, UnsupportedLayerError, Window, register_rule, tile_plan
from streamcnn.engine.streaming import RegionSource, StreamingModule, stream_backward

__all__ = ["StreamingModule", "RegionSource", "stream_backward", "freeze_batchnorm", "FrozenBatchNorm2d", "tile_plan",
           "TilePlan", "TrunkGeometry", "register_rule", "Window", "UnsupportedLayerError"]
