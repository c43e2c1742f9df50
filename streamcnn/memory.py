"""Peak memory and FLOPs of one training step, predicted without running it.

This module owns the numbers a memory plan is made of:

* :func:`parse_size` / :func:`format_size`: ``"11GB"`` is 11 * 10**9 bytes, ``"11GiB"`` is
  11 * 2**30 bytes.
* :func:`predict_step_memory`: the peak device memory of one full training step (forward,
  loss, backward, optimizer step, with the optimizer state already allocated as it is from
  the second step on). The model's real code runs on *fake* tensors
  (``torch._subclasses.FakeTensorMode``: shapes and dtypes only, no data) under
  :class:`LiveStorageTracker`, a ``TorchDispatchMode`` that counts every storage an op
  creates once and forgets it when Python frees it. Fake "cpu" tensors stand for the
  compute device and fake "meta" tensors for host memory, so the input image, offloaded
  feature maps and every host-to-device copy are simulated by the same code paths a real
  run takes. On CUDA the live bytes are rounded like the caching allocator rounds them and
  the allowances below are added.
* :func:`measure_step_memory`: the same step on real tensors, for checking predictions.
  CUDA: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``. CPU: torch's CPU
  allocator keeps no peak statistic, so the step runs under ``torch.profiler`` with
  ``profile_memory=True``; every allocation and free of the CPU allocator (including
  buffers that kernels such as oneDNN allocate internally, which no dispatch mode can see)
  is summed in time order, and the bytes that were live before the step are added.
* :func:`step_flops`: forward and backward FLOPs of the trunk and the head
  (``torch.utils.flop_counter``, on fake tensors), from which a plan's cost follows.

Why not ``torch.distributed._tools.mem_tracker.MemTracker``: it is a private API of the
distributed package, and the fake-host trick above (which makes offload and input copies
visible) needs control over which device counts; the tracker here is about forty lines.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from .streaming import StreamingModule

__all__ = [
    "cpu_allocator_peak",
    "parse_size",
    "format_size",
    "resolve_dtype",
    "LiveStorageTracker",
    "MemoryEstimate",
    "StepFlops",
    "OPTIMIZERS",
    "training_step",
    "meta_copy",
    "predict_step_memory",
    "measure_step_memory",
    "step_flops",
    "CUDA_BLOCK_BYTES",
    "CUDA_WORKSPACE_BYTES",
    "CUDA_RESERVED_OVERHEAD",
    "CUDA_CONTEXT_BYTES",
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
# Sizes
# --------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(size: str | int | float) -> int:
    """Bytes in ``size``: ``"11GB"`` = 11 * 10**9, ``"11GiB"`` = 11 * 2**30, ``"512MB"``,
    ``"11 GB"``, ``"1.5GiB"`` or a plain number of bytes. Units are case-insensitive."""
    if isinstance(size, bool):
        raise ValueError(f"not a memory size: {size!r}")
    if isinstance(size, (int, float)):
        if size <= 0:
            raise ValueError(f"a memory size must be positive, got {size!r}")
        return int(size)
    match = _SIZE.match(str(size))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"not a memory size: {size!r}; write a number and a unit, e.g. '11GB' (11 * 10^9 bytes), "
            "'11GiB' (11 * 2^30 bytes), '512MB', '800MiB', or a number of bytes")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {size!r}")
    return value


def format_size(n: int | float) -> str:
    """``n`` bytes in decimal units, as people write budgets: ``format_size(11e9) == '11.00 GB'``."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{sign}{n / scale:.2f} {unit}"
    return f"{sign}{int(n)} B"


_DTYPES = {"fp32": None, "float32": None, "32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype for ``dtype`` ("fp32"/None: no autocast, "bf16", "fp16")."""
    if dtype is None or dtype == torch.float32:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
    elif str(dtype).lower() in _DTYPES:
        return _DTYPES[str(dtype).lower()]
    raise ValueError(f"unsupported training dtype {dtype!r}; choose fp32, bf16 or fp16")


# --------------------------------------------------------------------------------------
# Live storage tracking
# --------------------------------------------------------------------------------------


class LiveStorageTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages on one device type, and their peak.

    Every op's output storages are counted once (views share their base's storage) and
    subtracted again by a ``weakref.finalize`` when the storage is freed. Tensors that
    existed before the mode was entered are counted with :meth:`track`. ``block`` rounds
    each storage up like the CUDA caching allocator (min 512 bytes). ``largest_elements``
    is the element count of the largest tensor any op made (cuDNN refuses 2^31 and more).
    """

    def __init__(self, device_type: str, block: int = 1):
        super().__init__()
        self.device_type = device_type
        self.block = block
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.largest_elements = 0

    def track(self, tensor: object) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device_type:
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.live:
            return
        nbytes = storage.nbytes()
        if self.block > 1 and nbytes:
            nbytes = -(-nbytes // self.block) * self.block
        self.live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                self.largest_elements = max(self.largest_elements, t.numel())
        return out


# --------------------------------------------------------------------------------------
# The training step that is predicted and measured
# --------------------------------------------------------------------------------------

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": lambda params, foreach: torch.optim.AdamW(params, lr=1e-4, foreach=foreach),
    "adam": lambda params, foreach: torch.optim.Adam(params, lr=1e-4, foreach=foreach),
    "sgd": lambda params, foreach: torch.optim.SGD(params, lr=1e-2, momentum=0.9, foreach=foreach),
}


def _make_optimizer(model: nn.Module, name: str, foreach: bool) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    optimizer = OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad], foreach)
    # Allocate the state as the first real step would, so the predicted step is a steady one.
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def training_step(model: nn.Module, images, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
                  autocast_dtype: torch.dtype | None, device_type: str) -> None:
    """One step as the trainer takes it: autocast forward, cross-entropy, backward, step, zero_grad."""
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _streaming_modules(model: nn.Module) -> list[StreamingModule]:
    return [m for m in model.modules() if isinstance(m, StreamingModule)]


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device (shapes only), made without copying weights."""
    return _copy_to(model, lambda t: torch.empty_like(t, device="meta"))


def _copy_to(model: nn.Module, convert: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are ``convert(t)``; the real
    tensors are never copied. Cached tiling geometry is shared, not copied."""
    memo: dict[int, object] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        new = convert(t.detach())
        memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    for s in _streaming_modules(model):
        memo[id(s._geometry)] = s._geometry
        memo[id(s._plans)] = {}
    return copy.deepcopy(model, memo)


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
    ``base_bytes``: parameters, buffers and optimizer state, held throughout.
    ``largest_tensor_elements``: the largest tensor the step makes on the device (0 when
    measured rather than predicted).
    """

    device: str
    live_bytes: int
    allocated_bytes: int
    reserved_bytes: int
    process_bytes: int
    base_bytes: int
    largest_tensor_elements: int = 0


def _estimate(device_type: str, live: int, base: int, largest: int = 0) -> MemoryEstimate:
    if device_type != "cuda":
        return MemoryEstimate(device_type, live, live, live, live, base, largest)
    allocated = live + CUDA_WORKSPACE_BYTES
    reserved = int(allocated * (1 + CUDA_RESERVED_OVERHEAD))
    return MemoryEstimate(device_type, live, allocated, reserved, reserved + CUDA_CONTEXT_BYTES, base, largest)


def _input_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.in_channels
    raise ValueError(f"{type(model).__name__} has no convolution to take the number of input channels from")


def _shape(model: nn.Module, image_size: int | Sequence[int], batch: int) -> tuple[int, int, int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return batch, _input_channels(model), int(h), int(w)


def predict_step_memory(model: nn.Module, image_size: int | Sequence[int], *, batch: int = 1,
                        dtype: str | torch.dtype | None = None, device: str | torch.device = "cuda",
                        optimizer: str = "adamw", full_plan: bool = False) -> MemoryEstimate:
    """Predict the peak device memory of one training step of ``model`` as configured.

    ``model`` is not touched (it may live on any device, or on meta); it is copied onto fake
    tensors. The images come from host memory (a CPU tensor or region sources), as in
    training; on a CPU device host and device memory are the same, so they count.
    Streaming runs only the largest window, three times, unless ``full_plan`` (for validation).
    """
    device_type = torch.device(device).type
    autocast_dtype = resolve_dtype(dtype)
    shape = _shape(model, image_size, batch)
    on_cpu = device_type == "cpu"
    host = "cpu" if on_cpu else "meta"
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        sim = _copy_to(model, lambda t: fake.from_tensor(t).to("cpu"))
        sim.train()
        for s, original in zip(_streaming_modules(sim), _streaming_modules(model)):
            # A feature map kept on the host goes to fake host memory; one kept on the
            # device to the fake device.
            offloaded = s.output_device is not None and s.output_device.type == "cpu"
            s.output_device = torch.device(host) if offloaded else None
            if s.tile_size is not None and not full_plan:
                reduced = _reduced_plan(original.plan(shape[2:]))
                s.plan = lambda size, _p=reduced: _p  # type: ignore[method-assign]
        opt = _make_optimizer(sim, optimizer, foreach=not on_cpu)
        images = torch.empty(shape, device=host)
        labels = torch.zeros(batch, dtype=torch.long, device="cpu")
        tracker = LiveStorageTracker("cpu", CUDA_BLOCK_BYTES if device_type == "cuda" else 1)
        with tracker:
            for t in [*sim.parameters(), *sim.buffers(), images, labels]:
                tracker.track(t)
            for state in opt.state.values():
                for t in state.values():
                    tracker.track(t)
            base = tracker.current
            training_step(sim, images, labels, opt, autocast_dtype, "cpu")
    return _estimate(device_type, tracker.peak, base, tracker.largest_elements)


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------


def cpu_allocator_peak(step: Callable[[], None]) -> int:
    """Peak of (allocated - freed) bytes of the CPU allocator while ``step`` runs."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

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
                        optimizer: str = "adamw", images: torch.Tensor | None = None,
                        warmup: bool = True) -> MemoryEstimate:
    """Run a real training step of a copy of ``model`` on ``device`` and return its peak.

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
    shape = _shape(model, image_size, batch)
    real = _copy_to(model, lambda t: t.to(device, copy=True))
    real.train()
    opt = _make_optimizer(real, optimizer, foreach=device.type != "cpu")
    if images is None:
        images = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(batch, dtype=torch.long, device=device)

    def step():
        training_step(real, images, labels, opt, autocast_dtype, device.type)

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


# --------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------


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
    shape = _shape(model, image_size, batch)
    counts = []
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        sim = _copy_to(model, lambda t: fake.from_tensor(t).to("cpu"))
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
