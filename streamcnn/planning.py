"""Memory plans: the fastest way to train a model on an image size inside a memory budget.

:func:`plan` lists the candidate ways to run one training step (conventional, whole-image
activation checkpointing, streaming at each stride-aligned tile size, streaming with
checkpointing inside the tile, and on CUDA each streamed plan with the feature map kept in
host memory), prices each by FLOPs (:func:`streamcnn.flops.step_flops` times the
recomputation and the tile overlap), predicts the peak memory of the cheapest ones with
:func:`streamcnn.memory.predict_step_memory` until one fits, and returns a
:class:`~streamcnn.plan_report.PlanReport`: a table a person can read, JSON, a plot, and
``apply(model)``.
Plans more expensive than the chosen one are not simulated unless ``exhaustive=True``.

:func:`enforce_budget` turns the budget into a hard cap on CUDA, so a run that would
exceed it fails with an out-of-memory error instead of silently using the whole card.

Cost model (relative to a conventional step, ``Tf``/``Tb``: trunk forward/backward FLOPs
on the whole image, ``Hf``/``Hb``: the head's, ``rf``: the tile overlap factor)::

    conventional        Tf + Tb                + Hf + Hb
    checkpoint          2 Tf + Tb              + 2 Hf + Hb    (trunk and head recomputed)
    stream              rf (2 Tf + Tb)         + Hf + Hb      (no-grad pass, then with grad)
    stream+checkpoint   rf (3 Tf + Tb)         + 2 Hf + Hb

Offloading the feature map to host memory costs PCIe transfers, not FLOPs, so an offloaded
plan is chosen only when no plan without offload fits.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch
import torch.nn as nn

from .flops import StepFlops, step_flops
from .geometry import tile_plan
from .memory import CUDA_CONTEXT_BYTES, predict_step_memory
from .plan_report import Candidate, PlanReport
from .plannable import meta_copy
from .streaming import StreamingModule
from .units import format_size, pair, parse_size, resolve_dtype

__all__ = ["Candidate", "PlanReport", "BudgetError", "plan", "enforce_budget", "candidate_tile_sizes"]

MAX_TENSOR_ELEMENTS = 2**31  # cuDNN (and some CUDA kernels) index tensors with 32-bit integers


class BudgetError(ValueError):
    """No plan fits the budget; ``min_bytes`` is the smallest budget that would fit."""

    def __init__(self, message: str, min_bytes: int):
        super().__init__(message)
        self.min_bytes = min_bytes


def candidate_tile_sizes(image_size: int | Sequence[int], stride: int) -> list[int]:
    """Tile sides to try: powers of two and 1.5x steps, multiples of ``stride``, from 256 px
    (a quarter of the image for small images; 1/64 of it for huge ones, so that a plan has
    at most about 64 x 64 tiles) up to below the image's longer side."""
    side = max(pair(image_size))
    low = max(min(256, max(stride, side // 4 // stride * stride)), side // 64)
    sizes, base = [], 64
    while base < side:
        for s in (base, base * 3 // 2):
            if low <= s < side and s % stride == 0:
                sizes.append(s)
        base *= 2
    return sizes


def _template(model: nn.Module | str, in_channels: int, num_classes: int, head: str) -> tuple[nn.Module, str]:
    if isinstance(model, str):
        from .models import build_model

        with torch.device("meta"):
            return build_model(model, head=head, num_classes=num_classes, in_channels=in_channels), model
    if not isinstance(getattr(model, "trunk", None), StreamingModule) or not hasattr(model, "head"):
        raise TypeError(f"plan() needs a model name or a StreamingClassifier (with .trunk and .head), "
                        f"got {type(model).__name__}; build one with streamcnn.models.build_model")
    return meta_copy(model), _describe(model)


def _describe(model: nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__} ({params / 1e6:.1f}M params)"


def _candidates(template: nn.Module, image: tuple[int, int], tile_sizes: Sequence[int] | None, device: str,
                allow_offload: bool, flops: StepFlops) -> list[Candidate]:
    geometry = template.trunk.geometry
    tiles = list(tile_sizes) if tile_sizes is not None else candidate_tile_sizes(image, max(geometry.output_stride))
    tf, tb, hf, hb = flops.trunk_forward, flops.trunk_backward, flops.head_forward, flops.head_backward
    total = flops.conventional

    def cost(trunk_passes: float, head_recompute: bool) -> float:
        return (trunk_passes + hf * (2 if head_recompute else 1) + hb) / total

    out = [Candidate("conventional", None, False, False, False, 1, 1.0, None, cost(tf + tb, False)),
           Candidate("checkpoint", None, True, True, False, 1, 1.0, None, cost(2 * tf + tb, True))]
    seen = set()
    for t in sorted(set(int(t) for t in tiles)):
        tp = tile_plan(geometry, image, t)
        if tp.grid in seen or len(tp.tiles) < 2:
            continue  # same tiling as a smaller tile size, or not streaming at all
        seen.add(tp.grid)
        rf = tp.overlap_factor
        for offload in (False, True) if allow_offload and device == "cuda" else (False,):
            out.append(Candidate("stream", t, False, False, offload, len(tp.tiles), rf, tp.max_window,
                                 cost(rf * (2 * tf + tb), False)))
            out.append(Candidate("stream+checkpoint", t, True, True, offload, len(tp.tiles), rf, tp.max_window,
                                 cost(rf * (3 * tf + tb), True)))
    return out


def _rank(c: Candidate) -> tuple:
    return (c.offload, round(c.relative_cost, 9))


def plan(model: nn.Module | str, image_size: int | Sequence[int], budget: int | str, *, batch: int = 1,
         dtype: str | torch.dtype | None = None, in_channels: int = 3, num_classes: int = 28, head: str = "conv",
         device: str | torch.device = "cuda", optimizer: str = "adamw", tile_sizes: Sequence[int] | None = None,
         allow_offload: bool = True, progress: bool = False, exhaustive: bool = False) -> PlanReport:
    """Choose the fastest plan whose predicted training-step peak fits ``budget``.

    ``model``: a :class:`~streamcnn.models.StreamingClassifier` (not modified; see
    :meth:`PlanReport.apply`) or a trunk name for :func:`~streamcnn.models.build_model`
    (with ``in_channels``, ``num_classes``, ``head``). ``budget``: bytes or a size such as
    ``"11GB"`` (10^9) / ``"11GiB"`` (2^30); on CUDA it covers everything the process takes
    from the card (allocator reserved memory and the CUDA context). ``dtype``: fp32 (None),
    bf16 or fp16 autocast. ``exhaustive``: simulate every candidate, not just until the
    cheapest fitting one is found (for tables and plots). Raises :class:`BudgetError` when
    nothing fits.
    """
    started = time.perf_counter()
    budget_bytes = parse_size(budget)
    image = pair(image_size)
    device_type = torch.device(device).type
    autocast_dtype = resolve_dtype(dtype)
    dtype_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    template, name = _template(model, in_channels, num_classes, head)
    flops = step_flops(template, image, batch=batch)
    candidates = _candidates(template, image, tile_sizes, device_type, allow_offload, flops)
    order = sorted(candidates, key=_rank)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(order), desc="planning", unit="plan", leave=False, delay=0.5)
    best_rank = None
    for c in order:
        if best_rank is not None and _rank(c) > best_rank and not exhaustive:
            break
        c.configure(template)
        c.estimate = predict_step_memory(template, image, batch=batch, dtype=autocast_dtype, device=device_type,
                                         optimizer=optimizer)
        c.predicted_peak_bytes = c.estimate.allocated_bytes
        c.predicted_device_bytes = c.estimate.process_bytes
        c.too_large_tensor = device_type == "cuda" and c.estimate.largest_tensor_elements >= MAX_TENSOR_ELEMENTS
        c.fits = c.predicted_device_bytes <= budget_bytes and not c.too_large_tensor
        if c.fits and best_rank is None:
            best_rank = _rank(c)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        runnable = [c for c in candidates if c.fits is not None and not c.too_large_tensor]
        if not runnable:
            h, w = image
            raise BudgetError(
                f"every plan for {name} at {h}x{w} px makes a tensor of 2^31 or more elements, which cuDNN "
                "refuses whatever the budget; use smaller images or a trunk with fewer feature-map channels",
                0)
        smallest = min(runnable, key=lambda c: c.predicted_device_bytes)
        suggest = math.ceil(smallest.predicted_device_bytes / 1e7) * 10**7
        h, w = image
        others = (["a smaller batch"] if batch > 1 else []) + (["bf16"] if autocast_dtype is None else []) + \
            (["smaller tiles (tile_sizes=...)"] if smallest.tile_size else []) + ["a smaller model"]
        hints = "; or try " + (", ".join(others[:-1]) + " or " if len(others) > 1 else "") + others[-1]
        raise BudgetError(
            f"no plan fits the budget of {format_size(budget_bytes)} on {device_type} for {name} at {h}x{w} px "
            f"(batch {batch}, {dtype_name}, {optimizer}): the smallest, {smallest.label}, needs "
            f"{format_size(smallest.predicted_device_bytes)}. Use a budget of at least {format_size(suggest)}"
            f"{hints}.", smallest.predicted_device_bytes)
    chosen = min(fitting, key=lambda c: (*_rank(c), c.predicted_device_bytes))
    return PlanReport(chosen, candidates, budget_bytes, name, image, batch, dtype_name, device_type, optimizer,
                      flops, time.perf_counter() - started)


def enforce_budget(budget_bytes: int | str, device: str | torch.device = "cuda") -> dict:
    """Cap this process's memory on ``device`` at the budget; returns what was done.

    On CUDA the caching allocator is capped with ``torch.cuda.set_per_process_memory_fraction``
    at the budget minus the CUDA context allowance (the context is memory the process takes
    from the card but the allocator does not see), so allocating past the budget raises
    ``torch.OutOfMemoryError`` however large the card is. On CPU nothing is capped (the
    plan keeps the step inside the budget by prediction) and the returned dict says so.
    """
    budget = parse_size(budget_bytes)
    device = torch.device(device)
    if device.type != "cuda":
        return {"device": str(device), "enforced": False, "budget_bytes": budget,
                "reason": f"memory caps are only enforced on CUDA; on {device.type} the plan keeps within "
                          "the budget by prediction"}
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    if budget > props.total_memory:
        raise ValueError(f"the budget {format_size(budget)} is more than the {format_size(props.total_memory)} "
                         f"of cuda:{index} ({props.name}); choose a budget of at most that")
    allocator = budget - CUDA_CONTEXT_BYTES
    if allocator <= 0:
        raise ValueError(f"the budget {format_size(budget)} does not cover the CUDA context "
                         f"({format_size(CUDA_CONTEXT_BYTES)}); choose a larger budget")
    fraction = allocator / props.total_memory
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return {"device": f"cuda:{index}", "enforced": True, "budget_bytes": budget, "allocator_cap_bytes": allocator,
            "fraction": fraction, "total_bytes": props.total_memory, "gpu": props.name,
            "context_allowance_bytes": CUDA_CONTEXT_BYTES}
