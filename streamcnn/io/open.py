"""Choosing a reader backend for a file, by content rather than by extension.

Order: vendor slide formats OpenSlide recognises go to OpenSlide (it assembles their
vendor-specific layouts); other TIFF files (by magic number) go to tifffile; anything
else goes to libvips, which sniffs the format itself.
"""
from __future__ import annotations

import os
from pathlib import Path

from streamcnn.io.reader import ImageReader
from streamcnn.io.slide import SlideReader, slide_vendor
from streamcnn.io.tiff import TiffReader
from streamcnn.io.vips import VipsReader

__all__ = ["open_image", "BACKENDS"]

BACKENDS: dict[str, type[ImageReader]] = {"tiff": TiffReader, "vips": VipsReader, "slide": SlideReader}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def open_image(path: str | os.PathLike, backend: str | None = None) -> ImageReader:
    """Open ``path`` lazily; ``backend`` ("tiff", "vips", "slide") overrides the choice.

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for a
    file no backend can read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)}")
        return BACKENDS[backend](path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic:
        raise ValueError(f"{path}: file is empty")
    vendor = slide_vendor(path)
    if vendor is not None and vendor != "generic-tiff":
        return SlideReader(path)
    if magic in _TIFF_MAGIC:
        return TiffReader(path)
    return VipsReader(path)
