"""torch.distributed setup for ``torchrun`` and for local CPU processes, DDP, and reductions.

``torchrun --nproc_per_node N tools/train.py ...`` sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``; :func:`init_distributed` reads them, picks the device (``cuda:LOCAL_RANK``
or CPU) and the backend (NCCL on GPUs, gloo on CPU). Without those variables the run
is a single process and every helper here is a no-op, so the loop has one code path.

:func:`run_local_processes` is the trainer's own launch on a CPU (``train.processes``): it
spawns processes that set the same variables, one thread each, and hands them the data set
loaded once here; they split one batch (``DistributedContext.shares``). On a 2-core CPU two
one-thread processes train 1.05-1.07x faster than one two-thread process (docs/training.md). Spawned,
not forked: a process that has run autograd off the CPU (the memory planner does) cannot fork
one that runs it again.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import socket
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from streamcnn.utils.cpu import usable_cores

__all__ = ["DistributedContext", "init_distributed", "resolve_device", "all_reduce_sum", "broadcast_object",
           "gather_objects", "run_local_processes", "wrap_ddp"]


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    #: local processes that split the config's batch and budget (run_local_processes); 1 under
    #: torchrun, where every process takes a whole batch
    shares: int = 1

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


def init_distributed(device_name: str = "auto", shares: int = 1) -> DistributedContext:
    """The process group from torchrun's (or :func:`run_local_processes`') environment, or a
    single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank, world_size, local_rank, device, shares if world_size > 1 else 1)


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all processes: a new tensor on ``tensor``'s device.

    NCCL reduces on the GPU, so a host tensor travels there and back: callers that read the
    result with ``.numpy()``/``.tolist()`` (metrics, confusion matrices) get host memory."""
    total = tensor.detach().clone()
    if context.enabled:
        backend_device = context.device if context.device.type == "cuda" else torch.device("cpu")
        total = total.to(backend_device)
        dist.all_reduce(total)
        total = total.to(tensor.device)
    return total


def wrap_ddp(model: nn.Module, context: DistributedContext) -> nn.Module:
    """``model`` under DistributedDataParallel when the run has several processes, else ``model``.

    ``device_ids`` stays None even on a GPU: with it, DDP copies every tensor input to the device
    before ``forward``, a whole large image included, which is the out-of-memory the streamed
    trunk exists to prevent. Without it, inputs reach the model where they are and the trunk
    moves one window at a time (the model lives on one device, so DDP needs nothing more)."""
    if not context.enabled:
        return model
    return DistributedDataParallel(model, device_ids=None)


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


def run_local_processes(processes: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in ``processes`` spawned processes on this machine that form a gloo group
    (the variables torchrun sets; each process one thread of the cores this one may use; ``fn``
    and ``args`` must pickle).
    Returns rank 0's result; the first exception raised in any process is raised here, and a
    process that dies without one is reported by its rank and exit code."""
    context = multiprocessing.get_context("spawn")
    with socket.socket() as probe:               # a free port for the group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cores = usable_cores()
    threads = max(1, cores // processes)
    results = context.Queue()
    children = [context.Process(target=_local_process, args=(rank, processes, port, threads, results, fn, args))
                for rank in range(processes)]
    for child in children:
        child.start()
    value, error, reported = None, None, set()
    try:
        while len(reported) < processes and error is None:
            try:
                rank, ok, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, child in enumerate(children) if child.exitcode not in (None, 0) and r not in reported]
                if dead:
                    error = RuntimeError(f"training process {dead[0]} of {processes} died (exit code "
                                         f"{children[dead[0]].exitcode}) without an error; out of memory?")
                continue
            reported.add(rank)
            if not ok:
                error = payload
            elif rank == 0:
                value = payload
    finally:
        for child in children:
            if error is not None and child.is_alive():
                child.terminate()
            child.join()
    if error is not None:
        raise error
    return value


def _local_process(rank: int, processes: int, port: int, threads: int, results, fn: Callable[..., Any],
                   args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        value = fn(*args)
        results.put((rank, True, value if rank == 0 else None))
    except BaseException as error:  # noqa: BLE001 - every failure goes to the parent, which raises it
        try:
            pickle.dumps(error)
        except Exception:  # noqa: BLE001 - an exception that does not pickle travels as its text
            error = RuntimeError(f"{type(error).__name__}: {error}")
        results.put((rank, False, error))
