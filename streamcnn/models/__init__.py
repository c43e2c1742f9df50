"""Models: trunk and head registries, the streamed classifier, and the baselines' strategies.

- :mod:`streamcnn.models.classifier`: :data:`TRUNKS`, :data:`HEADS`, :func:`build_model`,
  :class:`StreamingClassifier`.
- :mod:`streamcnn.models.backbones`, :mod:`streamcnn.models.weights`: torchvision/timm trunks and
  local weight files.
- :mod:`streamcnn.models.scratch`: from-scratch trunks (ws, sws, ln, ...).
- :mod:`streamcnn.models.split`: a whole network cut into trunk + head.
- :mod:`streamcnn.models.patchgd`, :mod:`streamcnn.models.zoomin`: the PatchGD and Zoom-In
  baselines, strategies (:class:`streamcnn.engine.step.Strategy`) that own their training step;
  :mod:`streamcnn.models.strategy`: their memory check against a budget.
"""
from streamcnn.models.classifier import HEADS, TRUNKS, StreamingClassifier, build_model, register_head, register_trunk
from streamcnn.planning.bounds import register_model_builder
from streamcnn.models import scratch as _scratch  # noqa: F401 - registers the from-scratch trunks

__all__ = ["TRUNKS", "HEADS", "register_trunk", "register_head", "StreamingClassifier", "build_model"]

register_model_builder(build_model)  # plan() by trunk name
