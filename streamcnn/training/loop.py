"""One training epoch and one evaluation pass, for one process or many (DDP).

The loop is deliberately ordinary (torchvision's ``references/classification`` style):
each micro-batch is :func:`streamcnn.engine.step.micro_step` (autocast, loss on float logits,
``GradScaler``-scaled backward divided by the accumulation: the step the memory planner
simulates), ``accumulate`` of them per :func:`streamcnn.engine.step.optimizer_step` (DDP
synchronises only on the last), one scheduler step per optimizer step. Streaming is invisible here:
the model's trunk decides how it runs.

Two guards: labels outside ``[0, num_classes)`` stop the run with the offending label,
and a NaN/Inf loss stops it *before* the optimizer step (the check is reduced over all
processes, so every rank stops together and none hangs), leaving the last checkpoint
as the last good state.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from streamcnn.engine.step import micro_step, model_input, optimizer_step
from streamcnn.utils.cpu import native_bf16
from streamcnn.utils.precision import DeviceCapabilities, autocast_dtype, capabilities
from streamcnn.training.distributed import DistributedContext, all_reduce_sum, gather_objects
from streamcnn.training.metrics import confusion_matrix, peak_memory_bytes, reset_peak_memory

__all__ = ["NonFiniteLossError", "resolve_amp", "EpochResult", "EvalResult", "train_one_epoch",
           "evaluate"]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the run stops and keeps its last good checkpoint."""


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (auto|bf16|fp16|off) on ``device``
    (:func:`streamcnn.utils.precision.autocast_dtype`: bf16 on CUDA with compute capability >= 8.0,
    fp16 with a GradScaler on older CUDA cards, bf16 on CPUs with native bf16, else off)."""
    if device.type == "cuda":
        return autocast_dtype(amp, capabilities(device))
    return autocast_dtype(amp, DeviceCapabilities(device.type, native_bf16=device.type == "cpu" and native_bf16()))


def _pixels(images: Any) -> int:
    if isinstance(images, torch.Tensor):
        return images.shape[0] * images.shape[-2] * images.shape[-1]
    return sum(image.shape[-2] * image.shape[-1] for image in images)


def _release(images: Any) -> None:
    """Close lazy readers once their batch is done (file handles are reopened on demand)."""
    if not isinstance(images, torch.Tensor):
        for image in images:
            if hasattr(image, "close"):
                image.close()


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(f"label {int(bad[0])} is outside the model's classes 0..{num_classes - 1}; "
                         "fix the data or set model.num_classes")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclass
class EpochResult:
    """Totals over all processes; ``accuracy`` is measured on the fly (the model changes during the epoch)."""

    loss: float
    accuracy: float
    images: int
    megapixels: float
    steps: int
    seconds: float
    peak_memory_bytes: int
    out_of_time: bool = False


def train_one_epoch(model: nn.Module, batches: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, *,
                    context: DistributedContext, num_classes: int, accumulate: int = 1,
                    amp_dtype: torch.dtype | None = None, step: int = 0, max_steps: int | None = None,
                    deadline: float | None = None, epoch: int = 0, progress: bool = True,
                    resume: dict[str, Any] | None = None,
                    on_step: Callable[[int, int, torch.Tensor, float], None] | None = None,
                    class_weights: torch.Tensor | None = None) -> EpochResult:
    """Train over ``batches`` (this process's micro-batches).

    Stops early after ``max_steps`` optimizer steps in total, or after the optimizer step
    whose last micro-batch started past ``deadline`` (a ``time.monotonic()`` value; one
    process past it stops them all).

    Micro-batches after the last complete group of ``accumulate`` are skipped, so every
    optimizer step averages the same number of images. ``step`` is the global optimizer
    step before this epoch; the result's ``steps`` counts this epoch's steps.

    Mid-epoch resume: ``resume`` (``batches`` done, running ``totals``, ``seconds``) continues an
    epoch whose first ``batches`` micro-batches ``batches`` no longer yields (see
    :meth:`ShardedBatchSampler.set_epoch`). ``on_step(batches_done, steps, totals, seconds)``
    runs after every optimizer step but the epoch's last (the runner saves mid-epoch checkpoints).
    """
    from tqdm.auto import tqdm

    device = context.device
    model.train()
    usable = (len(batches) // accumulate) * accumulate
    first = resume["batches"] if resume else 0
    bar = tqdm(total=usable, initial=first, desc=f"epoch {epoch}", unit="batch",
               disable=not (progress and context.is_main), dynamic_ncols=True)
    totals = torch.zeros(4, dtype=torch.float64)  # loss * images, images, pixels, correct
    if resume:
        totals += torch.tensor(resume["totals"], dtype=torch.float64)
    start, steps, out_of_time = time.perf_counter() - (resume["seconds"] if resume else 0.0), 0, False
    reset_peak_memory(device)
    optimizer.zero_grad(set_to_none=True)
    with bar:
        for index, (images, labels) in enumerate(batches, start=first):
            if index >= usable or (max_steps is not None and step + steps >= max_steps) or out_of_time:
                break
            _check_labels(labels, num_classes)
            last_of_step = (index + 1) % accumulate == 0
            sync = contextlib.nullcontext() if last_of_step or not context.enabled else model.no_sync()
            with sync:
                loss, logits = micro_step(model, images, labels, device_type=device.type, accumulate=accumulate,
                                          amp_dtype=amp_dtype, scaler=scaler, class_weights=class_weights)
            late = float(deadline is not None and time.monotonic() > deadline)
            loss_value = loss.item()
            reduced = all_reduce_sum(torch.tensor([loss_value, late], dtype=torch.float64), context)
            if not math.isfinite(float(reduced[0])):
                raise NonFiniteLossError(
                    f"loss is {float(reduced[0])} at epoch {epoch}, optimizer step {step + steps + 1}; "
                    "stopped before the update. The last good checkpoint is kept: lower optim.lr, "
                    "set train.amp=off, or check the data")
            _release(images)
            correct = (logits.argmax(dim=1).cpu() == labels).sum().item()
            totals += torch.tensor([loss_value * len(labels), len(labels), _pixels(images), correct],
                                   dtype=torch.float64)
            if last_of_step:
                optimizer_step(optimizer, scaler)
                scheduler.step()
                steps += 1
                out_of_time = bool(reduced[1] > 0)
                if on_step is not None and index + 1 < usable:
                    on_step(index + 1, steps, totals.clone(), time.perf_counter() - start)
            elapsed = time.perf_counter() - start
            bar.update()
            bar.set_postfix(loss=f"{totals[0] / totals[1]:.4f}",
                            img_s=f"{totals[1] * context.world_size / elapsed:.2f}",
                            mpx_s=f"{totals[2] * context.world_size / elapsed / 1e6:.2f}",
                            peak=f"{peak_memory_bytes(device) / 2**30:.2f}GiB", refresh=False)
    seconds = time.perf_counter() - start
    totals = all_reduce_sum(totals, context)
    peaks = gather_objects(peak_memory_bytes(device), context)
    return EpochResult(loss=float(totals[0] / max(totals[1], 1)), accuracy=float(totals[3] / max(totals[1], 1)),
                       images=int(totals[1]),
                       megapixels=float(totals[2] / 1e6), steps=steps, seconds=seconds,
                       peak_memory_bytes=int(max(peaks)), out_of_time=out_of_time)


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    images: int
    confusion: torch.Tensor
    seconds: float
    logits: torch.Tensor | None = None     # (images, classes) of this process, with ``per_image=True``
    labels: torch.Tensor | None = None     # their labels, with ``per_image=True``


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, *, context: DistributedContext, num_classes: int,
             amp_dtype: torch.dtype | None = None, progress: bool = True, desc: str = "eval",
             per_image: bool = False) -> EvalResult:
    """Accuracy, mean loss and confusion matrix over this process's ``batches``, summed over processes
    (and with ``per_image``, this process's logits in batch order)."""
    from tqdm.auto import tqdm

    device = context.device
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    start = time.perf_counter()
    kept: list[torch.Tensor] = []
    kept_labels: list[torch.Tensor] = []
    for images, labels in tqdm(batches, desc=desc, unit="batch", disable=not (progress and context.is_main),
                               dynamic_ncols=True, leave=False):
        _check_labels(labels, num_classes)
        with _autocast(device, amp_dtype):
            logits = model(model_input(images)).float().cpu()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        confusion += confusion_matrix(logits.argmax(dim=1), labels, num_classes)
        if per_image:
            kept.append(logits)
            kept_labels.append(labels)
        _release(images)
    confusion = all_reduce_sum(confusion, context)
    loss_sum = all_reduce_sum(loss_sum, context)
    count = int(confusion.sum())
    return EvalResult(accuracy=float(confusion.diagonal().sum()) / max(count, 1), loss=float(loss_sum) / max(count, 1),
                      images=count, confusion=confusion, seconds=time.perf_counter() - start,
                      logits=torch.cat(kept) if kept else None, labels=torch.cat(kept_labels) if kept_labels else None)
