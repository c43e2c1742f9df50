"""Label variants of a generated UltraMNIST folder: the same images, another manifest.

The generator's manifest records every image's digits and their boxes, so a variant
task is a relabelling: no image is redrawn and the generator's faithful default is untouched.

- ``sum``: the benchmark's label, the sum of the digits (28 classes);
- ``count``: how many digits the image holds, 3, 4 or 5 (classes 0, 1, 2). It keeps what makes
  UltraMNIST hard (tiny digits next to huge ones, the XOR clutter, and a label that depends
  on every digit wherever it lies) but asks to find digits rather than to read them.
- ``smallest``: the value (0..9) of the digit in the smallest box; when several boxes share the
  smallest side (common on small canvases, where the generator floors digits at 14 px), the
  largest of their values. The label is decided by the tiniest digit, which only full
  resolution keeps legible, and finding it means comparing digits anywhere in the image. The
  tie rule makes the classes nearly uniform (8-14 % each at 128-256 px; the smallest value
  would give 26-32 % zeros). The default task of ``python tools/train.py`` (docs/learning.md).
- ``largest``: the value of the digit in the largest box (ties: the largest value): an easy
  control, decided by the digit that survives downsampling best.

Labels are unbalanced in the generator (counts: about 16 / 30 / 54 %), so ``balance`` keeps the
same number of images per class (the first ones in image order, deterministic).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Callable

from streamcnn.utils.files import atomic_write_text

__all__ = ["VARIANTS", "write_variant_manifest"]


def _largest(digits: list[int], boxes: list[list[int]]) -> int:
    area = max(box[2] * box[3] for box in boxes)
    return max(digit for digit, box in zip(digits, boxes) if box[2] * box[3] == area)


def _smallest(digits: list[int], boxes: list[list[int]]) -> int:
    """The value of the digit in the smallest box; several boxes of that size: the largest value."""
    area = min(box[2] * box[3] for box in boxes)
    return max(digit for digit, box in zip(digits, boxes) if box[2] * box[3] == area)


#: name -> (label from the digit list and their boxes ``[x, y, w, h]``, number of classes)
VARIANTS: dict[str, tuple[Callable[[list[int], list[list[int]]], int], int]] = {
    "sum": (lambda digits, boxes: sum(digits), 28),
    "count": (lambda digits, boxes: len(digits) - 3, 3),
    "smallest": (_smallest, 10),
    "largest": (_largest, 10),
}


def write_variant_manifest(root: str | Path, variant: str, *, balance: bool = True,
                           per_class: int | None = None) -> tuple[Path, list[int]]:
    """Write ``root/manifest-<variant>.csv`` (columns ``path,label``) from ``root/manifest.csv``.

    Returns the manifest path and the number of images per class. ``per_class`` caps each
    class (with ``balance``, every class gets the same number, at most ``per_class``).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown UltraMNIST variant {variant!r}; choose one of {sorted(VARIANTS)}")
    label_of, classes = VARIANTS[variant]
    root = Path(root)
    source = root / "manifest.csv"
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: generate the images first (tools/generate_ultramnist.py)")
    with source.open(newline="") as handle:
        rows = [(row["path"], label_of(json.loads(row["digits"]), json.loads(row["boxes"])))
                for row in csv.DictReader(handle)]
    by_class: list[list[str]] = [[] for _ in range(classes)]
    for path, label in rows:
        by_class[label].append(path)
    keep = min(len(paths) for paths in by_class) if balance else None
    if per_class is not None:
        keep = per_class if keep is None else min(keep, per_class)
    chosen = sorted((path, label) for label, paths in enumerate(by_class) for path in paths[:keep])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label"])
    writer.writerows(chosen)
    out = root / f"manifest-{variant}.csv"
    atomic_write_text(out, buffer.getvalue())
    return out, [len(paths[:keep]) for paths in by_class]
