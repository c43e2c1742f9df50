"""Memory plans: the fastest way to train a model on an image size inside a memory budget.

:func:`plan` is three steps. :func:`candidates` lists the ways to run one training step
(conventional, whole-image activation checkpointing, streaming at each stride-aligned tile
size, streaming with checkpointing inside the tile, on CUDA each streamed plan with the
feature map kept in host memory, and for a pool head streaming that pools tile by tile so
the feature map never exists whole) and prices each by FLOPs; :class:`Search` simulates
(:class:`~streamcnn.planning.memory.StepSimulator`) and :meth:`Search.choose` picks the
cheapest that fits. It returns a :class:`~streamcnn.planning.report.PlanReport`.

What makes it fast at any image size: the geometry and the trunk's costs are computed once
(tile plans are priced from their rows and columns, :mod:`streamcnn.planning.tiles`; the
fake model and optimizer state are made once); a streamed step is two phases, the no-grad
forward and the rest, whose peaks are simulated once each and combined for every plan that
shares them (:func:`~streamcnn.planning.memory.compose`); a phase's peak grows with its
window, so a window that does not fit rules out every larger one, and the largest tile that
fits is found by bisection; and a budget or a size no plan can meet is refused from bounds
(:func:`refusal_from_bounds`) before anything is simulated, naming the largest image side
that could fit. ``exhaustive=True`` simulates every candidate (for tables and plots).

:func:`enforce_budget` turns the budget into a hard cap on CUDA.

Cost model (relative to a conventional step, ``Tf``/``Tb``: trunk forward/backward FLOPs
on the whole image, ``Hf``/``Hb``: the head's, ``rf``: the tile overlap factor)::

    conventional        Tf + Tb                       + Hf + Hb
    checkpoint          2 Tf + Tb                     + 2 Hf + Hb    (trunk and head recomputed)
    stream              rf_fwd Tf + rf (Tf + Tb)      + Hf + Hb      (no-grad pass, then with grad)
    stream+checkpoint   rf_fwd Tf + rf (2 Tf + Tb)    + 2 Hf + Hb

``rf`` is the backward tiles' overlap and ``rf_fwd`` the no-grad forward's, whose tiles are
chosen apart (larger: it keeps no activations; often the whole image, ``rf_fwd = 1``); a
pooled plan's forward runs on the backward's tiles. Offloading the feature map costs PCIe
transfers, not FLOPs, so an offloaded plan is chosen only when no plan without offload fits.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn as nn

from streamcnn.planning.bounds import MAX_TENSOR_ELEMENTS, BudgetError, Request, refusal_from_bounds
from streamcnn.planning.flops import StepFlops, step_flops
from streamcnn.planning.memory import (CUDA_CONTEXT_BYTES, CUDA_RESERVED_OVERHEAD, StepSimulator, budgeted_bytes,
                                       check_budget_counts, compose, phase_estimate)
from streamcnn.planning.report import MODES, Candidate, PlanReport
from streamcnn.planning.tiles import candidate_tile_sizes
from streamcnn.utils.units import format_size, parse_size

__all__ = ["Candidate", "PlanReport", "BudgetError", "plan", "enforce_budget", "candidate_tile_sizes",
           "relative_cost", "candidates", "Search", "MAX_TENSOR_ELEMENTS"]

AUTO = "auto"  # a knob the planner chooses; anything else is fixed by the caller


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


def candidates(request: Request, flops: StepFlops) -> list[Candidate]:
    """Every plan the knobs allow (``request.fixed`` knobs are constraints), priced. Per
    backward tile the no-grad forward runs on the same tiles, on each larger ladder tile
    (fewer tiles), or on the whole image; a pooled plan's on the backward's tiles."""
    fixed, image = request.fixed, request.image
    head_fixed = fixed.get("head_checkpoint", AUTO)

    def make(checkpoint: bool, offload: bool, tile=None, forward=None, pool=None) -> Candidate:
        head_checkpoint = checkpoint if head_fixed == AUTO else head_fixed
        if tile is None:
            return Candidate("checkpoint" if checkpoint else "conventional", None, checkpoint, head_checkpoint,
                             offload, 1, 1.0, None, relative_cost(flops, overlap=None, checkpoint=checkpoint,
                                                                  head_checkpoint=head_checkpoint))
        fwd = forward or tile
        return Candidate("stream+checkpoint" if checkpoint else "stream", tile.tile_size, checkpoint, head_checkpoint,
                         offload, tile.n_tiles, tile.overlap_factor, tile.max_window,
                         relative_cost(flops, overlap=tile.overlap_factor, forward_overlap=fwd.overlap_factor,
                                       checkpoint=checkpoint, head_checkpoint=head_checkpoint),
                         forward_tile_size=None if forward is None else forward.tile_size,
                         forward_overlap=fwd.overlap_factor, forward_whole=forward is not None and forward.n_tiles == 1,
                         pool=pool, forward_window=fwd.max_window)

    fixed_tile = fixed.get("tile_size", AUTO)
    offloads = (False, True) if request.allow_offload and request.device_type == "cuda" else (False,)
    if request.device_type == "cuda" and fixed.get("offload", AUTO) != AUTO:
        offloads = (bool(fixed["offload"]),)
    out = []
    if fixed_tile is None or fixed_tile == AUTO:
        for checkpoint in (False, True):
            out += [make(checkpoint, offload) for offload in offloads if not offload or fixed.get("offload") is True]
    if fixed_tile is not None:
        ladder = request.ladder()
        tiles = [fixed_tile] if fixed_tile != AUTO else ladder
        forwards: dict = {}
        for t in sorted(set(ladder)) + [max(image)]:
            forwards.setdefault(request.summary(t).grid, request.summary(t))  # same tiling: nothing new
        seen = set()
        for t in sorted(set(int(t) for t in tiles)):
            tile = request.summary(t)
            if fixed_tile == AUTO and (tile.grid in seen or tile.n_tiles < 2):
                continue  # same tiling as a smaller tile size, or not streaming at all
            seen.add(tile.grid)
            options = [None] + [f for f in forwards.values() if f.n_tiles < tile.n_tiles]
            for offload in offloads:
                out += [make(checkpoint, offload, tile, forward) for checkpoint in (False, True) for forward in options]
            if "meanmax" in request.pools and fixed.get("offload", AUTO) is not True:
                out += [make(checkpoint, False, tile, pool="meanmax") for checkpoint in (False, True)]
    if fixed.get("checkpoint", AUTO) != AUTO:
        out = [c for c in out if c.checkpoint == fixed["checkpoint"]]
    return out


def _rank(c: Candidate) -> tuple:
    return (c.offload, round(c.relative_cost, 9))


def _area(window: tuple[int, int] | None) -> int:
    return 0 if window is None else window[0] * window[1]


class Search:
    """Simulations of a request's candidates, shared between candidates with a phase in common.

    A streamed candidate's peak is the larger of its no-grad forward's and the rest of its
    step's (:func:`~streamcnn.planning.memory.compose`); each phase is keyed by what decides it
    (forward: its window, offload, pooling; rest: the backward tile, checkpointing, offload,
    pooling). A phase over the budget rules out every candidate of the same kind whose
    window is at least as large (peaks grow with the window): those are marked ``fits=False``
    with ``bound=True`` and the failing phase's bytes as a lower bound, without a simulation.
    """

    def __init__(self, request: Request):
        self.request = request
        self.simulations = 0
        self._simulator: StepSimulator | None = None
        self._phases: dict[tuple, dict] = {}   # (phase, family) -> {window area: (key, estimate)}

    @staticmethod
    def _families(c: Candidate) -> dict[str, tuple]:
        return {"forward": (c.offload, c.pool), "rest": (c.checkpoint, c.head_checkpoint, c.offload, c.pool)}

    def _over(self, estimate) -> tuple[bool, bool]:
        """(over the budget, a tensor over the element limit) for ``estimate``."""
        large = self.request.limited and estimate.largest_tensor_elements >= self.request.max_elements
        return budgeted_bytes(estimate, self.request.counts) > self.request.budget, large

    def _fill(self, c: Candidate, estimate, bound: bool = False) -> None:
        c.estimate, c.bound = estimate, bound
        c.predicted_peak_bytes, c.predicted_device_bytes = estimate.allocated_bytes, estimate.process_bytes
        c.predicted_host_bytes = estimate.host_bytes
        c.budgeted_bytes = budgeted_bytes(estimate, self.request.counts)
        over, large = self._over(estimate)
        c.too_large_tensor = large
        c.fits = not (over or large)

    def simulate(self, c: Candidate) -> None:
        """Predict ``c``'s step exactly and remember its phases."""
        if self._simulator is None:
            r = self.request
            self._simulator = StepSimulator(r.template, r.image, batch=r.batch, dtype=r.autocast_dtype,
                                            device=r.device_type, optimizer=r.optimizer,
                                            weight_decay=r.weight_decay, accumulate=r.accumulate,
                                            lazy_input=r.lazy_input)
        self.simulations += 1
        estimate = self._simulator.predict(c.configure)
        self._fill(c, estimate)
        c.simulated = True
        if c.tile_size is not None:
            families = self._families(c)
            for phase, window in (("forward", c.forward_window), ("rest", c.max_window)):
                key = (c.forward_tile_size or c.tile_size) if phase == "forward" else c.tile_size
                self._phases.setdefault((phase, families[phase]), {})[_area(window), key] = phase_estimate(
                    estimate, phase)

    def _known(self, c: Candidate, phase: str):
        """(exact phase estimate or None, a phase estimate that rules ``c`` out or None)."""
        window = c.forward_window if phase == "forward" else c.max_window
        key = (c.forward_tile_size or c.tile_size) if phase == "forward" else c.tile_size
        entries = self._phases.get((phase, self._families(c)[phase]), {})
        for (area, _), estimate in sorted(entries.items(), key=lambda e: e[0][0]):
            if area <= _area(window) and any(self._over(estimate)):
                return entries.get((_area(window), key)), estimate
        return entries.get((_area(window), key)), None

    def decide(self, c: Candidate) -> bool:
        """Fill ``c`` from what is known (a bound that rules it out, or both its phases); False
        when it needs a simulation of its own."""
        if c.fits is not None:
            return True
        r = self.request
        if c.pool is None and r.limited and r.map_elements >= r.max_elements:
            c.fits, c.bound, c.too_large_tensor = False, True, True   # the whole map is over the limit
            return True
        if c.tile_size is None and r.limited and r.unstreamed_largest() >= r.max_elements:
            c.fits, c.bound, c.too_large_tensor = False, True, True   # a whole-image layer over the limit
            return True
        if c.tile_size is None or r.exhaustive:
            return False
        (forward, out_f), (rest, out_r) = self._known(c, "forward"), self._known(c, "rest")
        if out_f is not None or out_r is not None:
            self._fill(c, out_r if out_r is not None else out_f, bound=True)
            return True
        if forward is None or rest is None:
            return False
        self._fill(c, compose(forward, rest))
        return True

    def _bisect(self, pool: list[Candidate], phase: str) -> None:
        """Find where ``phase`` stops fitting among ``pool`` (one kind, sorted by window) in
        about log2(len) simulations."""
        lo, hi = -1, len(pool)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            exact, ruled_out = self._known(pool[mid], phase)
            if exact is None and ruled_out is None:
                self.simulate(pool[mid])
                exact, ruled_out = self._known(pool[mid], phase)
            over = ruled_out is not None or any(self._over(exact))
            lo, hi = (lo, mid) if over else (mid, hi)

    def probe(self, c: Candidate, every: list[Candidate]) -> None:
        """Bisect ``c``'s kind of backward tiles, then of forward windows, before deciding it."""
        families = self._families(c)
        same = [x for x in every if x.tile_size is not None and self._families(x)["rest"] == families["rest"]
                and x.forward_tile_size is None]
        self._bisect(sorted(same, key=lambda x: _area(x.max_window)), "rest")
        if c.forward_tile_size is not None:
            by_window: dict[int, Candidate] = {}
            for x in every:
                if x.tile_size == c.tile_size and self._families(x) == families:
                    by_window.setdefault(_area(x.forward_window), x)
            self._bisect([by_window[a] for a in sorted(by_window)], "forward")

    def smallest(self, every: list[Candidate]) -> Candidate | None:
        """The decided candidate that needs the least memory, simulated (its bytes exact), or
        None when every one makes a tensor over the element limit."""
        while True:
            runnable = [c for c in every if c.fits is not None and not c.too_large_tensor and c.budgeted_bytes]
            if not runnable:
                return None
            least = min(runnable, key=lambda c: c.budgeted_bytes)
            if least.simulated:
                return least
            self.simulate(least)

    def choose(self, every: list[Candidate], progress: bool = False) -> Candidate | None:
        """The cheapest candidate that fits (None if none does), deciding as few as it can."""
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(every), desc="planning", unit="plan", leave=False, delay=0.5)
        best = None
        for c in sorted(every, key=_rank):
            if best is not None and _rank(c) > _rank(best) and not self.request.exhaustive:
                break
            if not self.decide(c):
                if c.tile_size is not None and not self.request.exhaustive:
                    self.probe(c, every)
                if not self.decide(c):
                    self.simulate(c)
            if c.fits and best is None:
                best = c
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        if self.request.exhaustive:
            for c in every:
                if not getattr(c, "simulated", False) and not (c.bound and c.too_large_tensor):
                    self.simulate(c)
        fitting = [c for c in every if c.fits]
        if not fitting:
            return None
        chosen = min(fitting, key=lambda c: (*_rank(c), c.budgeted_bytes))
        if not getattr(chosen, "simulated", False):
            self.simulate(chosen)   # exact numbers (host bytes) for the plan that is reported
        return chosen


def plan(model: nn.Module | str, image_size: int | Sequence[int], budget: int | str, *, batch: int = 1,
         accumulate: int = 1, dtype: str | torch.dtype | None = None, in_channels: int = 3,
         num_classes: int | None = 2, head: str = "conv", device: str | torch.device = "cuda",
         optimizer: str = "adamw", weight_decay: float = 0.0, tile_sizes: Sequence[int] | None = None,
         allow_offload: bool = True, tile_size: int | None | str = AUTO, checkpoint: bool | str = AUTO,
         head_checkpoint: bool | str = AUTO, offload: bool | str = AUTO, progress: bool = False,
         exhaustive: bool = False, lazy_input: bool = False, modes: Sequence[str] | None = None,
         counts: str = "process", max_elements: int | None = MAX_TENSOR_ELEMENTS) -> PlanReport:
    """Choose the fastest plan whose predicted training-step peak fits ``budget``.

    ``model``: a :class:`~streamcnn.planning.plannable.Plannable` such as a
    :class:`~streamcnn.models.classifier.StreamingClassifier` (not modified; see
    :meth:`PlanReport.apply`) or a trunk name for :func:`~streamcnn.models.classifier.build_model`
    (with ``in_channels``, ``num_classes`` (default 2: the last layer is a rounding error), ``head``).
    ``budget``: bytes or a size such as ``"11GB"`` (10^9) / ``"11GiB"`` (2^30); with
    ``counts="process"`` (the default) it covers everything the process takes from the card on
    CUDA (allocator reserved memory and the CUDA context) and the process's resident memory on
    CPU; with ``counts="tensors"`` only the allocator's tensor peak. The step is
    :func:`streamcnn.engine.step.training_step`: ``accumulate`` micro-batches of ``batch``
    images, ``dtype`` fp32 (None), bf16 or fp16 autocast, ``optimizer`` with ``weight_decay``.
    ``tile_size`` (an int, or None for no streaming), ``checkpoint``, ``head_checkpoint`` and
    ``offload``: "auto" lets the planner choose; any other value is a constraint every
    candidate keeps. ``lazy_input``: images come from region sources read a window at a time.
    ``modes``: only these plan modes (default: all). ``exhaustive``: simulate every candidate.
    ``max_elements``: on CUDA no tensor may reach this many elements (cuDNN and CUDA kernels
    index with 32 bits; None: no limit); a pool head then pools tile by tile where its
    feature map would reach it. Raises :class:`BudgetError` when nothing fits, naming the
    largest image side that could (``largest_side``).
    """
    started = time.perf_counter()
    request = Request.resolve(model, image_size, budget, batch=batch, accumulate=accumulate, dtype=dtype,
                              in_channels=in_channels, num_classes=num_classes, head=head, device=device,
                              optimizer=optimizer, weight_decay=weight_decay, tile_sizes=tile_sizes,
                              allow_offload=allow_offload, lazy_input=lazy_input, counts=counts,
                              exhaustive=exhaustive, max_elements=max_elements,
                              fixed={k: v for k, v in dict(tile_size=tile_size, checkpoint=checkpoint,
                                                           head_checkpoint=head_checkpoint,
                                                           offload=offload).items() if v != AUTO})
    refusal = refusal_from_bounds(request)
    if refusal is not None and not exhaustive:
        raise refusal
    flops = step_flops(request.template, request.image, batch=batch)
    every = candidates(request, flops)
    if modes is not None:
        unknown = sorted(set(modes) - set(MODES))
        if unknown:
            raise ValueError(f"unknown plan mode(s) {unknown}; choose from {list(MODES)}")
        every = [c for c in every if c.mode in modes]
    search = Search(request)
    chosen = search.choose(every, progress)
    if chosen is None:
        raise request.refusal(search.smallest(every))
    return PlanReport(chosen, every, request.budget, request.name, request.image, batch, request.dtype_name,
                      request.device_type, optimizer, flops, time.perf_counter() - started, accumulate=accumulate,
                      fixed=request.fixed, counts=counts, simulations=search.simulations)


def enforce_budget(budget_bytes: int | str, device: str | torch.device = "cuda", *, counts: str = "process") -> dict:
    """Cap this process's memory on ``device`` at the budget; returns what was done.

    On CUDA the caching allocator is capped with ``torch.cuda.set_per_process_memory_fraction``
    at the budget minus the CUDA context allowance (the context is memory the process takes
    from the card but the allocator does not see), so allocating past the budget raises
    ``torch.OutOfMemoryError`` however large the card is. A budget that counts tensors
    (``counts="tensors"``) caps the allocator at the budget plus the reserved-memory
    fragmentation allowance instead. On CPU nothing is capped (the plan keeps the step inside
    the budget by prediction) and the returned dict says so.
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
