"""Writing an image as a tiled, pyramidal BigTIFF (libvips), atomically."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...files import atomic_write

__all__ = ["write_pyramid_tiff", "TILE_SIZE"]

TILE_SIZE = 256


def write_pyramid_tiff(image: np.ndarray, path: str | Path, *, tile: int = TILE_SIZE,
                       compression: str = "deflate") -> None:
    """Write a (H, W) or (H, W, C) uint8 array as a tiled, pyramidal BigTIFF, atomically.

    Levels are separate pages (not SubIFDs) so that OpenSlide sees all of them; each level
    halves the previous one (mean of 2 x 2) down to one tile.
    """
    import pyvips

    path = Path(path)
    array = np.ascontiguousarray(image if image.ndim == 3 else image[:, :, None])
    h, w, bands = array.shape
    vips_image = pyvips.Image.new_from_memory(array.data, w, h, bands, "uchar")
    atomic_write(path, lambda tmp: vips_image.tiffsave(str(tmp), tile=True, tile_width=tile, tile_height=tile,
                                                        pyramid=True, subifd=False, bigtiff=True,
                                                        compression=compression))
