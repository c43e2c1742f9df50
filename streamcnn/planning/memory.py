"""Peak memory of one training step, predicted without running it.

:func:`predict_step_memory` runs the model's real code on *fake* tensors
(``torch._subclasses.FakeTensorMode``: shapes and dtypes only, no data) under a
:class:`~streamcnn.planning.tracking.LiveStorageTracker`, which counts every storage an op creates
once and forgets it when Python frees it. Fake "cpu" tensors stand for the compute device
and fake "meta" tensors for host memory, so the input image, offloaded feature maps and
every host-to-device copy are simulated by the same code paths a real run takes. On CUDA
the live bytes are rounded like the caching allocator rounds them and the allowances below
are added; on CPU the process's resident memory is predicted (:data:`CPU_RUNTIME_BYTES` +
the live peak x (1 + :data:`CPU_HEAP_OVERHEAD`), with glibc tamed by
:mod:`streamcnn.utils.allocator`). Host bytes (the image unless it is read lazily, an offloaded
feature map and its gradient) are counted beside device bytes. The step itself is
:mod:`streamcnn.engine.step`'s; measuring it for real is
:mod:`streamcnn.planning.measurement`'s. :class:`StepSimulator` predicts one model's step for
plan after plan (the planner's search); a streamed step's no-grad forward and the rest of it
are recorded as two phases (:func:`compose`, :func:`phase_estimate`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from streamcnn.planning.plannable import input_shape, model_copy, streaming_modules
from streamcnn.engine.step import allocate_optimizer_state, make_optimizer, training_step
from streamcnn.planning.tiles import reduced_plan, summarize
from streamcnn.planning.tracking import LiveStorageTracker
from streamcnn.utils.units import resolve_dtype

__all__ = [
    "MemoryEstimate",
    "predict_step_memory",
    "CUDA_BLOCK_BYTES",
    "CUDA_WORKSPACE_BYTES",
    "CUDA_RESERVED_OVERHEAD",
    "CUDA_CONTEXT_BYTES",
    "CPU_RUNTIME_BYTES",
    "CPU_HEAP_OVERHEAD",
    "BUDGET_COUNTS",
    "check_budget_counts",
    "budget_counts_suffix",
    "budgeted_bytes",
    "compose",
    "estimate_from_live",
    "StepSimulator",
    "phase_estimate",
]

# --------------------------------------------------------------------------------------
# CUDA allowances. NOT YET CALIBRATED ON REAL HARDWARE: the sessions that wrote this had no
# GPU. benchmarks/bench_planner.py measures them when run on one (allocated and reserved
# peaks vs the raw prediction, and the context from torch.cuda.mem_get_info); replace these
# with its figures.
# --------------------------------------------------------------------------------------
#: The caching allocator rounds every block up to a multiple of 512 bytes.
CUDA_BLOCK_BYTES = 512
#: cuDNN / cuBLAS workspaces are allocated through the caching allocator during a kernel
#: call and counted by max_memory_allocated; an allowance, not a measurement.
CUDA_WORKSPACE_BYTES = 256 * 2**20
#: Reserved (segments of 2 MiB and 20 MiB) over allocated: fragmentation allowance.
CUDA_RESERVED_OVERHEAD = 0.10
#: The CUDA context and kernel images: outside torch's allocator (not in max_memory_*),
#: but part of the memory the process takes from the card, hence part of the budget.
CUDA_CONTEXT_BYTES = 512 * 2**20

# --------------------------------------------------------------------------------------
# CPU: resident memory (what a user sees), calibrated on this project's 2-core CPU by
# benchmarks/bench_planner.py (peak RSS of a fresh process per row).
# --------------------------------------------------------------------------------------
#: Python + torch + torchvision loaded, and the kernels' code and caches of a first step:
#: resident before any tensor of the step exists.
CPU_RUNTIME_BYTES = 760 * 10**6
#: RSS over live tensor bytes at the peak (heap blocks not yet returned, the kernels' own
#: scratch, page rounding); fitted to benchmarks/results/planner_rss_cpu.json.
CPU_HEAP_OVERHEAD = 0.35


#: Repeats of the largest window the simulation runs: the backward's peak is set by one
#: tile's recomputation while the parameter gradients of earlier tiles are already held, and
#: every tile after the first is alike (validated against the full plan in the tests); the
#: no-grad forward keeps nothing of a window but its region in the feature map.
BACKWARD_REPEATS, FORWARD_REPEATS = 3, 2


def _use_reduced_plans(engine, image: tuple[int, int]) -> None:
    """Have ``engine`` stream ``image`` with the largest windows only (its backward and forward tiles)."""
    geometry, stride = engine.geometry, engine.geometry.output_stride
    sizes = geometry.node_sizes(image)
    if engine.forward_tile_size is not None and engine.forward_tile_size != engine.tile_size:
        forward = summarize(geometry, image, engine.forward_tile_size, sizes)
        backward_tile, engine.tile_size = engine.tile_size, engine.forward_tile_size
        engine.use_plan(reduced_plan(forward, image, stride, FORWARD_REPEATS))  # the plan of that tile size
        engine.tile_size = backward_tile
    engine.use_plan(reduced_plan(summarize(geometry, image, engine.tile_size, sizes), image, stride,
                                 BACKWARD_REPEATS))


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak of one training step on ``device``.

    ``live_bytes``: tensor storages live at the peak (exact bytes; on CUDA each rounded to
    512 B). ``allocated_bytes``: what ``torch.cuda.max_memory_allocated`` should read
    (live + workspace allowance; equals ``live_bytes`` on CPU). ``reserved_bytes``: the
    allocator's reserved peak (+ fragmentation allowance on CUDA). ``process_bytes``: what
    the process takes from the device (+ the CUDA context): the number a budget limits.
    On CPU ``process_bytes`` is the predicted peak RSS (runtime + live x heap overhead).
    ``base_bytes``: parameters, buffers and optimizer state, held throughout.
    ``largest_tensor_elements``: the largest tensor the step makes on the device (0 when
    measured rather than predicted). ``host_bytes``: peak of tensors in host memory when
    the device is not the host (the image unless read lazily, offloaded feature maps and
    gradients, pinned staging copies); 0 on CPU, where host and device are one.
    ``forward_bytes``: the live peak during the streamed trunk's no-grad forward (what the
    forward's tiles decide; 0 when not streamed); ``rest_bytes``: the live peak during the rest
    of the step (the head, the backward's tiles, the optimizer); ``live_bytes`` is the larger.
    ``forward_largest`` / ``rest_largest``: the largest tensor of each (see :func:`compose`).
    """

    device: str
    live_bytes: int
    allocated_bytes: int
    reserved_bytes: int
    process_bytes: int
    base_bytes: int
    largest_tensor_elements: int = 0
    host_bytes: int = 0
    forward_bytes: int = 0
    rest_bytes: int = 0
    forward_largest: int = 0
    rest_largest: int = 0


#: What a budget may count: ``"process"``, all the memory the process takes (peak RSS on
#: CPU; reserved memory and the CUDA context on CUDA), or ``"tensors"``, the allocator's
#: tensor peak alone (``torch.cuda.max_memory_allocated`` on CUDA; the CPU allocator's peak,
#: :mod:`streamcnn.planning.measurement`, on CPU), which leaves out the runtime a budget cannot move.
BUDGET_COUNTS = ("process", "tensors")


def check_budget_counts(counts: str) -> None:
    """Raise ``ValueError`` unless ``counts`` is one of :data:`BUDGET_COUNTS`."""
    if counts not in BUDGET_COUNTS:
        raise ValueError(f"counts must be one of {list(BUDGET_COUNTS)} (what the budget limits), got {counts!r}")


def budget_counts_suffix(counts: str) -> str:
    """What follows a budget's size in messages and tables: ``""`` or ``" of tensors"``."""
    check_budget_counts(counts)
    return "" if counts == "process" else " of tensors"


def budgeted_bytes(estimate: MemoryEstimate, counts: str = "process") -> int:
    """The part of ``estimate`` a budget that ``counts`` (one of :data:`BUDGET_COUNTS`) limits."""
    check_budget_counts(counts)
    return estimate.process_bytes if counts == "process" else estimate.allocated_bytes


def estimate_from_live(device_type: str, live: int, base: int, largest: int = 0, host: int = 0,
                       forward: int = 0, **phases: int) -> MemoryEstimate:
    """The estimate for ``live`` bytes of tensors at the peak on ``device_type``: the CUDA
    allowances or the CPU runtime and heap added (the module docstring's model)."""
    if device_type != "cuda":
        rss = CPU_RUNTIME_BYTES + int(live * (1 + CPU_HEAP_OVERHEAD))
        return MemoryEstimate(device_type, live, live, live, rss, base, largest, 0, forward, **phases)
    allocated = live + CUDA_WORKSPACE_BYTES
    reserved = int(allocated * (1 + CUDA_RESERVED_OVERHEAD))
    return MemoryEstimate(device_type, live, allocated, reserved, reserved + CUDA_CONTEXT_BYTES, base, largest,
                          host, forward, **phases)


def compose(forward: MemoryEstimate, rest: MemoryEstimate) -> MemoryEstimate:
    """The estimate of a streamed step whose no-grad forward is ``forward``'s and whose rest
    (head, backward tiles, optimizer) is ``rest``'s: the two phases do not share tensors
    but the feature map, which is the same in both, so the peak is the larger phase's.
    Host bytes are the larger of the two estimates' (an upper bound)."""
    live = max(forward.forward_bytes, rest.rest_bytes)
    return estimate_from_live(rest.device, live, rest.base_bytes, max(forward.forward_largest, rest.rest_largest),
                     max(forward.host_bytes, rest.host_bytes), forward.forward_bytes, rest_bytes=rest.rest_bytes,
                     forward_largest=forward.forward_largest, rest_largest=rest.rest_largest)


def phase_estimate(estimate: MemoryEstimate, phase: str) -> MemoryEstimate:
    """``estimate`` as if its step were only its ``"forward"`` or its ``"rest"`` phase: what
    a budget is compared with to rule out every plan that shares that phase."""
    if phase == "forward":
        live, largest = estimate.forward_bytes, estimate.forward_largest
        return estimate_from_live(estimate.device, live, estimate.base_bytes, largest, estimate.host_bytes, live,
                         forward_largest=largest)
    live, largest = estimate.rest_bytes, estimate.rest_largest
    return estimate_from_live(estimate.device, live, estimate.base_bytes, largest, estimate.host_bytes, 0, rest_bytes=live,
                     rest_largest=largest)


def _enter(trackers: Sequence[LiveStorageTracker], phase: str) -> None:
    for t in trackers:
        t.enter(phase)


def predict_step_memory(model: nn.Module, image_size: int | Sequence[int], *, batch: int = 1,
                        dtype: str | torch.dtype | None = None, device: str | torch.device = "cuda",
                        optimizer: str = "adamw", weight_decay: float = 0.0, accumulate: int = 1,
                        full_plan: bool = False, lazy_input: bool = False) -> MemoryEstimate:
    """Predict the peak device memory of one training step of ``model`` as configured.

    The step is :func:`streamcnn.engine.step.training_step` with ``batch`` images per micro-batch:
    with ``accumulate`` > 1 two micro-batches are simulated, the second with the first's
    gradients live (later ones are alike). ``model`` is not touched (it may live on any
    device, or on meta); it is copied onto fake tensors. The images come from host memory
    (a CPU tensor or region sources), as in training; on a CPU device host and device
    memory are the same, so they count. Streaming runs only the largest windows (the
    backward's three times, the forward's twice) unless ``full_plan`` (for validation). A
    ``GradScaler`` (fp16) is not simulated: it adds a few scalars. ``lazy_input``: the image
    is a region source read a window at a time, so only the windows, not the image, take memory.
    """
    simulator = StepSimulator(model, image_size, batch=batch, dtype=dtype, device=device, optimizer=optimizer,
                              weight_decay=weight_decay, accumulate=accumulate, lazy_input=lazy_input)
    return simulator.predict(lambda sim: None, full_plan=full_plan)  # the copy has model's plan


class StepSimulator:
    """One model's training step on fake tensors, predicted for one plan after another.

    The fake copy of the model and its optimizer state are made once; :meth:`predict` sets a
    plan on the copy (``configure(sim)``) and runs the step under a
    :class:`~streamcnn.planning.tracking.LiveStorageTracker`. The optimizer's update does not
    depend on the plan (the same parameters and gradients), so it is simulated in the first
    prediction only and its transient added to what is live when later ones reach it. See
    :func:`predict_step_memory` for what the step is.
    """

    def __init__(self, model: nn.Module, image_size: int | Sequence[int], *, batch: int = 1,
                 dtype: str | torch.dtype | None = None, device: str | torch.device = "cuda",
                 optimizer: str = "adamw", weight_decay: float = 0.0, accumulate: int = 1,
                 lazy_input: bool = False):
        if accumulate < 1:
            raise ValueError(f"accumulate must be at least 1, got {accumulate}")
        self.device_type = torch.device(device).type
        self.autocast_dtype = resolve_dtype(dtype)
        self.shape = input_shape(model, image_size, batch)
        self.accumulate, self.lazy_input = accumulate, lazy_input
        self.host = "cpu" if self.device_type == "cpu" else "meta"
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)
        with self.fake:
            self.sim = model_copy(model, lambda t: self.fake.from_tensor(t).to("cpu"))
            self.sim.train()
            self.optimizer = allocate_optimizer_state(make_optimizer(optimizer, self.sim, weight_decay=weight_decay,
                                                                     foreach=self.device_type != "cpu"))
        self._update_bytes: int | None = None   # the optimizer update's transient, once simulated

    def predict(self, configure: Callable[[nn.Module], None], *, full_plan: bool = False) -> MemoryEstimate:
        """The estimate of the step with the plan ``configure`` sets on the fake copy."""
        configure(self.sim)
        image = tuple(self.shape[2:])
        tracker = LiveStorageTracker("cpu", CUDA_BLOCK_BYTES if self.device_type == "cuda" else 1)
        host_tracker = LiveStorageTracker("meta")
        tracker.phase = host_tracker.phase = "rest"
        hooks = []
        for s in streaming_modules(self.sim):
            # A feature map kept on the host goes to fake host memory; one kept on the device to the fake device.
            offloaded = s.output_device is not None and s.output_device.type in ("cpu", "meta")
            s.output_device = torch.device(self.host) if offloaded else None
            s.max_elements = None  # the planner compares the largest tensor with the limit itself
            if s.tile_size is not None and not full_plan:
                _use_reduced_plans(s, image)
            if s.tile_size is not None:
                hooks.append(s.register_forward_pre_hook(lambda *_: _enter((tracker, host_tracker), "forward")))
                hooks.append(s.register_forward_hook(lambda *_: _enter((tracker, host_tracker), "rest")))
        with self.fake:
            # A lazily read image is not in memory: fake meta storage is not counted on CPU.
            images = torch.empty(self.shape, device="meta" if self.lazy_input else self.host)
            labels = torch.zeros(self.shape[0], dtype=torch.long, device="cpu")
            with tracker, host_tracker:
                for t in [*self.sim.parameters(), *self.sim.buffers(), images, labels]:
                    tracker.track(t)
                if not self.lazy_input:
                    host_tracker.track(images)
                for state in self.optimizer.state.values():
                    for t in state.values():
                        tracker.track(t)
                base = tracker.current
                training_step(self.sim, images, labels, _Update(self, tracker), device_type="cpu",
                              accumulate=self.accumulate, micro_batches=min(self.accumulate, 2),
                              amp_dtype=self.autocast_dtype)
        for hook in hooks:
            hook.remove()
        largest = tracker.phase_largest
        return estimate_from_live(self.device_type, tracker.peak, base, tracker.largest_elements,
                         0 if self.device_type == "cpu" else host_tracker.peak, tracker.phase_peaks.get("forward", 0),
                         rest_bytes=tracker.phase_peaks.get("rest", 0), forward_largest=largest.get("forward", 0),
                         rest_largest=largest.get("rest", 0))


class _Update:
    """The optimizer as :func:`~streamcnn.engine.step.training_step` sees it: the update is
    simulated once per :class:`StepSimulator`, then its transient is replayed."""

    def __init__(self, simulator: StepSimulator, tracker: LiveStorageTracker):
        self.simulator, self.tracker = simulator, tracker

    def step(self) -> None:
        before = self.tracker.current
        if self.simulator._update_bytes is None:
            peak = self.tracker.peak
            self.tracker.peak = before  # the update's own peak, read below
            self.simulator.optimizer.step()
            self.simulator._update_bytes = self.tracker.peak - before
            self.tracker.peak = max(peak, self.tracker.peak)
        else:
            self.tracker.account(self.simulator._update_bytes)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.simulator.optimizer.zero_grad(set_to_none=set_to_none)
