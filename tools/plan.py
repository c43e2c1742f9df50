#!/usr/bin/env python
"""Pick the fastest way to train a model on an image size inside a memory budget.

    python tools/plan.py --model resnet50 --image-size 4000 --budget 11GB --num-classes 28
        [--dtype bf16] [--batch 1] [--accumulate 4] [--head conv] [--in-channels 1]
        [--device cuda|cpu] [--json] [--measure] [--all] [--plot plan.png]
    python tools/plan.py --model torchvision:convnext_tiny ...   (or timm:<arch>)

Sizes: ``11GB`` is 11 * 10^9 bytes, ``11GiB`` is 11 * 2^30 bytes. Prints the plan table (or
JSON with ``--json``); exits with status 1 and says why when no plan fits the budget.
``--measure`` then runs one real training step with the chosen plan on ``--device`` (on
CUDA under the enforced budget) and adds the measured peak.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamcnn.planning.measurement import measure_step_memory  # noqa: E402
from streamcnn.planning.memory import budgeted_bytes  # noqa: E402
from streamcnn.models.classifier import HEADS, TRUNKS, build_model, trunk_factory  # noqa: E402
from streamcnn.engine.step import OPTIMIZERS  # noqa: E402
from streamcnn.planning.search import BudgetError, enforce_budget, plan  # noqa: E402
from streamcnn.utils.units import format_size, parse_size  # noqa: E402


def _image_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW (e.g. 4000 or 3000x4000), got {text!r}")
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW (e.g. 4000 or 3000x4000), got {text!r}")
    return (sizes[0], sizes[-1])


def _trunk(name: str) -> str:
    try:
        trunk_factory(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return name


def _budget(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", type=_trunk,
                   help=f"trunk: {', '.join(sorted(TRUNKS))}, torchvision:<arch> or timm:<arch> (default resnet50)")
    p.add_argument("--image-size", type=_image_size, required=True, help="N or HxW pixels")
    p.add_argument("--budget", type=_budget, required=True, help="e.g. 11GB (10^9 bytes) or 11GiB (2^30 bytes)")
    p.add_argument("--counts", default="process", choices=["process", "tensors"],
                   help="what the budget limits: the process (RSS on CPU; reserved + context on CUDA) or tensors")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast precision")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--head", default="conv", choices=sorted(HEADS))
    p.add_argument("--in-channels", type=int, default=3, help="1 for greyscale (UltraMNIST)")
    p.add_argument("--num-classes", type=int, required=True, help="classes in the data (sizes the last layer)")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step (train.accumulate)")
    p.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZERS))
    p.add_argument("--weight-decay", type=float, default=0.0, help="optim.weight_decay (Adam's copies gradients)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="device the plan is for")
    p.add_argument("--tile-sizes", type=int, nargs="+", help="tile sizes to consider (default: a ladder)")
    p.add_argument("--no-offload", action="store_true", help="never keep the feature map in host memory")
    p.add_argument("--all", action="store_true", help="simulate every candidate, not only until one fits")
    p.add_argument("--plot", type=Path, help="write a PNG of peak and cost against tile size (implies --all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--measure", action="store_true", help="run one real training step with the chosen plan")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = plan(args.model, args.image_size, args.budget, batch=args.batch, accumulate=args.accumulate,
                      dtype=args.dtype, in_channels=args.in_channels, num_classes=args.num_classes, head=args.head,
                      device=args.device, optimizer=args.optimizer, weight_decay=args.weight_decay,
                      tile_sizes=args.tile_sizes,
                      allow_offload=not args.no_offload, progress=not args.json,
                      exhaustive=args.all or args.plot is not None, counts=args.counts)
    except BudgetError as e:
        if args.json:
            print(json.dumps({"error": str(e), "budget_bytes": args.budget, "min_bytes": e.min_bytes}, indent=2))
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, ImportError) as e:  # unknown architecture, a trunk that cannot stream, timm missing
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.plot is not None:
        report.plot(args.plot)
    if args.measure:
        enforcement = enforce_budget(args.budget, args.device, counts=args.counts)
        model = build_model(args.model, head=args.head, num_classes=args.num_classes, in_channels=args.in_channels)
        report.apply(model)
        report.measured = measure_step_memory(model, args.image_size, batch=args.batch, dtype=args.dtype,
                                              device=args.device, optimizer=args.optimizer,
                                              weight_decay=args.weight_decay, accumulate=args.accumulate)
    if args.json:
        out = report.to_json()
        if args.measure:
            out["enforcement"] = enforcement
        print(json.dumps(out, indent=2))
    else:
        print(report)
        if args.plot is not None:
            print(f"plot: {args.plot}")
        if args.measure and not enforcement["enforced"]:
            print(f"note: {enforcement['reason']}")
        if args.measure:
            measured = budgeted_bytes(report.measured, args.counts)
            what = "on device" if args.counts == "process" else "of tensors"
            print(f"measured peak {what} {format_size(measured)} "
                  f"{'within' if measured <= report.budget_bytes else 'OVER'} the budget of "
                  f"{format_size(report.budget_bytes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
