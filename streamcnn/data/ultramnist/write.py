"""Writing an image as a tiled, pyramidal BigTIFF, atomically.

libvips writes the pyramids. An image that fits in one tile has no level below it, and
there tifffile writes the same file (one 256 px tile, deflate with the horizontal
predictor, BigTIFF, 1 px/mm) in under half libvips' time per call, which is most of the
cost of writing a small canvas (``tools/generate_ultramnist.py --size 128``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from streamcnn.utils.files import atomic_write

__all__ = ["write_pyramid_tiff", "TILE_SIZE"]

TILE_SIZE = 256

_TIFFFILE_COMPRESSION = {"deflate": "zlib", "none": None}


def write_pyramid_tiff(image: np.ndarray, path: str | Path, *, tile: int = TILE_SIZE,
                       compression: str = "deflate") -> None:
    """Write a (H, W) or (H, W, C) uint8 array as a tiled, pyramidal BigTIFF, atomically.

    Levels are separate pages (not SubIFDs) so that OpenSlide sees all of them; each level
    halves the previous one (mean of 2 x 2) down to one tile.
    """
    path = Path(path)
    array = np.ascontiguousarray(image if image.ndim == 3 else image[:, :, None])
    h, w, bands = array.shape
    one_tile = h <= tile and w <= tile and bands in (1, 3) and compression in _TIFFFILE_COMPRESSION
    atomic_write(path, lambda tmp: (_one_tile if one_tile else _pyramid)(array, tmp, tile, compression))


def _one_tile(array: np.ndarray, path: Path, tile: int, compression: str) -> None:
    import tifffile

    codec = _TIFFFILE_COMPRESSION[compression]
    rgb = array.shape[2] == 3
    tifffile.imwrite(path, array if rgb else array[:, :, 0], bigtiff=True, tile=(tile, tile), compression=codec,
                     predictor=codec is not None, photometric="rgb" if rgb else "minisblack", metadata=None,
                     resolution=(25.4, 25.4), resolutionunit="INCH")


def _pyramid(array: np.ndarray, path: Path, tile: int, compression: str) -> None:
    import pyvips

    h, w, bands = array.shape
    pyvips.Image.new_from_memory(array.data, w, h, bands, "uchar").tiffsave(
        str(path), tile=True, tile_width=tile, tile_height=tile, pyramid=True, subifd=False, bigtiff=True,
        compression=compression)
