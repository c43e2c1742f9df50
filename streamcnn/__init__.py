"""streamcnn: train CNNs on images larger than GPU memory, with exact gradients, in a budget.

Public API (details in docs/library.md):

- Streaming: :class:`StreamingModule`, :func:`freeze_batchnorm`, :class:`RegionSource`.
- Geometry: :func:`tile_plan`, :class:`TilePlan`, :class:`TrunkGeometry`,
  :func:`register_rule`, :class:`Window`, :class:`UnsupportedLayerError`.
- Models: :func:`build_model` (trunks by name, ``torchvision:<arch>``, ``timm:<arch>``),
  :class:`StreamingClassifier`, :func:`split_model` (a whole network -> trunk + head).
  From-scratch trunks in ``streamcnn.models.scratch``; the PatchGD baseline in ``streamcnn.models.patchgd``.
- Memory: :func:`plan`, :class:`PlanReport`, :class:`Candidate`, :class:`BudgetError`,
  :func:`enforce_budget`, :func:`parse_size`, :func:`format_size`; :class:`Plannable` (what
  the planner needs of a model).
- Images: :func:`open_image` (lazy readers; imported on first use, as it loads libvips).
- Subpackages: ``streamcnn.io``, ``streamcnn.data`` (UltraMNIST, datasets),
  ``streamcnn.training`` (the trainer behind ``tools/train.py``).
"""
from streamcnn.engine.batchnorm import FrozenBatchNorm2d, freeze_batchnorm
from streamcnn.engine.geometry import TilePlan, TrunkGeometry, UnsupportedLayerError, Window, register_rule, tile_plan
from streamcnn.models.classifier import StreamingClassifier, build_model
from streamcnn.models import scratch as _scratch  # noqa: F401,E402 - registers the from-scratch trunks (resnet18-ln, ...)
from streamcnn.planning.plannable import Plannable
from streamcnn.models.split import Split, split_model
from streamcnn.planning.search import BudgetError, Candidate, PlanReport, enforce_budget, plan
from streamcnn.engine.streaming import RegionSource, StreamingModule
from streamcnn.utils.units import format_size, parse_size

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
    "split_model",
    "Split",
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
        from streamcnn.io import open_image

        return open_image
    raise AttributeError(f"module 'streamcnn' has no attribute {name!r}")
