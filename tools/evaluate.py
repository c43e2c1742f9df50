#!/usr/bin/env python
"""Evaluate a trained checkpoint on a data folder: accuracy, AUC, balanced accuracy, recall per class,
quadratic kappa (graded labels) and a confusion matrix (PNG).

    python tools/evaluate.py --checkpoint runs/x/best.pt --data DIR [--budget 11GB]

``DIR`` holds ``manifest.csv`` (path,label). The model is rebuilt from the config stored
in the checkpoint and planned again for ``--budget`` (default: the training budget).
Writes ``evaluation.json``, ``confusion_matrix.png`` and ``predictions.csv`` (one row per
image) to ``--out`` (default:
``eval-<DIR name>`` next to the checkpoint).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))      # tools/_preflight.py, also when loaded by path
from _preflight import check_run_args, one_line_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a last.pt or best.pt written by tools/train.py")
    parser.add_argument("--data", required=True, help="folder with the manifest of the images to evaluate, or a CSV")
    parser.add_argument("--manifest", default="manifest.csv", help="manifest file name in --data")
    parser.add_argument("--budget", help="peak device memory allowed, e.g. 11GB (default: the training budget)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: the training batch)")
    parser.add_argument("--out", help="output folder")
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> int:
    check_run_args(args.checkpoint, args.data, args.budget)
    from streamcnn.training.evaluation import evaluate_checkpoint     # torch: only after the checks

    report = evaluate_checkpoint(args.checkpoint, args.data, manifest=args.manifest, budget=args.budget,
                                 device=args.device, out=args.out, batch_size=args.batch_size)
    if int(os.environ.get("RANK", "0")) == 0:      # under torchrun: once, from the process that wrote the files
        extra = "".join(f", {name} {report[key]:.3f}" for key, name in
                        (("auc", "AUC"), ("balanced_accuracy", "balanced accuracy"), ("kappa", "quadratic kappa"))
                        if report.get(key) is not None)
        recall = ", ".join(f"{c} {r:.1%}" for c, r in zip(report["classes"], report["recall"]) if r is not None)
        print(f"accuracy {report['accuracy']:.2%} on {report['images']} images (loss {report['loss']:.4f}){extra}; "
              f"recall {recall}; confusion matrix: {report['out']}/confusion_matrix.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    return one_line_errors("evaluate.py", lambda: evaluate(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
