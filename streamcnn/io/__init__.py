"""Lazy image IO: open any image and read windows of it without loading it whole.

:func:`open_image` picks a backend by the file's content and returns an
:class:`ImageReader` (``shape`` (C, H, W), ``dtype``, ``level_count``, ``level_shapes``,
``read_region(top, left, height, width, level=0)``, ``read_level``, ``read_thumbnail``).

- ``tiff`` (:class:`TiffReader`): tifffile + zarr; TIFF, BigTIFF, OME-TIFF, pyramids.
- ``slide`` (:class:`SlideReader`): OpenSlide / tiffslide, for vendor slide formats.
- ``vips`` (:class:`VipsReader`): libvips, for everything else (PNG, JPEG, ...).
"""
from streamcnn.io.open import BACKENDS, open_image
from streamcnn.io.reader import ImageReader
from streamcnn.io.slide import SlideReader
from streamcnn.io.tiff import TiffReader
from streamcnn.io.vips import VipsReader

__all__ = ["open_image", "ImageReader", "TiffReader", "VipsReader", "SlideReader", "BACKENDS"]
