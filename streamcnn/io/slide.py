"""Whole-slide backend: OpenSlide (or tiffslide when OpenSlide is not installed).

For vendor slide formats (Aperio SVS, Hamamatsu NDPI/VMS, MIRAX, Leica SCN, Philips,
Ventana, ...) which need vendor logic to assemble. Install the ``slide`` extra.
OpenSlide returns RGBA; we return RGB (C = 3), areas outside the scanned region are 0.
OpenSlide addresses regions in level-0 coordinates: at a level whose downsample is not an
integer (e.g. a 38 px level of a 300 px image) a level pixel has no exact level-0 address
and OpenSlide resamples; use the ``tiff`` backend for exact pixels of such TIFF levels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from streamcnn.io.reader import ImageReader

__all__ = ["SlideReader", "slide_vendor"]


def _truncation(path: Path) -> str | None:
    """``truncated: expected N bytes ...`` for a TIFF-based slide (SVS, NDPI, ...) cut short, else None."""
    from streamcnn.io.tiff import tiff_bytes_needed

    with open(path, "rb") as f:
        if f.read(4) not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return None
    size, needed = path.stat().st_size, tiff_bytes_needed(path)
    return f"truncated: expected {needed} bytes but the file has {size}" if needed > size else None


def _library():
    try:
        import openslide
        return openslide.OpenSlide
    except ImportError:
        pass
    try:
        import tiffslide
        return tiffslide.TiffSlide
    except ImportError:
        return None


def slide_vendor(path: str | Path) -> str | None:
    """The slide format OpenSlide/tiffslide detects (e.g. ``"aperio"``), or None."""
    library = _library()
    if library is None:
        return None
    try:
        return library.detect_format(str(path))
    except Exception:
        return None


class SlideReader(ImageReader):
    """Lazy whole-slide reader over OpenSlide or tiffslide (see the module docstring)."""

    backend = "slide"

    def _open(self):
        library = _library()
        if library is None:
            raise ValueError(
                f"{self.path}: reading slide formats needs OpenSlide or tiffslide: pip install 'streamcnn[slide]'"
            )
        try:
            return library(str(self.path))
        except Exception as error:
            raise ValueError(f"{self.path}: {_truncation(self.path) or 'not a slide OpenSlide/tiffslide can read'}: "
                             f"{error}") from error

    def _describe(self, handle):
        self._downsamples = [float(d) for d in handle.level_downsamples]
        channels = self._to_array(handle.read_region((0, 0), 0, (1, 1))).shape[0]
        return [(channels, h, w) for w, h in handle.level_dimensions], np.dtype(np.uint8)

    @staticmethod
    def _to_array(image) -> np.ndarray:
        array = np.asarray(image)
        if array.ndim == 2:
            return array[None]
        if array.shape[-1] == 4:   # RGBA from OpenSlide: drop alpha
            array = array[..., :3]
        return np.ascontiguousarray(np.moveaxis(array, -1, 0))

    def _mpp(self, handle) -> float | None:
        from streamcnn.io.resolution import properties_mpp

        return properties_mpp(handle.properties)

    def _read(self, handle, level, top, left, height, width) -> np.ndarray:
        scale = self._downsamples[level]
        location = (round(left * scale), round(top * scale))     # OpenSlide wants level-0 coordinates
        return self._to_array(handle.read_region(location, level, (width, height)))
