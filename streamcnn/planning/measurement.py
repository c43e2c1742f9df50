"""Peak memory of one real training step, for checking predictions.

CUDA: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``. CPU: torch's CPU
allocator keeps no peak statistic, so the step runs under ``torch.profiler`` with
``profile_memory=True``; every allocation and free of the CPU allocator (including
buffers that kernels such as oneDNN allocate internally, which no dispatch mode can see)
is summed in time order (:func:`cpu_allocator_peak`), and the bytes that were live
before the step are added.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
import torch.nn as nn

from streamcnn.planning.memory import MemoryEstimate
from streamcnn.planning.plannable import input_shape, model_copy
from streamcnn.engine.step import allocate_optimizer_state, make_optimizer, training_step
from streamcnn.planning.tracking import LiveStorageTracker
from streamcnn.utils.units import resolve_dtype

__all__ = ["cpu_allocator_peak", "measure_step_memory"]


def cpu_allocator_peak(step: Callable[[], None]) -> int:
    """Peak of (allocated - freed) bytes of the CPU allocator while ``step`` runs."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    # Kineto (the profiler's backend) reads its log level once, when first used, and otherwise
    # prints "profiler_start/stop" trace points and, on machines without a GPU, "gpuGetDeviceCount
    # failed": nothing about this CPU measurement. 6 is above its highest level (USDT = 5); a
    # level the user set is kept.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    current = peak = 0
    for _, nbytes in sorted(events):
        current += nbytes
        peak = max(peak, current)
    return peak


def measure_step_memory(model: nn.Module, image_size: int | Sequence[int], *, batch: int = 1,
                        dtype: str | torch.dtype | None = None, device: str | torch.device = "cuda",
                        optimizer: str = "adamw", weight_decay: float = 0.0, accumulate: int = 1,
                        images: torch.Tensor | None = None, warmup: bool = True) -> MemoryEstimate:
    """Run a real :func:`streamcnn.engine.step.training_step` of a copy of ``model`` on ``device``
    (``accumulate`` micro-batches of ``batch`` images, then the optimizer) and return its peak.

    The optimizer state is allocated first, and with ``warmup`` one unmeasured step runs
    before the measured one (kernel caches and lazily created buffers belong to the
    first step only).
    The copy's parameters start from ``model``'s values; ``model`` is not changed. The
    images (random unless given) stay in host memory, as in training. On CPU every field
    is the allocator peak; on CUDA ``allocated_bytes`` / ``reserved_bytes`` are
    ``max_memory_allocated`` / ``max_memory_reserved`` and ``process_bytes`` adds the
    context measured as (used by the card - reserved) before the step.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    autocast_dtype = resolve_dtype(dtype)
    shape = input_shape(model, image_size, batch)
    real = model_copy(model, lambda t: t.to(device, copy=True))
    real.train()
    opt = allocate_optimizer_state(make_optimizer(optimizer, real, weight_decay=weight_decay,
                                                  foreach=device.type != "cpu"))
    if images is None:
        images = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(batch, dtype=torch.long, device=device)

    def step():
        training_step(real, images, labels, opt, device_type=device.type, accumulate=accumulate,
                      amp_dtype=autocast_dtype)

    if warmup:
        step()
    counter = LiveStorageTracker(device.type)
    for t in [*real.parameters(), *real.buffers(), labels, *(v for s in opt.state.values() for v in s.values())]:
        counter.track(t)
    if device.type == "cpu":
        counter.track(images)
        peak = counter.current + cpu_allocator_peak(step)
        return MemoryEstimate("cpu", peak, peak, peak, peak, counter.current)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    context = (total - free) - torch.cuda.memory_reserved(device)
    step()
    torch.cuda.synchronize(device)
    allocated = torch.cuda.max_memory_allocated(device)
    reserved = torch.cuda.max_memory_reserved(device)
    return MemoryEstimate("cuda", allocated, allocated, reserved, reserved + context, counter.current)
