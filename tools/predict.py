#!/usr/bin/env python
"""Predict slides with a trained checkpoint, with or without labels; optionally write heatmaps.

    python tools/predict.py --checkpoint runs/x/best.pt --data slides/ --budget 11GB --out preds/
    python tools/predict.py --checkpoint runs/x/best.pt --data slides/table.csv --out preds/ --heatmaps

``--data`` is a folder with ``manifest.csv``, a slide table CSV (``path`` or ``slide_id``,
optional ``label`` as a class name or integer), or a folder of images (all of them,
unlabelled). Images are read as in training (level/mpp, tissue crop). Writes
``predictions.csv`` (path, predicted class, a probability per class, label and correct
when known), ``predict.json``, and with ``--heatmaps`` per slide ``heatmaps/<slide>_cam``
and ``_saliency`` as pyramidal TIFFs aligned with the slide and PNG overlays.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))      # tools/_preflight.py, also when loaded by path
from _preflight import check_run_args, one_line_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by tools/train.py")
    parser.add_argument("--data", required=True, help="folder (with manifest.csv, or just images) or a CSV table")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--budget", help="peak device memory allowed, e.g. 11GB (default: the training budget)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    parser.add_argument("--heatmaps", action="store_true", help="write Grad-CAM and input-gradient saliency maps")
    parser.add_argument("--on-error", choices=["raise", "skip"], help="bad image files: stop (default) or skip")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def predict(args: argparse.Namespace) -> int:
    check_run_args(args.checkpoint, args.data, args.budget)
    from streamcnn.training.prediction import predict_checkpoint     # torch: only after the checks

    summary = predict_checkpoint(args.checkpoint, args.data, args.out, budget=args.budget, device=args.device,
                                 heatmaps=args.heatmaps, on_error=args.on_error, progress=not args.quiet)
    accuracy = f", accuracy {summary['accuracy']:.1%} on the labelled ones" if "accuracy" in summary else ""
    print(f"predicted {summary['images']} images{accuracy}: {summary['predictions']}")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} bad file(s): " + "; ".join(summary["skipped"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    return one_line_errors("predict.py", lambda: predict(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
