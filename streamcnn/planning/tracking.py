"""Counting the bytes of live tensor storages while code runs (real or fake tensors).

:class:`LiveStorageTracker` is the instrument the memory prediction is read from; it
knows nothing about models, plans or optimizers.

Why not ``torch.distributed._tools.mem_tracker.MemTracker``: it is a private API of the
distributed package, and the prediction's fake-host trick (fake "meta" tensors stand for
host memory, so offload and input copies are visible) needs control over which device
counts; this tracker is about forty lines.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveStorageTracker"]


class LiveStorageTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages on one device type, and their peak.

    Every op's output storages are counted once (views share their base's storage) and
    subtracted again by a ``weakref.finalize`` when the storage is freed. Tensors that
    existed before the mode was entered are counted with :meth:`track`. ``block`` rounds
    each storage up like the CUDA caching allocator (min 512 bytes). ``largest_elements``
    is the element count of the largest tensor any op made (cuDNN refuses 2^31 and more).
    ``phase`` names the part of the run now going on (the caller sets it); ``phase_peaks``
    and ``phase_largest`` hold the peak and the largest tensor seen during each.
    """

    def __init__(self, device_type: str, block: int = 1):
        super().__init__()
        self.device_type = device_type
        self.block = block
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.largest_elements = 0
        self.phase = ""
        self.phase_peaks: dict[str, int] = {}
        self.phase_largest: dict[str, int] = {}

    def enter(self, phase: str) -> None:
        """From now on count peaks towards ``phase`` (what is live already counts in it too)."""
        self.phase = phase
        self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), self.current)

    def track(self, tensor: object) -> None:
        """Count ``tensor``'s storage (once) if it is on this tracker's device type."""
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
        if self.current > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.current
        weakref.finalize(storage, self._free, key)

    def account(self, nbytes: int) -> None:
        """Count a transient of ``nbytes`` on top of what is live now (a part of a run that
        was simulated once and is replayed by its size), in the peak and the phase's."""
        self.peak = max(self.peak, self.current + nbytes)
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.current + nbytes)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                self.largest_elements = max(self.largest_elements, t.numel())
                if t.numel() > self.phase_largest.get(self.phase, 0):
                    self.phase_largest[self.phase] = t.numel()
        return out
