"""The memory check of a training strategy (PatchGD, Zoom-In): its step predicted against a budget.

A strategy (:class:`streamcnn.engine.step.Strategy`) has no plan to choose: its memory is set
by what its config fixes (patch size and sampling, regions and their sizes, batch), so the
check predicts the step it runs (:func:`streamcnn.planning.memory.predict_step_memory`, which
simulates the strategy's own micro-step) and refuses a config that does not fit.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from streamcnn.engine.step import Strategy
from streamcnn.planning.memory import budget_counts_suffix, budgeted_bytes, predict_step_memory
from streamcnn.planning.search import BudgetError
from streamcnn.utils.units import format_size, parse_size

__all__ = ["check_budget"]


def check_budget(model: Strategy, image_size: Sequence[int], budget: str | int, *, batch: int = 1,
                 accumulate: int = 1, dtype: torch.dtype | None = None, device: str = "cpu",
                 optimizer: str = "adamw", weight_decay: float = 0.0,
                 counts: str = "process") -> tuple[str, dict[str, Any]]:
    """Predict ``model``'s step and check the part of it that ``counts``
    (:data:`streamcnn.planning.memory.BUDGET_COUNTS`) against ``budget``; returns a description
    and a JSON report, or raises :class:`streamcnn.planning.search.BudgetError`."""
    limit = parse_size(budget)
    estimate = predict_step_memory(model, image_size, batch=batch, dtype=dtype, device=device, optimizer=optimizer,
                                   weight_decay=weight_decay, accumulate=accumulate)
    what = f"{model.describe(image_size, batch)}, on {device}"
    need, of = budgeted_bytes(estimate, counts), budget_counts_suffix(counts)
    if need > limit:
        raise BudgetError(f"{what} needs {format_size(need)}{of}, over the budget of {format_size(limit)}{of}: "
                          f"lower {model.budget_knobs} or train.batch_size, or use a budget of at least "
                          f"{format_size(need)}", need)
    text = f"{what}: predicted peak {format_size(need)}{of} fits the budget of {format_size(limit)}{of}"
    return text, {"method": type(model).__name__, "predicted_bytes": need, "budget_bytes": limit,
                  "budget_counts": counts, "predicted_peak_bytes": estimate.allocated_bytes,
                  "predicted_device_bytes": estimate.process_bytes, "description": model.describe(image_size, batch)}
