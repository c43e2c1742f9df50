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
:mod:`streamcnn.planning.measurement`'s.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from streamcnn.planning.plannable import input_shape, model_copy, streaming_modules
from streamcnn.engine.step import allocate_optimizer_state, make_optimizer, training_step
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


def _reduced_plan(plan):
    """The plan's largest input window, three times: the peak is set by one tile's
    recomputation while the parameter gradients of earlier tiles are already held, and
    every tile after the first is alike. Validated against the full plan in the tests."""
    largest = max(plan.tiles, key=lambda t: t.window_shape[0] * t.window_shape[1])
    return dataclasses.replace(plan, tiles=(largest,) * 3)


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
    ``forward_bytes``: the live peak up to the end of the streamed trunk's forward (what the
    no-grad forward's tiles decide; 0 when not streamed).
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


def _estimate(device_type: str, live: int, base: int, largest: int = 0, host: int = 0,
              forward: int = 0) -> MemoryEstimate:
    if device_type != "cuda":
        rss = CPU_RUNTIME_BYTES + int(live * (1 + CPU_HEAP_OVERHEAD))
        return MemoryEstimate(device_type, live, live, live, rss, base, largest, 0, forward)
    allocated = live + CUDA_WORKSPACE_BYTES
    reserved = int(allocated * (1 + CUDA_RESERVED_OVERHEAD))
    return MemoryEstimate(device_type, live, allocated, reserved, reserved + CUDA_CONTEXT_BYTES, base, largest,
                          host, forward)


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
    memory are the same, so they count. Streaming runs only the largest window, three
    times, unless ``full_plan`` (for validation). A ``GradScaler`` (fp16) is not simulated:
    it adds a few scalars. ``lazy_input``: the image is a region source read a window at a
    time, so only the windows, not the image, take memory.
    """
    if accumulate < 1:
        raise ValueError(f"accumulate must be at least 1, got {accumulate}")
    device_type = torch.device(device).type
    autocast_dtype = resolve_dtype(dtype)
    shape = input_shape(model, image_size, batch)
    on_cpu = device_type == "cpu"
    host = "cpu" if on_cpu else "meta"
    forward_peak = [0]
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        sim = model_copy(model, lambda t: fake.from_tensor(t).to("cpu"))
        sim.train()
        for s, original in zip(streaming_modules(sim), streaming_modules(model)):
            # A feature map kept on the host goes to fake host memory; one kept on the
            # device to the fake device.
            offloaded = s.output_device is not None and s.output_device.type == "cpu"
            s.output_device = torch.device(host) if offloaded else None
            if s.tile_size is not None and not full_plan:
                s.use_plan(_reduced_plan(original.plan(shape[2:])))
            if s.tile_size is not None:
                s.register_forward_hook(lambda *_: forward_peak.__setitem__(0, tracker.peak))
        opt = allocate_optimizer_state(make_optimizer(optimizer, sim, weight_decay=weight_decay,
                                                      foreach=not on_cpu))
        # A lazily read image is not in memory: fake meta storage is not counted on CPU.
        images = torch.empty(shape, device="meta" if lazy_input else host)
        labels = torch.zeros(batch, dtype=torch.long, device="cpu")
        tracker = LiveStorageTracker("cpu", CUDA_BLOCK_BYTES if device_type == "cuda" else 1)
        host_tracker = LiveStorageTracker("meta")
        with tracker, host_tracker:
            for t in [*sim.parameters(), *sim.buffers(), images, labels]:
                tracker.track(t)
            if not lazy_input:
                host_tracker.track(images)
            for state in opt.state.values():
                for t in state.values():
                    tracker.track(t)
            base = tracker.current
            training_step(sim, images, labels, opt, device_type="cpu", accumulate=accumulate,
                          micro_batches=min(accumulate, 2), amp_dtype=autocast_dtype)
    return _estimate(device_type, tracker.peak, base, tracker.largest_elements,
                     0 if on_cpu else host_tracker.peak, forward_peak[0])
