"""Label variants of a generated UltraMNIST folder: the same images, another manifest.

The generator's manifest records every image's digits (``digits`` column), so a variant
task is a relabelling: no image is redrawn and the generator's faithful default is untouched.

- ``sum``: the benchmark's label, the sum of the digits (28 classes);
- ``count``: how many digits the image holds, 3, 4 or 5 (classes 0, 1, 2). It keeps what makes
  UltraMNIST hard (tiny digits next to huge ones, the XOR clutter, and a label that depends
  on every digit wherever it lies) but asks to find digits rather than to read them.

Counts are unbalanced in the generator (about 16 / 30 / 54 %), so ``balance`` keeps the same
number of images per class (the first ones in image order, deterministic).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Callable

from ..files import atomic_write_text

__all__ = ["VARIANTS", "write_variant_manifest"]

#: name -> (label from the digit list, number of classes)
VARIANTS: dict[str, tuple[Callable[[list[int]], int], int]] = {
    "sum": (sum, 28),
    "count": (lambda digits: len(digits) - 3, 3),
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
        rows = [(row["path"], label_of(json.loads(row["digits"]))) for row in csv.DictReader(handle)]
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
