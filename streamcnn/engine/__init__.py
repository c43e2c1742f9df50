"""The exact tiled streaming engine: tiling arithmetic, layer rules, autograd integration.

- :mod:`streamcnn.engine.geometry`: a trunk's fx graph, window rules, refusals, :func:`tile_plan`.
- :mod:`streamcnn.engine.rules`: how each layer maps an output window to the input it reads.
- :mod:`streamcnn.engine.streaming`: :class:`StreamingModule`, the tile loop inside autograd.
- :mod:`streamcnn.engine.batchnorm`: frozen BatchNorm (a local, streamable affine map).
- :mod:`streamcnn.engine.step`: the training step the trainer runs and the planner simulates.
"""
from streamcnn.engine.batchnorm import FrozenBatchNorm2d, freeze_batchnorm
from streamcnn.engine.geometry import TilePlan, TrunkGeometry, UnsupportedLayerError, Window, register_rule, tile_plan
from streamcnn.engine.streaming import RegionSource, StreamingModule

__all__ = ["StreamingModule", "RegionSource", "freeze_batchnorm", "FrozenBatchNorm2d", "tile_plan", "TilePlan",
           "TrunkGeometry", "register_rule", "Window", "UnsupportedLayerError"]
