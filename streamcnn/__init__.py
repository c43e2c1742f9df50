"""streamcnn: train CNNs on images larger than GPU memory, with exact gradients, in a budget.

Public API (details in README.md):

- Streaming: :class:`StreamingModule`, :func:`freeze_batchnorm`, :class:`RegionSource`.
- Geometry: :func:`tile_plan`, :class:`TilePlan`, :class:`TrunkGeometry`,
  :func:`register_rule`, :class:`Window`, :class:`UnsupportedLayerError`.
- Models: :func:`build_model`, :class:`StreamingClassifier`.
- Memory: :func:`plan`, :class:`PlanReport`, :class:`Candidate`, :class:`BudgetError`,
  :func:`enforce_budget`, :func:`parse_size`, :func:`format_size`; :class:`Plannable` (what
  the planner needs of a model).
- Images: :func:`open_image` (lazy readers; imported on first use, as it loads libvips).
- Subpackages: ``streamcnn.io``, ``streamcnn.data`` (UltraMNIST, datasets),
  ``streamcnn.training`` (the trainer behind ``tools/train.py``).
"""
from .batchnorm import FrozenBatchNorm2d, freeze_batchnorm
from .geometry import TilePlan, TrunkGeometry, UnsupportedLayerError, Window, register_rule, tile_plan
from .models import StreamingClassifier, build_model
from .plannable import Plannable
from .planning import BudgetError, Candidate, PlanReport, enforce_budget, plan
from .streaming import RegionSource, StreamingModule
from .units import format_size, parse_size

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
    "build_model",
    "StreamingClassifier",
    "plan",
    "Plannable",
    "PlanReport",
    "Candidate",
    "BudgetError",
    "enforce_budget",
    "parse_size",
    "format_size",
    "open_image",
]


def __getattr__(name: str):
    if name == "open_image":
        from .io import open_image

        return open_image
    raise AttributeError(f"module 'streamcnn' has no attribute {name!r}")
