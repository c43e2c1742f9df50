"""Generated whole-slide-like images for demos and tests: RGB pyramidal TIFFs and a slide table.

Each slide is bright "glass" with one darker "tissue" region (so tissue detection has
something to find) whose stain and texture depend on the class: pink fine checks for
``normal``, dark purple coarse checks for ``tumor``. Slides are tiled, deflate-compressed TIFFs whose levels
(each half the previous, by 2 x 2 means) are SubIFDs, with the microns per pixel in the
resolution tags, like the slides a scanner writes. ``slides.csv`` lists them the way
pathology tables do: ``case_id,slide_id,label`` with class names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from streamcnn.utils.files import atomic_write, atomic_write_text

__all__ = ["CLASSES", "slide_pixels", "write_slide", "generate_demo_slides"]

CLASSES = ("normal", "tumor")


def slide_pixels(h: int, w: int, seed: int, label: int = 0, period: int = 6) -> np.ndarray:
    """(h, w, 3) uint8: glass with a tissue rectangle coloured and textured by ``label`` (checks of
    ``period`` or ``period * 7 // 3`` px); the rectangle's place depends on ``seed``."""
    rng = np.random.default_rng(seed)
    image = np.full((h, w, 3), 235, np.uint8) + rng.integers(0, 10, (h, w, 3), dtype=np.uint8)
    top, left = h // 5 + seed % 7, w // 4 + seed % 5
    bottom, right = h - h // 6, w - w // 5
    y, x = np.mgrid[top:bottom, left:right]
    size = period if label == 0 else period * 7 // 3
    stain = 90 + 60 * ((x // size + y // size) % 2)
    if label == 0:      # pink
        rgb = [stain + 50, stain // 2 + 60, stain + 30]
    else:               # dark purple
        rgb = [stain - 20, stain // 3 + 20, stain + 20]
    image[top:bottom, left:right] = np.stack(rgb, -1) + rng.integers(0, 20, (bottom - top, right - left, 3))
    return image


def write_slide(path: str | Path, image: np.ndarray, *, mpp: float | None = 0.5, levels: int = 3, tile: int = 64,
                description: str | None = None) -> list[np.ndarray]:
    """Write ``image`` (H, W, 3) as a tiled pyramidal TIFF (levels as SubIFDs), atomically; return the levels."""
    import tifffile

    pyramid = [image]
    for _ in range(levels - 1):
        prev = pyramid[-1]
        h, w = prev.shape[0] // 2, prev.shape[1] // 2
        pyramid.append(prev[:2 * h, :2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8))
    extra = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}

    def write(tmp: Path) -> None:
        with tifffile.TiffWriter(tmp, bigtiff=image.size > 2**31) as tif:
            tif.write(pyramid[0], tile=(tile, tile), photometric="rgb", compression="zlib", subifds=levels - 1,
                      description=description, **extra)
            for level in pyramid[1:]:
                tif.write(level, tile=(tile, tile), photometric="rgb", compression="zlib", subfiletype=1)
    atomic_write(path, write)
    return pyramid


def generate_demo_slides(out: str | Path, sizes: Sequence[tuple[int, int]], *, mpp: float = 0.5, levels: int = 3,
                         period: int = 6, tile: int = 64) -> Path:
    """Slides ``S0..`` of the given (H, W) sizes in ``out`` and ``out/slides.csv``; labels alternate."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["case_id,slide_id,label"]
    for i, (h, w) in enumerate(sizes):
        label = i % 2
        write_slide(out / f"S{i}.tiff", slide_pixels(h, w, seed=i, label=label, period=period), mpp=mpp,
                    levels=levels, tile=tile)
        lines.append(f"C{i // 2},S{i},{CLASSES[label]}")
    atomic_write_text(out / "slides.csv", "\n".join(lines) + "\n")
    return out / "slides.csv"
