"""torch.distributed setup for ``torchrun``: one process per device, DDP, and reductions.

``torchrun --nproc_per_node N tools/train.py ...`` sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``; :func:`init_distributed` reads them, picks the device (``cuda:LOCAL_RANK``
or CPU) and the backend (NCCL on GPUs, gloo on CPU). Without those variables the run
is a single process and every helper here is a no-op, so the loop has one code path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "init_distributed", "resolve_device", "all_reduce_sum", "broadcast_object",
           "gather_objects"]


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; otherwise ``name``."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device_name: str = "auto") -> DistributedContext:
    """The process group from torchrun's environment, or a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank, world_size, local_rank, device)


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all processes (a new tensor)."""
    total = tensor.detach().clone()
    if context.enabled:
        backend_device = context.device if context.device.type == "cuda" else torch.device("cpu")
        total = total.to(backend_device)
        dist.all_reduce(total)
    return total


def broadcast_object(value, context: DistributedContext):
    """Rank 0's ``value`` on every process."""
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value, context: DistributedContext) -> list:
    """Every process's ``value``, indexed by rank (on every process)."""
    if not context.enabled:
        return [value]
    values = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values
