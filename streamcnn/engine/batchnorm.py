"""Freezing BatchNorm so a trunk can be streamed.

Train-mode BatchNorm normalises with statistics over the whole batch and image, which
no tile can see. Eval-mode BatchNorm is an affine map per channel (local), so its
weight and bias still get exact gradients. :func:`freeze_batchnorm` switches every
BatchNorm layer to running statistics and keeps it there when ``.train()`` is
called later, by giving the layer a subclass whose ``train`` is a no-op.
"""
from __future__ import annotations

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["freeze_batchnorm", "FrozenBatchNorm2d"]


class _FrozenMixin:
    """Keeps a BatchNorm layer in eval mode whatever ``.train(mode)`` asks."""

    def train(self, mode: bool = True):
        return super().train(False)  # type: ignore[misc]


class FrozenBatchNorm2d(_FrozenMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that always uses running statistics; affine stays trainable."""


_FROZEN_CLASSES: dict[type, type] = {nn.BatchNorm2d: FrozenBatchNorm2d}


def _frozen_class(cls: type) -> type:
    if issubclass(cls, _FrozenMixin):
        return cls
    if cls not in _FROZEN_CLASSES:
        _FROZEN_CLASSES[cls] = type(f"Frozen{cls.__name__}", (_FrozenMixin, cls), {})
    return _FROZEN_CLASSES[cls]


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Put every BatchNorm in ``module`` in eval mode for good; returns ``module``.

    Running statistics are used and no longer updated; the affine weight and bias keep
    their ``requires_grad``. Raises ``ValueError`` for BatchNorm without running
    statistics (``track_running_stats=False``), which has nothing to freeze to.
    """
    for name, m in module.named_modules():
        if isinstance(m, _BatchNorm):
            if m.running_mean is None:
                raise ValueError(
                    f"{name or type(module).__name__}: BatchNorm with track_running_stats=False has no "
                    "running statistics to freeze; use a layer with running statistics"
                )
            m.__class__ = _frozen_class(type(m))
            m.eval()
    return module
