"""The training step: what the trainer runs and the planner simulates, defined once.

- :func:`micro_step`: one micro-batch: the images as model input (integer pixels to
  [0, 1]), the forward under autocast, cross-entropy on float logits, and the backward of
  the loss divided by the accumulation (scaled by the ``GradScaler`` when one is given).
- :func:`optimizer_step`: the optimizer (through the scaler) and ``zero_grad``.
- :func:`training_step`: ``micro_batches`` micro-steps and one optimizer step, as
  ``training/loop.py`` takes them; the planner simulates it with two micro-batches (the
  second runs with the first's ``.grad`` live; later ones are alike) and measures it with
  all of them.
- :data:`OPTIMIZERS` / :func:`make_optimizer`: the one list of optimizers the trainer
  offers and the planner prices (their state is what a step holds besides the weights).
- :class:`Strategy`: a model that trains by its own micro-step (PatchGD's inner
  iterations, Zoom-In's sampled regions); :func:`micro_step` runs a strategy's own step and
  the standard one (:func:`standard_micro_step`) for every other model.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from streamcnn.utils.units import pixels_to_unit

__all__ = ["OPTIMIZERS", "Strategy", "loss_of", "make_optimizer", "micro_step", "optimizer_step",
           "standard_micro_step", "training_step"]

#: The optimizers by name. Both hold two moment tensors per parameter; SGD is not offered
#: because the trainer's schedules and configs are written for Adam-type optimizers.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
}


def make_optimizer(name: str, model: nn.Module, *, lr: float = 1e-3, weight_decay: float = 0.0,
                   foreach: bool | None = None) -> torch.optim.Optimizer:
    """Optimizer ``name`` (a key of :data:`OPTIMIZERS`) over ``model``'s trainable parameters;
    no weight decay on biases and norm weights (parameters of one dimension or fewer).

    Adam's weight decay is L2 through the gradient (a copy of the gradients during the
    step), AdamW's is decoupled (in place), so the decay matters to the peak too."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return OPTIMIZERS[name](groups, lr=lr, foreach=foreach)


def allocate_optimizer_state(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Allocate the state as the first real step would (a step on zero gradients), so that
    a predicted or measured step is a steady one. Changes the parameters as that step would."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def model_input(images: Any) -> Any:
    """Integer image tensors become float in [0, 1]; float tensors and readers (read lazily by
    the model, which converts each window) pass through."""
    if isinstance(images, torch.Tensor):
        return pixels_to_unit(images)
    return images


def loss_of(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy in at least float32 (autocast's bf16/fp16 logits are widened; float64 stays).

    ``class_weights``: the mean over images of ``class_weights[label]`` times each image's
    cross-entropy (not torch's ``weight=``, which divides by the batch's weights and so cancels
    for a batch of one slide)."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = labels.to(logits.device)
    if class_weights is None:
        return F.cross_entropy(wide, targets)
    per_image = F.cross_entropy(wide, targets, reduction="none")
    return (per_image * class_weights.to(per_image.device, per_image.dtype)[targets]).mean()


class Strategy(nn.Module, ABC):
    """A model that trains by its own micro-step instead of one forward and one backward.

    :meth:`micro_step` takes the arguments of :func:`micro_step` and returns the same: the
    (unscaled) loss and the logits, detached, having added its gradients weighted by
    ``1 / accumulate`` (times the scaler's scale). Its ``forward`` is the evaluation forward.
    ``budget_knobs`` names the config settings that set its memory (for messages).
    """

    budget_knobs: str = "the model's sizes"

    @abstractmethod
    def micro_step(self, images: Any, labels: torch.Tensor, *, device_type: str, accumulate: int = 1,
                   amp_dtype: torch.dtype | None = None,
                   scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch's forward(s), loss and backward(s)."""


def standard_micro_step(model: nn.Module, images: Any, labels: torch.Tensor, *, device_type: str,
                        accumulate: int = 1, amp_dtype: torch.dtype | None = None,
                        scaler: torch.amp.GradScaler | None = None,
                        class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward under autocast, :func:`loss_of`, and the backward of ``loss / accumulate``."""
    with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(model_input(images))
        loss = loss_of(logits, labels, class_weights)
    scaled = loss / accumulate
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return loss.detach(), logits.detach()


def micro_step(model: nn.Module, images: Any, labels: torch.Tensor, *, device_type: str, accumulate: int = 1,
               amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
               class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss and backward of one micro-batch; returns the (unscaled) loss and the logits, detached.

    The backward adds ``loss / accumulate`` (times the scaler's scale) to each ``.grad``. A
    :class:`Strategy` (PatchGD, Zoom-In) runs its own step, with the same arguments and result.
    ``class_weights``: a class-weighted loss (:func:`loss_of`), for the standard step only.
    """
    options = dict(device_type=device_type, accumulate=accumulate, amp_dtype=amp_dtype, scaler=scaler)
    wrapped = getattr(model, "module", None)
    if isinstance(model, nn.parallel.DistributedDataParallel) and isinstance(wrapped, Strategy):
        raise ValueError(f"{type(wrapped).__name__} trains by its own step, which DistributedDataParallel would "
                         f"bypass (its gradients would not be averaged): train on one process (train.processes: 1)")
    if isinstance(model, Strategy):
        if class_weights is not None:
            raise ValueError(f"{type(model).__name__} trains by its own step, without a class-weighted loss "
                             "(data.balance=loss): use data.balance=class")
        return model.micro_step(images, labels, **options)
    return standard_micro_step(model, images, labels, **options, class_weights=class_weights)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
    """The accumulated gradients' update (skipped by the scaler when they are not finite), then zero_grad."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_step(model: nn.Module, images: Any, labels: torch.Tensor, optimizer: torch.optim.Optimizer, *,
                  device_type: str, accumulate: int = 1, micro_batches: int | None = None,
                  amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None) -> None:
    """One optimizer step: ``micro_batches`` (default ``accumulate``) micro-steps on ``images``,
    then :func:`optimizer_step`. The previous micro-step's outputs stay referenced while the
    next micro-step and the optimizer step run, as the trainer's loop variables do."""
    outputs = None
    for _ in range(accumulate if micro_batches is None else micro_batches):
        outputs = micro_step(model, images, labels, device_type=device_type, accumulate=accumulate,
                             amp_dtype=amp_dtype, scaler=scaler)
    optimizer_step(optimizer, scaler)
    del outputs
