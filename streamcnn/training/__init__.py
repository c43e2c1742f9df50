"""Training: configs, the train/evaluate loop, checkpoints with exact resume, metrics, DDP.

- :func:`load_config`, :class:`TrainConfig`: typed YAML configs with dotted overrides.
- :func:`fit`: a whole run (what ``tools/train.py`` calls); :func:`apply_memory_plan`.
- :func:`train_one_epoch`, :func:`evaluate`: the loop itself.
- :func:`evaluate_checkpoint`: a checkpoint on a manifest folder (``tools/evaluate.py``).
- :class:`SyntheticTextures`: a tiny task where full resolution matters (tests, smoke runs).
- :class:`DownsampledDataset`: the downsampling baseline's input.
"""
from streamcnn.training.baselines import DownsampledDataset, downsample_image
from streamcnn.training.checkpointing import load_checkpoint, save_checkpoint
from streamcnn.training.config import ConfigError, TrainConfig, apply_overrides, load_config
from streamcnn.training.evaluation import evaluate_checkpoint
from streamcnn.training.loop import NonFiniteLossError, evaluate, train_one_epoch
from streamcnn.training.runner import apply_memory_plan, build_training_model, fit
from streamcnn.training.synthetic import SyntheticTextures

__all__ = [
    "TrainConfig",
    "ConfigError",
    "load_config",
    "apply_overrides",
    "fit",
    "apply_memory_plan",
    "build_training_model",
    "train_one_epoch",
    "evaluate",
    "evaluate_checkpoint",
    "NonFiniteLossError",
    "save_checkpoint",
    "load_checkpoint",
    "SyntheticTextures",
    "DownsampledDataset",
    "downsample_image",
]
