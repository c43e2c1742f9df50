"""UltraMNIST layouts: everything random about one image, drawn from ``(seed, split, index)`` only.

A sample (Gupta et al., arXiv 2206.12681; ``docs/data.md`` lists the rules) is a binary
canvas holding 3 to 5 real MNIST digits whose SUM (0..27) is the label.
:func:`sample_layout` draws its class, digits, digit instances, V-shaped scales,
non-overlapping boxes and background parameters, so that any image can be redrawn alone
and statistics and resumed runs never need pixels.

Scaled canvases: every length of the 4000 px reference (digit sides, circle radii,
checker cells) is multiplied by ``size / 4000``, and digit sides are floored at
:data:`MIN_DIGIT_PX` (14 px, the reference's smallest digit) so that digits stay
legible on small canvases. Below 4000 the floor merges the smallest scales: at 512 px
the scales f = 1..3 all give 14 px digits.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np

from streamcnn.data.digits import SPLITS

__all__ = ["Layout", "sample_layout", "class_multisets", "digit_side", "REFERENCE_SIZE", "NUM_CLASSES",
           "MIN_DIGIT_PX"]

REFERENCE_SIZE = 4000
NUM_CLASSES = 28
MIN_DIGIT_PX = 14
#: Scale factors 1..75 and their V-shaped weights 38..1 (f = 1..38), 1..37 (f = 39..75).
SCALE_FACTORS = np.arange(1, 76)
SCALE_WEIGHTS = np.concatenate([np.arange(38, 0, -1), np.arange(1, 38)]).astype(np.float64)
MAX_PLACEMENT_TRIES = 10_000
_SPLIT_CODE = {"train": 0, "test": 1}


@lru_cache(maxsize=None)
def class_multisets(label: int) -> tuple[tuple[int, ...], ...]:
    """Every sorted multiset of 3, 4 or 5 digits (0..9) summing to ``label``."""
    return tuple(combo for k in (3, 4, 5)
                 for combo in itertools.combinations_with_replacement(range(10), k) if sum(combo) == label)


@dataclass
class Layout:
    """Everything random about one image; :func:`render_layout` makes its pixels.

    ``boxes`` are ``[x, y, w, h]`` of each digit square in level-0 pixels, in the order of
    ``digits`` (ascending values: the placement order). ``instances`` index the split's
    digit bank within each value.
    """

    size: int
    label: int
    digits: list[int]
    instances: list[int]
    boxes: list[list[int]]
    grid: np.ndarray = field(repr=False)            # (n, n) bool checkerboard cells
    affine: tuple[float, float, float]              # rotation deg, scale, x-shear deg
    circles: list[tuple[float, float, float]]       # centre x, centre y, radius
    triangles: list[tuple[float, ...]]              # x0, y0, x1, y1, x2, y2


def _label_for(seed: int, split: str, index: int) -> int:
    # Each block of 28 consecutive images holds every class once, in a shuffled order:
    # exact class balance for counts that are multiples of 28, still a function of (seed, split, i).
    block_rng = np.random.default_rng([seed, _SPLIT_CODE[split], 1, index // NUM_CLASSES])
    return int(block_rng.permutation(NUM_CLASSES)[index % NUM_CLASSES])


def digit_side(factor: int, half: bool, size: int) -> int:
    """Side in pixels of a digit of scale ``factor`` on a ``size`` canvas (see module docstring)."""
    reference = 14 if factor == 1 and half else 28 * factor
    return max(MIN_DIGIT_PX, round(reference * size / REFERENCE_SIZE))


def sample_layout(index: int, *, size: int = REFERENCE_SIZE, seed: int = 0, split: str = "train",
                  bank_sizes: Sequence[int]) -> Layout:
    """Draw image ``index`` of (seed, split); ``bank_sizes[v]`` = instances of digit v in the split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if size < 4 * MIN_DIGIT_PX:
        raise ValueError(f"canvas size {size} is too small: UltraMNIST needs at least {4 * MIN_DIGIT_PX} px")
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], 0, index])
    label = _label_for(seed, split, index)
    options = class_multisets(label)
    digits = list(options[rng.integers(len(options))])
    instances = [int(rng.integers(bank_sizes[d])) for d in digits]
    probabilities = SCALE_WEIGHTS / SCALE_WEIGHTS.sum()
    boxes: list[list[int]] = []
    for _ in digits:
        for _attempt in range(MAX_PLACEMENT_TRIES):
            # On overlap, redraw both the scale and the position (as the reference does).
            factor = int(rng.choice(SCALE_FACTORS, p=probabilities))
            half = bool(rng.integers(2)) if factor == 1 else False
            side = digit_side(factor, half, size)
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if not any(x < bx + bw and bx < x + side and y < by + bh and by < y + side for bx, by, bw, bh in boxes):
                boxes.append([x, y, side, side])
                break
        else:
            raise RuntimeError(f"could not place {len(digits)} digits without overlap on a {size} px canvas")
    scale = size / REFERENCE_SIZE
    n = int(rng.integers(12, 24))
    grid = rng.integers(0, 2, size=(n, n)).astype(bool)
    affine = (float(rng.uniform(-45, 45)), float(rng.uniform(0.8, 1.2)), float(rng.uniform(-50, 50)))
    circles = [(float(rng.uniform(0, size)), float(rng.uniform(0, size)), float(rng.integers(50, 1000)) * scale)
               for _ in range(int(rng.integers(0, 5)))]
    triangles = [tuple(float(v) for v in rng.uniform(0, size, size=6)) for _ in range(int(rng.integers(0, 5)))]
    return Layout(size, label, digits, instances, boxes, grid, affine, circles, triangles)
