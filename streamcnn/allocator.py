"""Host allocator control: a streamed step's resident memory follows its tensors.

torch's CPU tensors come from glibc ``malloc``. glibc serves a block from ``mmap`` (and
returns it to the system on free) only above its mmap threshold, and that threshold
*rises* to the size of every mmapped block that is freed (up to 32 MiB on 64-bit). After
the first tile nearly every activation is therefore carved out of the heap, and the freed
blocks of one tile are kept, fragmented, while the next tile (other window shapes) asks
for others: measured on ResNet-18 at 2048^2, tile 512, the process grew by about twice
its tensor peak (design notes, section 6).

This module owns the remedy and nothing else:

* :func:`tame_cpu_allocator` fixes glibc's mmap threshold (``M_MMAP_THRESHOLD``, which
  also stops it from rising) and its trim threshold (``M_TRIM_THRESHOLD``), so large
  blocks go back to the system when freed. It is applied once, the first time a
  :class:`~streamcnn.streaming.StreamingModule` streams, unless the environment variable
  ``STREAMCNN_TAME_MALLOC=0`` opts out (or the C library is not glibc).
* :func:`release_cached` is called by the engine after each tile: on CPU it returns the
  heap's free pages to the system (``malloc_trim``) when taming is on.

The time it costs (large blocks are page-faulted afresh on every allocation) is measured
by ``benchmarks/bench_cpu_options.py``. On CUDA nothing here applies: the caching
allocator's settings are documented in docs/planner.md.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

__all__ = ["tame_cpu_allocator", "release_cached", "allocator_state", "MMAP_THRESHOLD_BYTES", "ENV_VAR"]

#: Blocks at least this large are mmapped and returned to the system when freed.
MMAP_THRESHOLD_BYTES = 1 << 20
#: Free memory at the top of the heap beyond this is returned to the system.
TRIM_THRESHOLD_BYTES = 16 << 20
#: Set to "0" to leave glibc's malloc as it is.
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


def tame_cpu_allocator(force: bool = False) -> bool:
    """Fix glibc's mmap and trim thresholds (once per process); True when they are set.

    Does nothing (and returns False) when ``STREAMCNN_TAME_MALLOC=0``, when the C library
    is not glibc, or when it was already tried and ``force`` is not given.
    """
    if _state["tried"] and not force:
        return _state["tamed"]
    _state["tried"] = True
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        _state.update(tamed=False, reason=f"{ENV_VAR}=0")
        return False
    libc = _glibc()
    if libc is None:
        _state.update(tamed=False, reason="the C library is not glibc")
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    _state.update(tamed=ok, reason="mallopt set" if ok else "mallopt refused")
    return ok


def release_cached(device: torch.device) -> None:
    """After a tile: tame the allocator on first use, and on CPU return free heap pages."""
    if device.type != "cpu":
        return
    if not _state["tried"]:
        tame_cpu_allocator()
    if _state["tamed"]:
        _libc.malloc_trim(0)


def allocator_state() -> dict:
    """Whether the CPU allocator is tamed, and why (for benchmark records)."""
    return {"tamed": _state["tamed"], "reason": _state["reason"],
            "mmap_threshold_bytes": MMAP_THRESHOLD_BYTES if _state["tamed"] else None}
