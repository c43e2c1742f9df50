"""Optimizer and learning-rate schedule from an :class:`~streamcnn.training.config.OptimConfig`.

Two recipes: AdamW with linear warmup then cosine decay (stepped every optimizer step; over
the last ``decay_fraction`` of the steps only, constant before),
and the UltraMNIST paper's Adam with exponential decay (multiplied by ``gamma`` once per
epoch, expressed per step so one scheduler covers both). Both are torch's own
``LambdaLR``, so their state is saved and restored with the checkpoint.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from streamcnn.engine.step import make_optimizer
from streamcnn.training.config import OptimConfig

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """The config's optimizer (:func:`streamcnn.engine.step.make_optimizer`) over the trainable parameters."""
    return make_optimizer(config.name, model, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step multiplier of the learning rate: warmup, then cosine / exponential / constant."""
    warmup = config.warmup_steps
    total_steps = max(total_steps, 1)
    steps_per_epoch = max(steps_per_epoch, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "cosine":
            start = total_steps - config.decay_fraction * (total_steps - warmup)
            progress = min(1.0, max(0.0, step - start) / max(1.0, total_steps - start))
            return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if config.schedule == "exponential":
            return config.gamma ** ((step - warmup) // steps_per_epoch)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
