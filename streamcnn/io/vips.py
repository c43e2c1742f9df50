"""Generic backend: pyvips (libvips) for PNG, JPEG, WebP, JPEG 2000, HEIF, ... images.

libvips picks its loader by content. Formats without tiles (PNG, JPEG) cannot be read
a window at a time from disk: the first read decodes the image (libvips keeps large
decoded images in a temporary file, not in memory). Thumbnails use libvips'
shrink-on-load, so a JPEG thumbnail never decodes the full image.
"""
from __future__ import annotations

import numpy as np

from streamcnn.io.reader import ImageReader

__all__ = ["VipsReader"]

_NUMPY_DTYPE = {"uchar": np.uint8, "char": np.int8, "ushort": np.uint16, "short": np.int16,
                "uint": np.uint32, "int": np.int32, "float": np.float32, "double": np.float64}


class VipsReader(ImageReader):
    """Lazy(ish) reader for any single-resolution format libvips loads (see the module docstring)."""

    backend = "vips"

    def _open(self):
        import pyvips

        try:
            return pyvips.Image.new_from_file(str(self.path), access="random", fail_on="error")
        except pyvips.Error as error:
            raise ValueError(f"{self.path}: not an image file libvips can read: {str(error).strip()}") from error

    def _describe(self, handle):
        if handle.format not in _NUMPY_DTYPE:
            raise ValueError(f"{self.path}: unsupported pixel format {handle.format!r}")
        return [(handle.bands, handle.height, handle.width)], np.dtype(_NUMPY_DTYPE[handle.format])

    def _read(self, handle, level, top, left, height, width) -> np.ndarray:
        region = handle.crop(left, top, width, height).numpy()
        return region[None] if region.ndim == 2 else np.moveaxis(region, -1, 0)

    def _close(self, handle) -> None:
        pass    # pyvips images are reference counted

    def read_thumbnail(self, max_size: int) -> np.ndarray:
        import pyvips

        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        try:
            thumb = pyvips.Image.thumbnail(str(self.path), max_size, size="down").numpy()
        except pyvips.Error as error:
            raise ValueError(f"{self.path}: cannot make a thumbnail: {str(error).strip()}") from error
        return thumb[None] if thumb.ndim == 2 else np.moveaxis(thumb, -1, 0)
