"""What runs fast on the CPU a step runs on: the autocast dtype and memory layout to default to.

Measured by ``benchmarks/bench_cpu_options.py`` (figures in docs/benchmarks.md). ResNet-18, one window,
forward + backward: on a CPU with native bfloat16 instructions (AVX512-BF16 or AMX) bf16 autocast
takes about 0.57x the fp32 time and bf16 with the channels-last layout about 0.4x; ``torch.compile``
of the trunk does not pay reliably. Channels-last in fp32 depends on the step: 0.86x and 1.03x for
one ResNet-18 window (two CPUs), 0.52-0.92x for the default run's step (a batch of 64 small
images through a 16-channel trunk, on an AVX2 CPU without bf16): never more than 3 % slower there. So:

- :func:`native_bf16`: whether this CPU has the instructions (without them bf16 is emulated and
  slower than fp32, so ``train.amp: auto`` stays fp32);
- :func:`preferred_memory_format`: channels-last on the CPU, whatever the dtype; contiguous elsewhere;
- :func:`usable_cores`: the cores this process may run on (worker and training process counts).

A model converted with ``model.to(memory_format=torch.channels_last)`` is fed channels-last
windows by :class:`streamcnn.engine.streaming.StreamingModule` when its ``memory_format`` says so
(:meth:`streamcnn.models.classifier.StreamingClassifier.use_memory_format` sets both); the layout changes
no result beyond float rounding.
"""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

__all__ = ["native_bf16", "preferred_memory_format", "usable_cores"]

_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """True when the CPU executes bfloat16 dot products natively (x86 AVX512-BF16 / AMX-BF16,
    read from ``/proc/cpuinfo``; False where that file does not exist)."""
    if platform.system() != "Linux":
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return bool(_BF16_FLAGS & set(line.split(":", 1)[-1].split()))
    return False


def preferred_memory_format(device: torch.device) -> torch.memory_format:
    """``torch.channels_last`` on the CPU (measured faster with bf16 autocast and, for batched
    small images, in fp32; see the module docstring), else ``torch.contiguous_format``."""
    if device.type == "cpu":
        return torch.channels_last
    return torch.contiguous_format


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
