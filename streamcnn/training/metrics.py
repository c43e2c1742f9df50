"""What a run reports: ``metrics.jsonl``, the loss-curve and confusion-matrix PNGs, peak memory,
and the classification metrics pathology reports use (:func:`classification_metrics`: AUC,
balanced accuracy, per-class recall, quadratic kappa for graded labels).

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

import numpy as np
import torch

from streamcnn.utils.files import atomic_write_text, save_figure

__all__ = ["write_metrics", "read_metrics", "confusion_matrix", "classification_metrics", "quadratic_kappa",
           "validation_metrics", "labels_are_grades", "check_best_by", "BEST_BY", "plot_loss_curve", "plot_confusion_matrix",
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


def _auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for the ``positive`` images (ties count half); None
    when one side is empty (the Mann-Whitney U statistic over the two sides' ranks)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):      # average ranks over ties
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def quadratic_kappa(confusion: torch.Tensor) -> float | None:
    """Cohen's kappa with quadratic weights from a ``confusion[true, predicted]`` matrix (graded labels)."""
    observed = confusion.double().numpy()
    n, total = observed.shape[0], observed.sum()
    if total == 0:
        return None
    grid = np.arange(n)
    weights = (grid[:, None] - grid[None, :]) ** 2 / max((n - 1) ** 2, 1)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / total
    denominator = (weights * expected).sum()
    return None if denominator == 0 else float(1 - (weights * observed).sum() / denominator)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                           ordered: bool = False, prefix: str = "val_") -> dict[str, Any]:
    """AUC (binary: of class 1; more classes: the macro mean of one-vs-rest AUCs over the classes
    present), balanced accuracy (mean recall of the classes present), recall per class and, for
    ``ordered`` labels (grades), quadratic weighted kappa. Tensors are moved to the host here."""
    logits, labels = logits.detach().double().cpu(), labels.detach().long().cpu()
    probabilities = torch.softmax(logits, dim=1).numpy()
    truth = labels.numpy()
    confusion = confusion_matrix(logits.argmax(dim=1), labels, num_classes)
    counts = confusion.sum(dim=1).double()
    recall = [float(confusion[c, c] / counts[c]) if counts[c] else None for c in range(num_classes)]
    present = [r for r in recall if r is not None]
    if num_classes == 2:
        auc = _auc(probabilities[:, 1], truth == 1)
    else:
        aucs = [_auc(probabilities[:, c], truth == c) for c in range(num_classes)]
        known = [a for a in aucs if a is not None]
        auc = float(np.mean(known)) if known else None
    out: dict[str, Any] = {f"{prefix}auc": auc,
                           f"{prefix}balanced_accuracy": float(np.mean(present)) if present else None,
                           f"{prefix}recall": recall}
    if ordered:
        out[f"{prefix}kappa"] = quadratic_kappa(confusion)
    return out


#: metrics.jsonl keys ``train.best_by`` may name (a key ending in ``loss``: lower is better)
BEST_BY = ("auto", "val_accuracy", "val_loss", "val_auc", "val_balanced_accuracy", "val_kappa", "train_loss",
           "train_accuracy")


def check_best_by(best_by: str) -> None:
    if best_by not in BEST_BY:
        raise ValueError(f"train.best_by={best_by!r} is not a metric best.pt can follow: choose one of "
                         f"{', '.join(BEST_BY)}")


def labels_are_grades(config: Any) -> bool:
    """Ordered labels (grades such as ISUP 0-5, quadratic kappa applies): integer labels, without
    class names, of more than two classes."""
    return config.data.classes is None and (config.model.num_classes or 0) > 2


def validation_metrics(result: Any, context: Any, num_classes: int, ordered: bool) -> dict[str, Any]:
    """:func:`classification_metrics` of an evaluation's per-image logits and labels, over every process."""
    from streamcnn.training.distributed import gather_objects

    mine = (result.logits, result.labels) if result.logits is not None else None
    shards = [shard for shard in gather_objects(mine, context) if shard is not None]
    if not shards:
        return {}
    return classification_metrics(torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards]), num_classes,
                                  ordered=ordered)


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
