#!/usr/bin/env python
"""Does streamed training follow conventional training step by step? (training-level equivalence)

    python benchmarks/bench_equivalence.py                 # 2 trunks x float64/float32, 200 steps each
    python benchmarks/bench_equivalence.py --steps 5 --no-write

Two copies of one model (same seed, same initial parameters) train on the same images in the
same order with the trainer's own step (:func:`streamcnn.engine.step.micro_step` with gradient
accumulation over 2 micro-batches, :func:`streamcnn.engine.step.optimizer_step`, AdamW with
weight decay from :func:`streamcnn.engine.step.make_optimizer`): one conventionally (the
whole image, ``tile_size=None``), one streamed (``tile_size`` with at least 4 tiles). Each
step's loss and, at the end, every parameter are compared, in float64 and in float32, for

- ``frozen-bn``: a small trunk with BatchNorm frozen at random running statistics and a
  residual block (torchvision's ``BasicBlock``), as a pretrained trunk is fine-tuned;
- ``norm-free``: ``resnet18-sws-w8-s2`` from the registry (weight-standardised, no
  activation normalisation: the family the project trains from scratch).

A control run shows the size of a rounding error's effect: conventional training again, from
the parameters multiplied by ``1 + eps`` of the dtype (``control_*``). The labels are random (the model memorises 32 images), so the loss moves every step; what is
measured is the agreement of the two trajectories. Relative differences: per step
``|loss_stream - loss_conv| / |loss_conv|``; parameters ``max |a - b| / max |a|`` over each
tensor, the largest over tensors. Writes ``benchmarks/results/equivalence.json`` (``float64``
and ``float32``, each with ``steps``, ``max_rel_loss_diff``, ``max_rel_param_diff`` over
both trunks, and per trunk) and ``equivalence.png`` (the per-step difference curves).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock

import common
from streamcnn.engine.batchnorm import freeze_batchnorm
from streamcnn.engine.step import make_optimizer, micro_step, optimizer_step
from streamcnn.engine.streaming import StreamingModule
from streamcnn.models.classifier import StreamingClassifier, build_head, build_trunk
from streamcnn.utils.units import pixels_to_unit

TRUNKS = ("frozen-bn", "norm-free")
NUM_CLASSES = 4


def frozen_bn_trunk(in_channels: int = 1, width: int = 8) -> tuple[nn.Module, int]:
    """Two strided conv-BN-ReLU layers and a residual block, BatchNorm frozen at random statistics."""
    body = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        BasicBlock(2 * width, 2 * width))
    with torch.no_grad():
        for m in body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return freeze_batchnorm(body), 2 * width


def build(trunk: str, dtype: torch.dtype, seed: int = 0) -> StreamingClassifier:
    """The model both runs start from (conventional: ``tile_size=None``)."""
    torch.manual_seed(seed)
    if trunk == "frozen-bn":
        body, channels = frozen_bn_trunk()
    elif trunk == "norm-free":
        body, channels = build_trunk("resnet18-sws-w8-s2", in_channels=1)
    else:
        raise ValueError(f"unknown trunk {trunk!r}; choose one of {TRUNKS}")
    return StreamingClassifier(StreamingModule(body, None), build_head("pool", channels, NUM_CLASSES)).to(dtype)


def data(count: int, size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` uint8 images (1, size, size) and random labels: the same for both runs."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (count, 1, size, size), generator=g, dtype=torch.uint8),
            torch.randint(0, NUM_CLASSES, (count,), generator=g))


def train(model: StreamingClassifier, images: torch.Tensor, labels: torch.Tensor, steps: int, *,
          batch: int, accumulate: int, lr: float) -> list[float]:
    """``steps`` optimizer steps of the trainer's step; the loss of each (mean over its micro-batches)."""
    optimizer = make_optimizer("adamw", model, lr=lr, weight_decay=1e-4)
    model.train()
    losses, cursor = [], 0
    for _ in range(steps):
        total = 0.0
        for _ in range(accumulate):
            index = torch.arange(cursor, cursor + batch) % len(images)
            cursor += batch
            loss, _ = micro_step(model, images[index], labels[index], device_type="cpu", accumulate=accumulate)
            total += float(loss) / accumulate
        optimizer_step(optimizer)
        losses.append(total)
    return losses


def compare(trunk: str, dtype: torch.dtype, steps: int, *, size: int = 96, tile: int = 48, batch: int = 4,
            accumulate: int = 2, lr: float = 1e-3) -> dict:
    """Train ``trunk`` conventionally and streamed; the two trajectories' differences."""
    conventional = build(trunk, dtype)
    streamed = copy.deepcopy(conventional)
    streamed.trunk.tile_size = tile
    tiles = len(streamed.trunk.plan((size, size)).tiles)
    images, labels = data(32, size)
    images = pixels_to_unit(images, dtype)   # the trainer's [0, 1], in the run's dtype
    start = time.process_time()
    # the control: conventional again from parameters moved by one rounding error (relative eps),
    # the difference any change in the order of floating-point sums makes
    control = copy.deepcopy(conventional)
    with torch.no_grad():
        for p in control.parameters():
            p.mul_(1 + torch.finfo(dtype).eps)
    a = train(conventional, images, labels, steps, batch=batch, accumulate=accumulate, lr=lr)
    b = train(streamed, images, labels, steps, batch=batch, accumulate=accumulate, lr=lr)
    c = train(control, images, labels, steps, batch=batch, accumulate=accumulate, lr=lr)
    loss_diff = [abs(x - y) / abs(x) for x, y in zip(a, b)]
    control_diff = [abs(x - y) / abs(x) for x, y in zip(a, c)]
    with torch.no_grad():
        param_diff = max(float((p - q).abs().max() / p.abs().max().clamp_min(torch.finfo(dtype).tiny))
                         for p, q in zip(conventional.parameters(), streamed.parameters()))
    return {"trunk": trunk, "dtype": str(dtype).removeprefix("torch."), "steps": steps, "image_px": size,
            "tile_size": tile, "n_tiles": tiles, "batch": batch, "accumulate": accumulate, "lr": lr,
            "loss_first": a[0], "loss_last": a[-1], "loss_conventional": a, "loss_streamed": b,
            "rel_loss_diff": loss_diff, "max_rel_loss_diff": max(loss_diff), "max_rel_param_diff": param_diff,
            "control_rel_loss_diff": control_diff, "control_max_rel_loss_diff": max(control_diff),
            "cpu_seconds": time.process_time() - start}


def plot(results: dict, path) -> None:
    from streamcnn.training.metrics import _pyplot
    from streamcnn.utils.files import save_figure

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.2))
    styles = {"float64": "-", "float32": "--"}
    for dtype, entry in results.items():
        for trunk, run in entry["trunks"].items():
            floor = torch.finfo(getattr(torch, dtype)).eps / 2   # a zero difference, on the log axis
            axes.semilogy(range(1, run["steps"] + 1), [max(d, floor) for d in run["rel_loss_diff"]],
                          styles[dtype], label=f"{trunk}, {dtype}: streamed ({run['n_tiles']} tiles)")
            if dtype == "float32":
                axes.semilogy(range(1, run["steps"] + 1), [max(d, floor) for d in run["control_rel_loss_diff"]],
                              ":", label=f"{trunk}, {dtype}: conventional, parameters x (1 + eps)")
    axes.axhline(1e-9, color="grey", linestyle=":", label="1e-9 (float64 bound)")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("|loss streamed - loss conventional| / |loss|")
    axes.set_title("streamed vs conventional training, same seed and data")
    axes.legend(fontsize=8)
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--size", type=int, default=96, help="image side (px)")
    parser.add_argument("--tile", type=int, default=48, help="streamed tile side (px)")
    parser.add_argument("--no-write", action="store_true", help="print only (no JSON, no PNG)")
    args = parser.parse_args(argv)
    payload = common.environment("cpu")
    results: dict = {}
    rows = []
    for dtype in (torch.float64, torch.float32):
        name = str(dtype).removeprefix("torch.")
        runs = {trunk: compare(trunk, dtype, args.steps, size=args.size, tile=args.tile) for trunk in TRUNKS}
        results[name] = {"steps": args.steps, "max_rel_loss_diff": max(r["max_rel_loss_diff"] for r in runs.values()),
                         "max_rel_param_diff": max(r["max_rel_param_diff"] for r in runs.values()), "trunks": runs}
        rows += [{k: v for k, v in r.items() if not isinstance(v, list)} for r in runs.values()]
    print(common.markdown_table(rows, [
        ("trunk", "trunk"), ("dtype", "dtype"), ("steps", "steps"), ("n_tiles", "tiles"), ("loss_first", "loss, step 1"),
        ("loss_last", "loss, last step"), ("max_rel_loss_diff", "max rel. loss diff"),
        ("max_rel_param_diff", "max rel. param diff"),
        ("control_max_rel_loss_diff", "control: max rel. loss diff"), ("cpu_seconds", "CPU s")]))
    if not args.no_write:
        payload.update(results)
        path = common.write_json("equivalence.json", payload)
        plot(results, common.RESULTS / "equivalence.png")
        print(f"wrote {path} and equivalence.png")
    return results


if __name__ == "__main__":
    main()
