"""streamcnn: train CNNs on images larger than GPU memory, with exact gradients.

Public API:

- :class:`StreamingModule`: run a trunk of local layers tile by tile, exact gradients.
- :func:`freeze_batchnorm`: make BatchNorm layers streamable (eval mode, affine trainable).
- :func:`tile_plan`, :class:`TilePlan`, :class:`TrunkGeometry`: the tiling geometry.
- :func:`register_rule`, :class:`Window`: teach the geometry a new local layer.
- :class:`UnsupportedLayerError`: raised for layers that cannot be streamed exactly.
"""
from .batchnorm import FrozenBatchNorm2d, freeze_batchnorm
from .geometry import TilePlan, TrunkGeometry, UnsupportedLayerError, Window, register_rule, tile_plan
from .streaming import RegionSource, StreamingModule

__version__ = "0.1.0"

__all__ = [
    "StreamingModule",
    "RegionSource",
    "freeze_batchnorm",
    "FrozenBatchNorm2d",
    "tile_plan",
    "TilePlan",
    "TrunkGeometry",
    "register_rule",
    "Window",
    "UnsupportedLayerError",
]
