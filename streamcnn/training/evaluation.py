"""Evaluating a trained checkpoint on a manifest folder, under a memory budget.

The checkpoint carries its config, so the model (trunk, head, streamed or downsampling
baseline) is rebuilt exactly as it was trained; the memory plan is made again for the
budget given here (or the training budget), so a model trained on a large GPU can be
evaluated on a small one. Writes ``evaluation.json``, ``confusion_matrix.png`` (with the
class names) and ``predictions.csv`` (one row per image, see
:func:`streamcnn.training.prediction.write_predictions`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from streamcnn.utils.files import atomic_write_text
from streamcnn.training.datasets import make_loader, model_input, plan_size
from streamcnn.training.distributed import gather_objects
from streamcnn.training.loop import evaluate
from streamcnn.training.metrics import classification_metrics, labels_are_grades, plot_confusion_matrix
from streamcnn.training.prediction import load_trained, open_data, write_predictions
from streamcnn.training.planned import planned_model
from streamcnn.training.spec import resolve_run

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, *, manifest: str = "manifest.csv",
                        budget: str | None = None, device: str = "auto", out: str | Path | None = None,
                        batch_size: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Accuracy, loss, AUC, balanced accuracy, recall per class (and quadratic kappa for graded
    labels) and the confusion matrix of ``checkpoint`` on ``data/manifest`` (or the CSV ``data``).

    Returns the report written to ``out/evaluation.json`` (default: ``eval-<data folder
    name>`` next to the checkpoint), with ``confusion_matrix.png`` beside it.
    """
    checkpoint = Path(checkpoint)
    state, config = load_trained(checkpoint, [("train.batch_size", batch_size)] if batch_size is not None else [],
                                 device=device, progress=progress, budget=budget)
    spec = resolve_run(config)
    context = spec.context
    try:
        table = Path(data) if Path(data).is_file() else Path(data) / manifest
        raw = open_data(table, config, require_labels=True)
        dataset = model_input(raw, config)
        image_size, planned_for = plan_size(dataset, config)
        model, plan_text, _ = planned_model(config, image_size, context.device, state["model"])
        plan_text = f"planned for {planned_for}\n{plan_text}"
        result = evaluate(model, make_loader(dataset, config, context, train=False), context=context,
                          num_classes=config.model.num_classes, amp_dtype=spec.amp_dtype,
                          progress=progress, desc="evaluate", per_image=True)
        logits = _in_image_order(gather_objects(result.logits, context), len(dataset))  # type: ignore[arg-type]
    finally:
        context.close()
    report = {"checkpoint": str(checkpoint), "epoch": state["epoch"], "data": str(table),
              "images": result.images, "accuracy": result.accuracy, "loss": result.loss,
              **classification_metrics(logits, torch.tensor(raw.labels), config.model.num_classes,
                                       ordered=labels_are_grades(config), prefix=""),
              "seconds": result.seconds, "budget": config.plan.budget, "device": str(context.device), "plan": plan_text,
              "confusion_matrix": result.confusion.tolist(), "classes": raw.class_names}
    folder = Path(out) if out is not None else checkpoint.parent / f"eval-{Path(data).resolve().name}"
    report["out"] = str(folder)
    if context.is_main:
        atomic_write_text(folder / "evaluation.json", json.dumps(report, indent=1))
        plot_confusion_matrix(result.confusion, folder / "confusion_matrix.png",
                              title=f"{checkpoint.name} on {Path(data).name}", class_names=raw.class_names)
        write_predictions(folder / "predictions.csv", raw.paths, logits, raw.labels, raw.class_names)
    return report


def _in_image_order(shards: list[torch.Tensor | None], count: int) -> torch.Tensor:
    """Every process's logits in the manifest's order: process ``r`` of ``W`` evaluated images
    ``r, r + W, ...`` (:class:`streamcnn.training.datasets.ShardedBatchSampler`; None: no images)."""
    logits = torch.empty(count, next(shard.shape[1] for shard in shards if shard is not None))
    for rank, shard in enumerate(shards):
        if shard is not None:
            logits[rank::len(shards)] = shard
    return logits
