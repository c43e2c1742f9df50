"""What a run reports: ``metrics.jsonl``, the loss-curve and confusion-matrix PNGs, peak memory.

The metrics history (one dict per epoch) lives in the checkpoint; ``metrics.jsonl`` is
rewritten atomically from it after every epoch and on resume. The file therefore
always agrees with ``last.pt``: a run killed between the two writes and resumed
lists every evaluated epoch exactly once.
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from streamcnn.utils.files import atomic_write_text, save_figure

__all__ = ["write_metrics", "read_metrics", "confusion_matrix", "plot_loss_curve", "plot_confusion_matrix",
           "peak_memory_bytes", "reset_peak_memory"]


def write_metrics(path: str | Path, history: Sequence[dict[str, Any]]) -> Path:
    """Write one JSON line per epoch, atomically."""
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
    return atomic_write_text(path, text)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``matrix[true, predicted]`` counts (int64)."""
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since the last reset: CUDA allocator peak, or the process's peak RSS on CPU.

    The CPU figure (``ru_maxrss``) is a high-water mark over the whole process life, so it
    never decreases between epochs; it includes Python, torch and the data readers.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_loss_curve(history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Training loss (and validation accuracy, if any) per epoch, as a PNG."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, loss_axis = plt.subplots(figsize=(6, 4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], "o-", color="tab:blue", label="train loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.xaxis.get_major_locator().set_params(integer=True)
    loss_axis.set_ylabel("train loss", color="tab:blue")
    accuracy = [(row["epoch"], row["val_accuracy"]) for row in history if row.get("val_accuracy") is not None]
    if accuracy:
        acc_axis = loss_axis.twinx()
        acc_axis.plot(*zip(*accuracy), "s--", color="tab:orange", label="val accuracy")
        acc_axis.set_ylabel("val accuracy", color="tab:orange")
        acc_axis.set_ylim(0, 1)
    loss_axis.set_title(title or "training")
    loss_axis.grid(alpha=0.3)
    return save_figure(fig, path, dpi=120, bbox_inches="tight")


def plot_confusion_matrix(matrix: torch.Tensor, path: str | Path, title: str = "",
                          class_names: Sequence[str] | None = None) -> Path:
    """Row-normalised confusion matrix (true class per row) as a PNG, labelled with ``class_names``."""
    plt = _pyplot()
    counts = matrix.double()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    n = matrix.shape[0]
    fig, axis = plt.subplots(figsize=(max(5.5, n * 0.28 + 2), max(4.5, n * 0.28 + 1.5)))
    image = axis.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    step = 1 if n <= 30 else n // 15
    axis.set_xticks(range(0, n, step))
    axis.set_yticks(range(0, n, step))
    if class_names is not None and step == 1:
        axis.set_xticklabels(class_names, rotation=45 if max(map(len, class_names)) > 3 else 0, ha="right")
        axis.set_yticklabels(class_names)
    fig.colorbar(image, ax=axis, label="fraction of true class")
    accuracy = counts.diagonal().sum() / counts.sum().clamp_min(1)
    axis.set_title(f"{title + ': ' if title else ''}accuracy {accuracy:.1%} ({int(counts.sum())} images)", fontsize=10)
    return save_figure(fig, path, dpi=120, bbox_inches="tight")
