"""Memory plans: the fastest way to train a model on an image size inside a memory budget.

:func:`plan` lists the candidate ways to run one training step (conventional, whole-image
activation checkpointing, streaming at each stride-aligned tile size, streaming with
checkpointing inside the tile, and on CUDA each streamed plan with the feature map kept in
host memory), prices each by FLOPs (:func:`streamcnn.planning.flops.step_flops` times the
recomputation and the tile overlap), predicts the peak memory of the cheapest ones with
:func:`streamcnn.planning.memory.predict_step_memory` until one fits, and returns a
:class:`~streamcnn.planning.report.PlanReport`: a table a person can read, JSON, a plot, and
``apply(model)``.
Plans more expensive than the chosen one are not simulated unless ``exhaustive=True``.

:func:`enforce_budget` turns the budget into a hard cap on CUDA, so a run that would
exceed it fails with an out-of-memory error instead of silently using the whole card.

Cost model (relative to a conventional step, ``Tf``/``Tb``: trunk forward/backward FLOPs
on the whole image, ``Hf``/``Hb``: the head's, ``rf``: the tile overlap factor)::

    conventional        Tf + Tb                       + Hf + Hb
    checkpoint          2 Tf + Tb                     + 2 Hf + Hb    (trunk and head recomputed)
    stream              rf_fwd Tf + rf (Tf + Tb)      + Hf + Hb      (no-grad pass, then with grad)
    stream+checkpoint   rf_fwd Tf + rf (2 Tf + Tb)    + 2 Hf + Hb

``rf`` is the backward tiles' overlap and ``rf_fwd`` the no-grad forward's, whose tiles are
chosen apart (larger: it keeps no activations; often the whole image, ``rf_fwd = 1``).
:func:`relative_cost` is this table.

Offloading the feature map to host memory costs PCIe transfers, not FLOPs, so an offloaded
plan is chosen only when no plan without offload fits.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch
import torch.nn as nn

from streamcnn.planning.flops import StepFlops, step_flops
from streamcnn.engine.geometry import tile_plan
from streamcnn.planning.memory import (CPU_RUNTIME_BYTES, CUDA_CONTEXT_BYTES, CUDA_RESERVED_OVERHEAD, budget_counts_suffix,
                     budgeted_bytes, check_budget_counts, predict_step_memory)
from streamcnn.models.classifier import build_model
from streamcnn.planning.report import MODES, Candidate, PlanReport
from streamcnn.planning.plannable import Plannable, input_shape, meta_copy
from streamcnn.engine.streaming import StreamingModule
from streamcnn.utils.units import format_size, pair, parse_size, resolve_dtype

__all__ = ["Candidate", "PlanReport", "BudgetError", "plan", "enforce_budget", "candidate_tile_sizes",
           "relative_cost"]

MAX_TENSOR_ELEMENTS = 2**31  # cuDNN (and some CUDA kernels) index tensors with 32-bit integers


class BudgetError(ValueError):
    """No plan fits the budget; ``min_bytes`` is the smallest budget that would fit."""

    def __init__(self, message: str, min_bytes: int):
        super().__init__(message)
        self.min_bytes = min_bytes


def relative_cost(flops: StepFlops, *, overlap: float | None, forward_overlap: float | None = None,
                  checkpoint: bool = False, head_checkpoint: bool | None = None) -> float:
    """A plan's predicted time relative to a conventional step (the module's cost table).

    ``overlap``: the backward tiles' overlap factor, None for an unstreamed plan;
    ``forward_overlap``: the no-grad forward's (default: ``overlap``); ``checkpoint``:
    activations recomputed (inside each tile, or over the whole image when not streamed);
    ``head_checkpoint``: the head's (default: ``checkpoint``).
    """
    tf, tb, hf, hb = flops.trunk_forward, flops.trunk_backward, flops.head_forward, flops.head_backward
    head = (2 if (checkpoint if head_checkpoint is None else head_checkpoint) else 1) * hf + hb
    if overlap is None:
        trunk = (2 if checkpoint else 1) * tf + tb
    else:
        rf_fwd = overlap if forward_overlap is None else forward_overlap
        trunk = rf_fwd * tf + overlap * ((2 if checkpoint else 1) * tf + tb)
    return (trunk + head) / flops.conventional


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


AUTO = "auto"  # a knob the planner chooses; anything else is fixed by the caller


def _template(model: nn.Module | str, in_channels: int, num_classes: int | None, head: str) -> tuple[nn.Module, str]:
    if isinstance(model, str):
        if num_classes is None:
            raise ValueError(f"plan() builds {model!r} by name and needs num_classes (the number of classes "
                             "in the data); pass num_classes=N")
        with torch.device("meta"):
            return build_model(model, head=head, num_classes=num_classes, in_channels=in_channels), model
    if not isinstance(model, Plannable) or not isinstance(model.trunk, StreamingModule):
        raise TypeError(f"plan() needs a model name or a streamcnn.planning.plannable.Plannable (.trunk a StreamingModule, "
                        f".head, .configure_plan), got {type(model).__name__}; build one with "
                        "streamcnn.models.classifier.build_model")
    return meta_copy(model), _describe(model)


def _describe(model: nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__} ({params / 1e6:.1f}M params)"


def _candidates(template: Plannable, image: tuple[int, int], tile_sizes: Sequence[int] | None, device: str,
                allow_offload: bool, flops: StepFlops, fixed: dict) -> list[Candidate]:
    """Every plan the knobs allow; ``fixed`` knobs are constraints. Per backward tile the
    no-grad forward runs on the same tiles, on each larger ladder tile (fewer tiles), or on
    the whole image."""
    geometry = template.trunk.geometry

    def make(tile, checkpoint: bool, offload: bool, tp=None, forward=(None, None)) -> Candidate:
        head_checkpoint = checkpoint if fixed.get("head_checkpoint", AUTO) == AUTO else fixed["head_checkpoint"]
        if tp is None:
            return Candidate("checkpoint" if checkpoint else "conventional", None, checkpoint, head_checkpoint,
                             offload, 1, 1.0, None, relative_cost(flops, overlap=None, checkpoint=checkpoint,
                                                                  head_checkpoint=head_checkpoint))
        f, fp = forward
        fp = fp or tp
        return Candidate("stream+checkpoint" if checkpoint else "stream", tile, checkpoint, head_checkpoint, offload,
                         len(tp.tiles), tp.overlap_factor, tp.max_window,
                         relative_cost(flops, overlap=tp.overlap_factor, forward_overlap=fp.overlap_factor,
                                       checkpoint=checkpoint, head_checkpoint=head_checkpoint),
                         forward_tile_size=f, forward_overlap=fp.overlap_factor,
                         forward_whole=f is not None and len(fp.tiles) == 1)

    fixed_tile = fixed.get("tile_size", AUTO)
    offloads = (False, True) if allow_offload and device == "cuda" else (False,)
    if device == "cuda" and fixed.get("offload", AUTO) != AUTO:
        offloads = (bool(fixed["offload"]),)
    out = []
    if fixed_tile is None or fixed_tile == AUTO:
        for checkpoint in (False, True):
            out += [make(None, checkpoint, offload) for offload in offloads if not offload
                    or fixed.get("offload") is True]
    if fixed_tile is not None:
        ladder = list(tile_sizes) if tile_sizes is not None else candidate_tile_sizes(image, max(geometry.output_stride))
        tiles = [fixed_tile] if fixed_tile != AUTO else ladder
        forwards: dict = {}
        for t in sorted(set(int(t) for t in ladder)) + [max(image)]:
            fp = tile_plan(geometry, image, t)
            forwards.setdefault(fp.grid, (t, fp))  # a larger tile with the same tiling adds nothing
        seen = set()
        for t in sorted(set(int(t) for t in tiles)):
            tp = tile_plan(geometry, image, t)
            if fixed_tile == AUTO and (tp.grid in seen or len(tp.tiles) < 2):
                continue  # same tiling as a smaller tile size, or not streaming at all
            seen.add(tp.grid)
            options = [(None, None)] + [(f, fp) for f, fp in forwards.values() if len(fp.tiles) < len(tp.tiles)]
            for offload in offloads:
                out += [make(t, checkpoint, offload, tp, forward) for checkpoint in (False, True)
                        for forward in options]
    if fixed.get("checkpoint", AUTO) != AUTO:
        out = [c for c in out if c.checkpoint == fixed["checkpoint"]]
    return out


def _rank(c: Candidate) -> tuple:
    return (c.offload, round(c.relative_cost, 9))


def _leanest(template: nn.Module, image: tuple[int, int], tile_sizes: Sequence[int] | None, device: str,
             allow_offload: bool, fixed: dict) -> list[Candidate]:
    """The plans the knobs allow that are expected to need the least memory (not priced:
    their cost is not needed): whole-image checkpointing, and streaming at the smallest tile,
    checkpointed, offloaded where possible, the forward on the same tiles."""
    checkpoint = fixed.get("checkpoint", AUTO) in (AUTO, True)
    head_checkpoint = checkpoint if fixed.get("head_checkpoint", AUTO) == AUTO else fixed["head_checkpoint"]
    offload = allow_offload and device == "cuda" and fixed.get("offload", AUTO) in (AUTO, True)
    fixed_tile = fixed.get("tile_size", AUTO)
    out = []
    if fixed_tile in (AUTO, None):
        out.append(Candidate("checkpoint" if checkpoint else "conventional", None, checkpoint, head_checkpoint,
                             False, 1, 1.0, None, math.nan))
    if fixed_tile is not None:
        geometry = template.trunk.geometry
        tiles = [fixed_tile] if fixed_tile != AUTO else \
            list(tile_sizes) if tile_sizes is not None else candidate_tile_sizes(image, max(geometry.output_stride))
        for t in sorted(set(int(t) for t in tiles)):
            tp = tile_plan(geometry, image, t)
            if len(tp.tiles) >= 2 or fixed_tile != AUTO:
                out.append(Candidate("stream+checkpoint" if checkpoint else "stream", t, checkpoint, head_checkpoint,
                                     offload, len(tp.tiles), tp.overlap_factor, tp.max_window, math.nan))
                break
    return out


def _lower_bound(template: nn.Module, image: tuple[int, int], batch: int, optimizer: str,
                 autocast_dtype: torch.dtype | None, device_type: str, lazy_input: bool, allow_offload: bool,
                 counts: str) -> int:
    """Bytes every plan needs, without simulating one: parameters, buffers and optimizer
    state, plus the larger of the parameter gradients and (on CPU, or without offload) the
    feature map with its gradient, which the head's backward holds together; on CPU the
    image unless it is read lazily; and when the budget counts the process, the CPU runtime
    or the CUDA context."""
    trainable = sum(p.numel() * p.element_size() for p in template.parameters() if p.requires_grad)
    fixed = sum(t.numel() * t.element_size() for t in [*template.parameters(), *template.buffers()])
    total = fixed + trainable * {"sgd": 1}.get(optimizer, 2)
    transient = trainable
    if device_type == "cpu" or not allow_offload:
        channels = input_shape(template, 1, 1)[1]
        probe = template.trunk.module(torch.empty(1, channels, 256, 256, device="meta"))
        out_h, out_w = tile_plan(template.trunk.geometry, image, max(image)).output_size
        itemsize = torch.finfo(autocast_dtype).bits // 8 if autocast_dtype is not None else probe.element_size()
        transient = max(transient, 2 * batch * probe.shape[1] * out_h * out_w * itemsize)
    total += transient
    if device_type == "cpu":
        if not lazy_input:
            total += input_shape(template, image, batch)[1] * batch * image[0] * image[1] * 4
    if counts == "tensors":
        return total
    return total + (CPU_RUNTIME_BYTES if device_type == "cpu" else CUDA_CONTEXT_BYTES)


def plan(model: nn.Module | str, image_size: int | Sequence[int], budget: int | str, *, batch: int = 1,
         accumulate: int = 1, dtype: str | torch.dtype | None = None, in_channels: int = 3,
         num_classes: int | None = None, head: str = "conv", device: str | torch.device = "cuda",
         optimizer: str = "adamw", weight_decay: float = 0.0, tile_sizes: Sequence[int] | None = None,
         allow_offload: bool = True, tile_size: int | None | str = AUTO, checkpoint: bool | str = AUTO,
         head_checkpoint: bool | str = AUTO, offload: bool | str = AUTO, progress: bool = False,
         exhaustive: bool = False, lazy_input: bool = False, modes: Sequence[str] | None = None,
         counts: str = "process") -> PlanReport:
    """Choose the fastest plan whose predicted training-step peak fits ``budget``.

    ``model``: a :class:`~streamcnn.planning.plannable.Plannable` such as a
    :class:`~streamcnn.models.classifier.StreamingClassifier` (not modified; see
    :meth:`PlanReport.apply`) or a trunk name for :func:`~streamcnn.models.classifier.build_model`
    (with ``in_channels``, ``num_classes``, ``head``). ``budget``: bytes or a size such as
    ``"11GB"`` (10^9) / ``"11GiB"`` (2^30); with ``counts="process"`` (the default) it covers
    everything the process takes from the card on CUDA (allocator reserved memory and the CUDA
    context) and the process's resident memory on CPU; with ``counts="tensors"`` only the
    allocator's tensor peak (``torch.cuda.max_memory_allocated`` on CUDA, the CPU allocator's
    peak on CPU: memory the plan moves, without the runtime it cannot). The step is :func:`streamcnn.engine.step.training_step`: ``accumulate``
    micro-batches of ``batch`` images, ``dtype`` fp32 (None), bf16 or fp16 autocast,
    ``optimizer`` with ``weight_decay``. ``tile_size`` (an int, or None for no streaming),
    ``checkpoint``, ``head_checkpoint`` and ``offload``: "auto" lets the planner choose; any
    other value is a constraint every candidate keeps. ``lazy_input``: images come from
    region sources read a window at a time (not held in memory). ``modes``: only these plan
    modes (e.g. ``["stream", "stream+checkpoint"]``; default: all). ``exhaustive``: simulate
    every candidate, not just until the cheapest fitting one is found (for tables and
    plots). Each streamed plan's no-grad forward gets its own, larger tiles where they fit.
    Raises :class:`BudgetError` when nothing fits; a budget below what every plan needs
    (:func:`_lower_bound`) is refused before any search.
    """
    started = time.perf_counter()
    budget_bytes = parse_size(budget)
    check_budget_counts(counts)
    image = pair(image_size)
    device_type = torch.device(device).type
    autocast_dtype = resolve_dtype(dtype)
    dtype_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]
    if batch < 1 or accumulate < 1:
        raise ValueError(f"batch and accumulate must be at least 1, got {batch} and {accumulate}")
    fixed = {k: v for k, v in dict(tile_size=tile_size, checkpoint=checkpoint, head_checkpoint=head_checkpoint,
                                   offload=offload).items() if v != AUTO}
    template, name = _template(model, in_channels, num_classes, head)

    def simulate(c: Candidate) -> None:
        c.configure(template)
        c.estimate = predict_step_memory(template, image, batch=batch, dtype=autocast_dtype, device=device_type,
                                         optimizer=optimizer, weight_decay=weight_decay, accumulate=accumulate,
                                         lazy_input=lazy_input)
        c.predicted_peak_bytes = c.estimate.allocated_bytes
        c.predicted_device_bytes = c.estimate.process_bytes
        c.predicted_host_bytes = c.estimate.host_bytes
        c.budgeted_bytes = budgeted_bytes(c.estimate, counts)
        c.too_large_tensor = device_type == "cuda" and c.estimate.largest_tensor_elements >= MAX_TENSOR_ELEMENTS
        c.fits = c.budgeted_bytes <= budget_bytes and not c.too_large_tensor

    def refuse(smallest: Candidate) -> BudgetError:
        suggest = math.ceil(smallest.budgeted_bytes / 1e7) * 10**7
        h, w = image
        others = (["a smaller batch"] if batch > 1 else []) + (["bf16"] if autocast_dtype is None else []) + \
            (["smaller tiles (tile_sizes=...)"] if smallest.tile_size else []) + \
            ([f"leaving {', '.join(sorted(fixed))} to the planner"] if fixed else []) + ["a smaller model"]
        hints = "; or try " + (", ".join(others[:-1]) + " or " if len(others) > 1 else "") + others[-1]
        of = budget_counts_suffix(counts)
        return BudgetError(
            f"no plan fits the budget of {format_size(budget_bytes)}{of} on {device_type} for {name} at {h}x{w} px "
            f"(batch {batch}, {dtype_name}, {optimizer}): the smallest, {smallest.label}, needs "
            f"{format_size(smallest.budgeted_bytes)}{of}. Use a budget of at least {format_size(suggest)}"
            f"{hints}.", smallest.budgeted_bytes)

    # Fast refusal: a budget below a bound that every plan needs is refused before the FLOPs
    # and the candidates are worked out, naming the leaner of the two leanest plans.
    floor = _lower_bound(template, image, batch, optimizer, autocast_dtype, device_type, lazy_input, allow_offload,
                         counts)
    if budget_bytes < floor and not exhaustive:
        probes = _leanest(template, image, tile_sizes, device_type, allow_offload, fixed)
        for c in probes:
            simulate(c)
        raise refuse(min(probes, key=lambda c: (c.too_large_tensor, c.budgeted_bytes)))
    flops = step_flops(template, image, batch=batch)
    candidates = _candidates(template, image, tile_sizes, device_type, allow_offload, flops, fixed)
    if modes is not None:
        unknown = sorted(set(modes) - set(MODES))
        if unknown:
            raise ValueError(f"unknown plan mode(s) {unknown}; choose from {list(MODES)}")
        candidates = [c for c in candidates if c.mode in modes]
    order = sorted(candidates, key=_rank)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(order), desc="planning", unit="plan", leave=False, delay=0.5)
    best_rank = None
    too_big_forward: dict[int | None, int] = {}   # forward tile -> its forward pass alone exceeds the budget
    for c in order:
        if best_rank is not None and _rank(c) > best_rank and not exhaustive:
            break
        key = (c.forward_tile_size, c.offload, c.checkpoint)
        if c.fits is None and c.forward_tile_size is not None and key in too_big_forward and not exhaustive:
            continue  # the same forward already failed alone; its backward cannot rescue it
        if c.fits is None:
            simulate(c)
        if not c.fits and c.forward_tile_size is not None and c.estimate.forward_bytes:
            if _estimate_forward(c, device_type, counts) > budget_bytes:
                too_big_forward[key] = c.estimate.forward_bytes
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
        raise refuse(min(runnable, key=lambda c: c.budgeted_bytes))
    chosen = min(fitting, key=lambda c: (*_rank(c), c.budgeted_bytes))
    return PlanReport(chosen, candidates, budget_bytes, name, image, batch, dtype_name, device_type, optimizer,
                      flops, time.perf_counter() - started, accumulate=accumulate, fixed=fixed, counts=counts)


def _estimate_forward(c: Candidate, device_type: str, counts: str) -> int:
    """What the budget is compared with, for the live peak of the forward pass alone."""
    from streamcnn.planning.memory import _estimate

    return budgeted_bytes(_estimate(device_type, c.estimate.forward_bytes, c.estimate.base_bytes), counts)


def enforce_budget(budget_bytes: int | str, device: str | torch.device = "cuda", *, counts: str = "process") -> dict:
    """Cap this process's memory on ``device`` at the budget; returns what was done.

    On CUDA the caching allocator is capped with ``torch.cuda.set_per_process_memory_fraction``
    at the budget minus the CUDA context allowance (the context is memory the process takes
    from the card but the allocator does not see), so allocating past the budget raises
    ``torch.OutOfMemoryError`` however large the card is. A budget that counts tensors
    (``counts="tensors"``) caps the allocator at the budget plus the reserved-memory
    fragmentation allowance instead (its reserved memory may exceed its tensors). On CPU nothing is capped (the
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
    check_budget_counts(counts)
    allocator = budget - CUDA_CONTEXT_BYTES if counts == "process" else int(budget * (1 + CUDA_RESERVED_OVERHEAD))
    if allocator <= 0:
        raise ValueError(f"the budget {format_size(budget)} does not cover the CUDA context "
                         f"({format_size(CUDA_CONTEXT_BYTES)}); choose a larger budget")
    fraction = allocator / props.total_memory
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return {"device": f"cuda:{index}", "enforced": True, "budget_bytes": budget, "allocator_cap_bytes": allocator,
            "fraction": fraction, "total_bytes": props.total_memory, "gpu": props.name,
            "context_allowance_bytes": CUDA_CONTEXT_BYTES}
