"""Predictions of a trained checkpoint on slides with or without labels, and their heatmaps.

:func:`predict_checkpoint` is what ``tools/predict.py`` calls: the model is rebuilt from
the config stored in the checkpoint (trunk, head, classes, channels, level/mpp and tissue
settings), planned for the largest image of the data under the budget given, and run
without grad (the streamed forward keeps nothing for a backward). It writes
``predictions.csv`` (one row per image: path, predicted class name, a probability per
class, and the label when the table has one) and, with ``heatmaps``, per slide a
Grad-CAM and an exact input-gradient saliency map as pyramidal TIFFs aligned with the
slide and PNG overlays on its thumbnail (:mod:`streamcnn.training.heatmaps`).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from streamcnn.utils.files import atomic_write_text
from streamcnn.training.checkpointing import load_newest_readable
from streamcnn.training.config import TrainConfig, apply_overrides

__all__ = ["load_trained", "write_predictions", "predict_checkpoint", "open_data"]


def load_trained(checkpoint: str | Path, overrides: Sequence[tuple[str, Any]] = (), *, device: str = "auto",
                 progress: bool = True, budget: str | None = None) -> tuple[dict, TrainConfig]:
    """(checkpoint state, its config run on ``device`` with ``progress``, planned for ``budget``
    (None: the training budget), with ``overrides`` applied): what evaluating and predicting share.
    A checkpoint that does not read falls back to the newest one of its run that does, said in one line."""
    _, state = load_newest_readable(checkpoint, say=lambda line: print(line, flush=True))  # a torn best.pt: last.pt
    changes: list[tuple[str, Any]] = [("train.device", device), ("train.progress", progress)]
    if budget is not None:
        changes.append(("plan.budget", budget))
    return state, apply_overrides(TrainConfig.model_validate(state["config"]), changes + list(overrides))


def open_data(data: str | Path, config: TrainConfig, *, require_labels: bool, on_error: str | None = None):
    """The images of ``data`` (a folder with manifest.csv, a CSV, or a folder of images) read
    as the run was trained (level/mpp, tissue, class names), checked against the model."""
    from streamcnn.data import ManifestDataset
    from streamcnn.training.datasets import slide_options

    data = Path(data)
    root, table = (data.parent, data.name) if data.is_file() else (data, "manifest.csv")
    if not data.exists():
        raise FileNotFoundError(f"{data}: no such folder or CSV file")
    options = {**slide_options(config), "require_labels": require_labels}
    if on_error is not None:
        options["on_error"] = on_error
    dataset = ManifestDataset(root, table, **options)
    if dataset.channels != config.model.in_channels:
        raise ValueError(f"the model takes {config.model.in_channels}-channel images but {dataset.paths[0]} has "
                         f"{dataset.channels} channels: use images like those it was trained on")
    return dataset


def write_predictions(path: str | Path, paths: Sequence[Path], logits: torch.Tensor, labels: Sequence[int],
                      class_names: Sequence[str]) -> Path:
    """``predictions.csv``: path, predicted class, probability per class, label (when known), correct."""
    probabilities = torch.softmax(logits.double(), dim=1)
    labelled = any(label >= 0 for label in labels)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "predicted", *[f"p_{name}" for name in class_names]]
                    + (["label", "correct"] if labelled else []))
    for image, p, label in zip(paths, probabilities, labels):
        predicted = int(p.argmax())
        row = [str(image), class_names[predicted], *[f"{float(v):.6f}" for v in p]]
        if labelled:
            row += ["", ""] if label < 0 else [class_names[label], int(predicted == label)]
        writer.writerow(row)
    return atomic_write_text(path, buffer.getvalue())


def _slide_heatmaps(model, image, entry, out: Path, class_names: Sequence[str]) -> dict[str, str]:
    from streamcnn.training.heatmaps import explain, saliency, to_uint8, write_heatmap_tiff, write_overlay_png
    from streamcnn.io import open_image

    result = explain(model, image, scratch=out)
    stem = entry.path.name.split(".")[0]
    with open_image(entry.path) as reader:
        shapes = [s[1:] for s in reader.level_shapes[entry.level:]]
        thumbnail = reader.read_thumbnail(512)
    h, w = shapes[0]
    top, left, bh, bw = entry.box
    fraction = (top / h, left / w, bh / h, bw / w)
    files = {}
    title = f"{entry.path.name}: {class_names[result.target]}"
    for kind, values in (("cam", result.cam), ("saliency", saliency(result.input_gradient))):
        heatmap = to_uint8(values)
        files[kind] = str(write_heatmap_tiff(heatmap, out / f"{stem}_{kind}.tiff", shapes, entry.box, entry.mpp))
        small = heatmap if kind == "cam" else _thumb(heatmap, 512)
        write_overlay_png(thumbnail, small, out / f"{stem}_{kind}.png", title=f"{title} ({kind})",
                          box_fraction=fraction)
    return files, result.logits[None]


def _thumb(heatmap, size: int):
    from streamcnn.utils.downsample import shrink_to

    return shrink_to(heatmap[None], size)[0]


def predict_checkpoint(checkpoint: str | Path, data: str | Path, out: str | Path, *, budget: str | None = None,
                       device: str = "auto", heatmaps: bool = False, on_error: str | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Predict every image of ``data``; write ``out/predictions.csv`` (and heatmaps). Returns a summary."""
    from tqdm.auto import tqdm

    from streamcnn.training.datasets import model_input
    from streamcnn.engine.step import model_input as to_model_input
    from streamcnn.training.datasets import plan_size
    from streamcnn.training.planned import planned_model
    from streamcnn.training.spec import resolve_run

    state, config = load_trained(checkpoint, device=device, progress=progress, budget=budget)
    if heatmaps and config.model.mode != "stream":
        raise ValueError(f"--heatmaps needs a model trained with model.mode=stream; {checkpoint} is "
                         f"model.mode={config.model.mode}: predict without --heatmaps")
    out = Path(out)
    context = resolve_run(config).context     # device, process group and TF32 as training resolves them
    try:
        raw = open_data(data, config, require_labels=False, on_error=on_error)
        dataset = model_input(raw, config)
        size, which = plan_size(dataset, config)
        model, plan_text, _ = planned_model(apply_overrides(config, [("train.batch_size", 1)]), size, context.device,
                                            state["model"])
        model.eval()
        class_names = config.data.classes or [str(i) for i in range(config.model.num_classes)]
        logits, written = [], {}
        for index in tqdm(range(len(dataset)), desc="predict", unit="image", disable=not progress):
            image, _ = dataset[index]
            if heatmaps:
                folder = out / "heatmaps"
                result_files, result_logits = _slide_heatmaps(model, image, raw.entries[index], folder, class_names)
                written[str(raw.paths[index])] = result_files
                logits.append(result_logits)
            else:
                with torch.no_grad():
                    batch = image[None] if isinstance(image, torch.Tensor) else [image]
                    logits.append(model(to_model_input(batch)).float().cpu())
            if hasattr(image, "close"):
                image.close()
    finally:
        context.close()
    stacked = torch.cat(logits)
    predictions = write_predictions(out / "predictions.csv", raw.paths, stacked, raw.labels, class_names)
    summary = {"checkpoint": str(checkpoint), "data": str(data), "images": len(raw), "skipped":
               [f"{p}: {r}" for p, r in raw.skipped], "plan_for": which, "plan": plan_text,
               "predictions": str(predictions), "heatmaps": written}
    labelled = [i for i, label in enumerate(raw.labels) if label >= 0]
    if labelled:
        correct = sum(int(stacked[i].argmax()) == raw.labels[i] for i in labelled)
        summary["accuracy"] = correct / len(labelled)
    atomic_write_text(out / "predict.json", json.dumps(summary, indent=1))
    return summary
