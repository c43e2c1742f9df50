"""Where the tissue is: Otsu's threshold, and the tissue bounding box of a slide.

:func:`otsu_threshold` is the one Otsu in streamcnn (the UltraMNIST generator binarises
its digits with it too). :func:`tissue_box` finds the bounding box of the tissue from a
thumbnail, either by thresholding the thumbnail itself (tissue is darker than the bright
glass of a brightfield slide) or from a mask image (non-zero = tissue) of the same
aspect. The box is rounded outwards to whole pixels of the level being read, so cropping
to it never cuts tissue the thumbnail saw; the model then sees exactly the cropped image.
"""
from __future__ import annotations

import numpy as np

__all__ = ["otsu_threshold", "tissue_mask", "tissue_box"]


def otsu_threshold(histogram: np.ndarray) -> int:
    """Otsu's threshold t of a 256-bin histogram; foreground is value > t."""
    p = histogram.astype(np.float64) / histogram.sum()
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(len(p)))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega))
    between[~np.isfinite(between)] = -1
    return int(np.argmax(between))


def tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """(h, w) bool: pixels of a (C, h, w) thumbnail darker than Otsu's threshold of its grey levels."""
    grey = thumbnail.astype(np.float64).mean(axis=0)
    if thumbnail.dtype != np.uint8:
        span = max(float(grey.max() - grey.min()), 1e-12)
        grey = (grey - grey.min()) * (255 / span)
    grey = grey.round().clip(0, 255).astype(np.uint8)
    return grey <= otsu_threshold(np.bincount(grey.ravel(), minlength=256)) if grey.min() < grey.max() \
        else np.ones(grey.shape, bool)


def tissue_box(mask: np.ndarray, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """(top, left, height, width) in an image of ``size`` (H, W) covering ``mask``'s True pixels.

    ``mask`` is (h, w) over the whole image (any scale with the same aspect); None if it is empty.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    sy, sx = size[0] / mask.shape[0], size[1] / mask.shape[1]
    top, left = int(np.floor(rows[0] * sy)), int(np.floor(cols[0] * sx))
    bottom = min(size[0], int(np.ceil((rows[-1] + 1) * sy)))
    right = min(size[1], int(np.ceil((cols[-1] + 1) * sx)))
    return top, left, bottom - top, right - left
