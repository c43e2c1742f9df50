"""Forward and backward FLOPs of a training step, counted on fake tensors.

:func:`step_flops` counts the trunk and the head separately (``torch.utils.flop_counter``)
on the whole image, from which the planner prices each plan's recomputation and overlap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from streamcnn.planning.plannable import input_shape, model_copy

__all__ = ["StepFlops", "step_flops"]


@dataclass(frozen=True)
class StepFlops:
    """Forward and backward FLOPs of the trunk on the whole image, and of the head."""

    trunk_forward: int
    trunk_backward: int
    head_forward: int
    head_backward: int

    @property
    def conventional(self) -> int:
        return self.trunk_forward + self.trunk_backward + self.head_forward + self.head_backward


def step_flops(model: nn.Module, image_size: int | Sequence[int], *, batch: int = 1) -> StepFlops:
    """FLOPs of a conventional training step of a ``StreamingClassifier``-like model
    (``.trunk`` a :class:`StreamingModule`, ``.head``), counted on fake tensors."""
    shape = input_shape(model, image_size, batch)
    counts = []
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        sim = model_copy(model, lambda t: fake.from_tensor(t).to("cpu"))
        sim.train()
        x: torch.Tensor = torch.empty(shape)
        for part in (sim.trunk.module, sim.head):
            counter = FlopCounterMode(display=False)
            with counter:
                out = part(x)
                forward = counter.get_total_flops()
                out.backward(torch.ones_like(out))
            counts += [forward, counter.get_total_flops() - forward]
            x = out.detach().requires_grad_(True)
    return StepFlops(*counts)
