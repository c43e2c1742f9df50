#!/usr/bin/env python
"""Pick the fastest way to train a model on an image size inside a memory budget.

    python tools/plan.py --model resnet50 --image-size 4000 --budget 11GB
        [--num-classes 2] [--dtype bf16] [--batch 1] [--accumulate 4] [--head conv|pool]
        [--in-channels 1] [--device cuda|cpu] [--json] [--measure] [--all] [--plot plan.png]
    python tools/plan.py --model resnet50 --slide slide.svs --budget 40GB   (level 0 of a slide)
    python tools/plan.py --model torchvision:convnext_tiny ...   (or timm:<arch>)

Sizes: ``11GB`` is 11 * 10^9 bytes, ``11GiB`` is 11 * 2^30 bytes. Prints the plan table (or
JSON with ``--json``); exits with status 1 and one line saying why when no plan fits the
budget, naming the largest image side that would fit (for a slide: the pyramid level and
its mpp). Arguments are checked before torch is imported, so a mistake is reported at once.
``--measure`` then runs one real training step with the chosen plan on ``--device`` (on
CUDA under the enforced budget) and adds the measured peak.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _preflight import check_budget, check_exists  # noqa: E402  (no torch: checks before the import)


def _image_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW (e.g. 4000 or 3000x4000), got {text!r}")
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW (e.g. 4000 or 3000x4000), got {text!r}")
    return (sizes[0], sizes[-1])


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def _budget(text: str) -> str:
    try:
        check_budget(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return text


def build_parser(models: str = "a trunk name (--help lists them)") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", help=f"trunk: {models} (default resnet50)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--image-size", type=_image_size, help="N or HxW pixels")
    size.add_argument("--slide", type=Path, help="plan for this image or slide at --level (its size and mpp)")
    p.add_argument("--level", type=int, default=0, help="pyramid level of --slide (default 0: full resolution)")
    p.add_argument("--budget", type=_budget, required=True, help="e.g. 11GB (10^9 bytes) or 11GiB (2^30 bytes)")
    p.add_argument("--counts", default="process", choices=["process", "tensors"],
                   help="what the budget limits: the process (RSS on CPU; reserved + context on CUDA) or tensors")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast precision")
    p.add_argument("--batch", type=_positive, default=1)
    p.add_argument("--head", default="conv", help="head on the feature map: conv or pool (default conv)")
    p.add_argument("--in-channels", type=_positive, default=3, help="1 for greyscale (UltraMNIST)")
    p.add_argument("--num-classes", type=_positive, default=2,
                   help="classes in the data (default 2; the last layer is a rounding error of the memory)")
    p.add_argument("--accumulate", type=_positive, default=1, help="micro-batches per optimizer step")
    p.add_argument("--optimizer", default="adamw", help="adamw or adam (default adamw)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="optim.weight_decay (Adam's copies gradients)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="device the plan is for")
    p.add_argument("--tile-sizes", type=_positive, nargs="+", help="tile sizes to consider (default: a ladder)")
    p.add_argument("--no-offload", action="store_true", help="never keep the feature map in host memory")
    p.add_argument("--all", action="store_true", help="simulate every candidate, not only until one fits")
    p.add_argument("--plot", type=Path, help="write a PNG of peak and cost against tile size (implies --all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--measure", action="store_true", help="run one real training step with the chosen plan")
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:  # only help needs the registries (and so torch)
        from streamcnn.models.classifier import trunk_families

        build_parser(", ".join(trunk_families())).parse_args(argv)
    args = build_parser().parse_args(argv)
    check_exists(args.slide, "slide")
    return args


def _slide_levels(path: Path) -> list[tuple[int, tuple[int, int], float | None]]:
    from streamcnn.io import open_image

    with open_image(path) as reader:
        return [(i, tuple(shape[1:]), mpp) for i, (shape, mpp) in enumerate(zip(reader.level_shapes, reader.mpp))]


def _what_fits(levels: list, largest_side: int | None) -> str:
    """For a refusal on a slide: the first (finest) level whose longer side fits."""
    if not largest_side:
        return ""
    for level, (h, w), mpp in levels:
        if max(h, w) <= largest_side:
            at = f" ({mpp:.3g} mpp)" if mpp else ""
            return f"; level {level}{at}, {h}x{w} px, fits: pass --level {level}"
    finest = levels[0][2]
    scale = max(levels[0][1]) / largest_side
    at = f", about {finest * scale:.3g} mpp" if finest else ""
    return f"; no level of the slide fits: it would need {scale:.3g}x downsampling{at}"


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except FileNotFoundError as e:
        print(f"plan.py: error: {e}", file=sys.stderr)
        return 1
    from streamcnn.engine.step import OPTIMIZERS
    from streamcnn.models.classifier import HEADS, build_model, trunk_factory
    from streamcnn.planning.measurement import measure_step_memory
    from streamcnn.planning.memory import budgeted_bytes
    from streamcnn.planning.search import BudgetError, enforce_budget, plan
    from streamcnn.utils.units import format_size, parse_size
    import torch

    levels = []
    try:
        trunk_factory(args.model)
        if args.head not in HEADS:
            raise ValueError(f"unknown head {args.head!r}; choose one of {', '.join(sorted(HEADS))}")
        if args.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {args.optimizer!r}; choose one of {', '.join(sorted(OPTIMIZERS))}")
        budget = parse_size(args.budget)
        if args.slide is not None:
            levels = _slide_levels(args.slide)
            if not 0 <= args.level < len(levels):
                raise ValueError(f"{args.slide} has levels 0..{len(levels) - 1}, not --level {args.level}")
            args.image_size = levels[args.level][1]
            levels = levels[args.level:]
        report = plan(args.model, args.image_size, budget, batch=args.batch, accumulate=args.accumulate,
                      dtype=args.dtype, in_channels=args.in_channels, num_classes=args.num_classes, head=args.head,
                      device=args.device, optimizer=args.optimizer, weight_decay=args.weight_decay,
                      tile_sizes=args.tile_sizes, allow_offload=not args.no_offload, progress=not args.json,
                      lazy_input=args.slide is not None,  # a slide is read a window at a time
                      exhaustive=args.all or args.plot is not None, counts=args.counts)
        if args.plot is not None:
            report.plot(args.plot)
        if args.measure:
            if args.device == "cuda" and not torch.cuda.is_available():
                raise ValueError("--measure --device cuda needs a CUDA device, and none is visible here: "
                                 "measure with --device cpu, or run where a GPU is")
            # a budget larger than the card, or one that does not cover the CUDA context, is an error
            enforcement = enforce_budget(budget, args.device, counts=args.counts)
            model = build_model(args.model, head=args.head, num_classes=args.num_classes, in_channels=args.in_channels)
            report.apply(model)
            report.measured = measure_step_memory(model, args.image_size, batch=args.batch, dtype=args.dtype,
                                                  device=args.device, optimizer=args.optimizer,
                                                  weight_decay=args.weight_decay, accumulate=args.accumulate)
    except BudgetError as e:
        message = str(e) + (_what_fits(levels, e.largest_side) if levels else "")
        if args.json:
            print(json.dumps({"error": message, "budget_bytes": budget, "min_bytes": e.min_bytes,
                              "largest_side": e.largest_side}, indent=2))
        print(f"plan.py: error: {message}", file=sys.stderr)
        return 1
    except (ValueError, ImportError, OSError) as e:  # unknown name, a trunk that cannot stream, timm missing
        print(f"plan.py: error: {e}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError as e:     # the measured step went past the enforced cap
        print(f"plan.py: error: the measured step ran out of memory under the enforced budget: "
              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
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
