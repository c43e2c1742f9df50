"""Host allocator control: a streamed step's resident memory follows its tensors.

torch's CPU tensors come from glibc ``malloc``. glibc serves a block from ``mmap`` (and
returns it to the system on free) only above its mmap threshold, and that threshold
*rises* to the size of every mmapped block that is freed (up to 32 MiB on 64-bit). After
the first tile nearly every activation is therefore carved out of the heap, and the freed
blocks of one tile are kept, fragmented, while the next tile (other window shapes) asks
for others: measured on ResNet-18 at 2048^2, tile 512, the process grew by about twice
its tensor peak (design notes, section 6).

This module owns the remedy and nothing else. ``STREAMCNN_TAME_MALLOC`` chooses it:

* ``trim`` (the default): after each tile the engine calls :func:`release_cached`, which
  returns the heap's free pages to the system (``malloc_trim``); a tile then reuses its own
  freed blocks at no cost, and what one tile leaves does not stay resident for the next.
* ``mmap``: :func:`tame_cpu_allocator` also fixes glibc's mmap threshold at 1 MiB
  (``M_MMAP_THRESHOLD``, which stops it from rising) and its trim threshold, so every large
  block goes back to the system when freed; every allocation is then page-faulted afresh.
* ``0``: glibc as it is.

Both are applied the first time a :class:`~streamcnn.engine.streaming.StreamingModule` streams a
tile on CPU, and only with glibc. Their time and memory are measured by
``benchmarks/bench_streaming.py``.

A training loop repeats one step of the same shapes thousands of times, and there the opposite
pays: :func:`keep_freed_memory` (called by the trainer on CPU, unless ``STREAMCNN_TAME_MALLOC``
is ``0`` or ``mmap``) fixes the mmap threshold at glibc's 32 MiB maximum and stops the heap from
trimming itself, so each step reuses the pages the last one freed instead of faulting in fresh
zeroed ones. On the default run's step (``benchmarks/bench_cpu_options.py --workload
default-run``) the page faults fall from about 16,000 a step to about 100, and the step takes
0.75x the time (median of 5 interleaved rounds, 2-core AMD EPYC). The peak stays what the step
needs; the process keeps it resident between steps (streamed tiles still trim after each tile).

On CUDA nothing here applies: the caching allocator's settings are documented in docs/planner.md.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

__all__ = ["tame_cpu_allocator", "keep_freed_memory", "release_cached", "allocator_state", "MMAP_THRESHOLD_BYTES",
           "ENV_VAR"]

#: Blocks at least this large are mmapped and returned to the system when freed.
MMAP_THRESHOLD_BYTES = 1 << 20
#: Free memory at the top of the heap beyond this is returned to the system.
TRIM_THRESHOLD_BYTES = 16 << 20
#: glibc's largest mmap threshold on 64-bit systems; :func:`keep_freed_memory` heaps every smaller block.
KEEP_MMAP_THRESHOLD_BYTES = 32 << 20
#: "trim" (default), "mmap", or "0" to leave glibc's malloc as it is.
ENV_VAR = "STREAMCNN_TAME_MALLOC"

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_state: dict = {"tried": False, "tamed": False, "reason": "not yet streamed"}
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.gnu_get_libc_version  # only glibc has mallopt with these parameters
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc = libc
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def _mode() -> str:
    value = os.environ.get(ENV_VAR, "trim").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    return "mmap" if value == "mmap" else "trim"


def tame_cpu_allocator(force: bool = False) -> bool:
    """Apply ``STREAMCNN_TAME_MALLOC`` (once per process); True when taming is on.

    False when it is ``0``, or the C library is not glibc.
    """
    if _state["tried"] and not force:
        return _state["tamed"]
    _state["tried"] = True
    mode = _mode()
    if mode == "off":
        _state.update(tamed=False, mode=mode, reason=f"{ENV_VAR}=0")
        return False
    libc = _glibc()
    if libc is None:
        _state.update(tamed=False, mode="off", reason="the C library is not glibc")
        return False
    ok = True
    if mode == "mmap":
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    _state.update(tamed=ok, mode=mode, reason="applied" if ok else "mallopt refused")
    return ok


def keep_freed_memory() -> bool:
    """For a loop of same-shaped steps on CPU: keep freed blocks in the heap for the next step
    (module docstring). True when applied; False with ``STREAMCNN_TAME_MALLOC=0`` or ``mmap``, or
    without glibc. Once per process."""
    if "kept" not in _state:
        libc = _glibc() if _mode() == "trim" else None
        _state["kept"] = bool(libc) and libc.mallopt(_M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD_BYTES) == 1 \
            and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return _state["kept"]


def release_cached(device: torch.device) -> None:
    """Between tiles: tame the allocator on first use, and on CPU return free heap pages."""
    if device.type != "cpu":
        return
    if not _state["tried"]:
        tame_cpu_allocator()
    if _state["tamed"]:
        _libc.malloc_trim(0)


def allocator_state() -> dict:
    """Whether the CPU allocator is tamed, and why (for benchmark records)."""
    return {"tamed": _state["tamed"], "mode": _state.get("mode", _mode()), "reason": _state["reason"],
            "freed_memory_kept": _state.get("kept", False),
            "mmap_threshold_bytes": MMAP_THRESHOLD_BYTES if _state.get("mode") == "mmap" else None}
