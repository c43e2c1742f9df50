"""TIFF backend: tifffile + zarr, decoding only the tiles (or strips) a region touches.

Handles tiled and striped TIFF and BigTIFF, pyramids stored as pages or as SubIFDs,
OME-TIFF and the TIFF-based slide formats tifffile knows (SVS, NDPI, ...), with any
compression imagecodecs decodes (JPEG, deflate, LZW, zstd, ...). A pyramid level is a
zarr array over the file (``TiffFile.aszarr``), so slicing it reads just the chunks
under the slice.
"""
from __future__ import annotations

import logging

import numpy as np
import tifffile
import zarr

from .reader import ImageReader

__all__ = ["TiffReader"]


class _ErrorLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class _Handle:
    """An open TiffFile and one lazily created zarr array per pyramid level."""

    def __init__(self, path):
        # tifffile logs (rather than raises) broken directory chains, e.g. in truncated files.
        problems = _ErrorLog()
        logger = logging.getLogger("tifffile")
        logger.addHandler(problems)
        try:
            self.tif = tifffile.TiffFile(path)
            len(self.tif.pages)          # walk every directory now, not at the first read
            self.series = self.tif.series[0]
        finally:
            logger.removeHandler(problems)
        if problems.messages:
            self.tif.close()
            raise ValueError(f"broken TIFF structure (truncated file?): {'; '.join(problems.messages)}")
        self.levels: dict[int, zarr.Array] = {}

    def level(self, k: int) -> zarr.Array:
        if k not in self.levels:
            self.levels[k] = zarr.open(self.tif.aszarr(series=0, level=k), mode="r")
        return self.levels[k]

    def close(self) -> None:
        self.tif.close()


class TiffReader(ImageReader):
    """Lazy TIFF reader (see the module docstring)."""

    backend = "tiff"

    def _open(self) -> _Handle:
        try:
            return _Handle(self.path)
        except (tifffile.TiffFileError, IndexError, ValueError, OSError) as error:
            raise ValueError(f"{self.path}: not a readable TIFF file: {error}") from error

    def _describe(self, handle: _Handle):
        series = handle.series
        axes = series.axes
        self._channel_axis = next((a for a in "SC" if a in axes), None)
        extra = {a: n for a, n in zip(axes, series.shape) if a not in "YX" + (self._channel_axis or "") and n > 1}
        if "Y" not in axes or "X" not in axes or extra:
            raise ValueError(
                f"{self.path}: TIFF series has axes {axes!r} and shape {series.shape}; only 2-D images "
                f"(Y, X and optionally one channel axis) are supported, not {extra or 'this layout'}"
            )
        self._axes = axes
        size = self.path.stat().st_size
        shapes = []
        for k, level in enumerate(series.levels):
            for page in level.pages:
                if page is None:
                    continue
                ends = np.asarray(page.dataoffsets, dtype=np.int64) + np.asarray(page.databytecounts, dtype=np.int64)
                if ends.size and ends.max() > size:
                    raise ValueError(
                        f"{self.path}: file is truncated: level {k} needs {int(ends.max())} bytes but the file has {size}"
                    )
            dims = dict(zip(axes, level.shape))
            shapes.append((dims.get(self._channel_axis, 1), dims["Y"], dims["X"]))
        return shapes, np.dtype(series.dtype)

    def _read(self, handle: _Handle, level, top, left, height, width) -> np.ndarray:
        index = tuple(slice(top, top + height) if a == "Y" else slice(left, left + width) if a == "X"
                      else slice(None) if a == self._channel_axis else 0 for a in self._axes)
        region = np.asarray(handle.level(level)[index])
        kept = [a for a in self._axes if a in ("Y", "X", self._channel_axis)]
        if self._channel_axis is None:
            return region[None]
        return np.moveaxis(region, kept.index(self._channel_axis), 0)
