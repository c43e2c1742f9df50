"""Generated slides for the pathology tests: RGB pyramidal TIFFs with mpp metadata and a CSV."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


def slide_pixels(h: int, w: int, seed: int, label: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: bright glass with a darker 'tissue' rectangle whose texture depends on ``label``."""
    rng = np.random.default_rng(seed)
    image = np.full((h, w, 3), 235, np.uint8) + rng.integers(0, 10, (h, w, 3), dtype=np.uint8)
    top, left = h // 5 + seed % 7, w // 4 + seed % 5
    bottom, right = h - h // 6, w - w // 5
    y, x = np.mgrid[top:bottom, left:right]
    period = 6 if label == 0 else 14
    stain = 90 + 60 * ((x // period + y // period) % 2)
    image[top:bottom, left:right] = np.stack([stain, stain // 2 + 40, stain], -1) + rng.integers(
        0, 20, (bottom - top, right - left, 3))
    return image


def write_slide(path: Path, image: np.ndarray, *, mpp: float | None = 0.5, levels: int = 3, tile: int = 64,
                description: str | None = None) -> list[np.ndarray]:
    """A tiled RGB pyramid (levels in SubIFDs, each half the previous by 2x2 mean); returns the levels."""
    pyramid = [image]
    for _ in range(levels - 1):
        prev = pyramid[-1]
        h, w = prev.shape[0] // 2, prev.shape[1] // 2
        pyramid.append(prev[:2 * h, :2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8))
    extra = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(pyramid[0], tile=(tile, tile), photometric="rgb", compression="zlib", subifds=levels - 1,
                  description=description, **extra)
        for level in pyramid[1:]:
            tif.write(level, tile=(tile, tile), photometric="rgb", compression="zlib", subfiletype=1)
    return pyramid


SIZES = [(192, 256), (320, 224), (256, 384), (160, 160), (288, 320), (224, 288)]
CLASSES = ["normal", "tumor"]


def make_slide_folder(root: Path, sizes=SIZES, *, mpp: float = 0.5) -> Path:
    """``root`` with slides S0..Sn (mixed sizes) and ``slides.csv`` (case_id, slide_id without extension, class name)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["case_id,slide_id,label"]
    for i, (h, w) in enumerate(sizes):
        label = i % 2
        write_slide(root / f"S{i}.tiff", slide_pixels(h, w, seed=i, label=label), mpp=mpp)
        lines.append(f"C{i // 2},S{i},{CLASSES[label]}")
    (root / "slides.csv").write_text("\n".join(lines) + "\n")
    return root
