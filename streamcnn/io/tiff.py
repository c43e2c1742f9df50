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

from streamcnn.io.reader import ImageReader

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
            raise ValueError(f"truncated or corrupt: broken TIFF structure: {'; '.join(problems.messages)}")
        self.levels: dict[int, zarr.Array] = {}

    def level(self, k: int) -> zarr.Array:
        if k not in self.levels:
            self.levels[k] = zarr.open(self.tif.aszarr(series=0, level=k), mode="r")
        return self.levels[k]

    def close(self) -> None:
        self.tif.close()


_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_TRUNCATED_WITHIN = 1000
_SUBIFDS, _DATA_TAGS = 330, ((324, 325), (273, 279))     # SubIFDs; (Tile|Strip)Offsets + ByteCounts


def tiff_bytes_needed(path) -> int:
    """The file size a TIFF's structure needs: the end of its furthest directory, tag value or
    tile/strip (main IFD chain and SubIFDs), read from the raw header without tifffile.

    A first directory past the end of the file is truncation when it lies within 1000 times the
    file's size (libvips writes a level's tiles before its directory, so a cut JPEG pyramid loses
    its first directory); further out it is corruption, and the file's size is returned.
    """
    with open(path, "rb") as f:
        data = f.read()
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] == (b"\x00+" if order == ">" else b"+\x00")
    count_fmt, entry, off_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
    need = 16 if big else 8
    pending = [int(np.frombuffer(data[8:16] if big else data[4:8], order + off_fmt)[0])]
    if pending[0] >= len(data):
        return pending[0] + (8 if big else 2) if pending[0] < _TRUNCATED_WITHIN * len(data) else len(data)
    seen: set[int] = set()

    def values(kind: int, count: int, field: int) -> np.ndarray | None:
        nonlocal need
        size = _TYPE_SIZES.get(kind, 1) * count
        at = field if size <= (8 if big else 4) else int(np.frombuffer(data[field:field + (8 if big else 4)],
                                                                          order + off_fmt)[0])
        need = max(need, at + size)
        code = {3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q"}.get(kind)
        return np.frombuffer(data[at:at + size], order + code).astype(np.int64) \
            if code and at + size <= len(data) else None

    while pending:
        ifd = pending.pop()
        if ifd == 0 or ifd in seen:
            continue
        seen.add(ifd)
        width = 8 if big else 2
        need = max(need, ifd + width)
        if ifd + width > len(data):
            continue
        n = int(np.frombuffer(data[ifd:ifd + width], order + count_fmt)[0])
        end = ifd + width + n * entry
        need = max(need, end + (8 if big else 4))
        if end + (8 if big else 4) > len(data):
            continue
        tags = {}
        for k in range(n):
            at = ifd + width + k * entry
            tag, kind = np.frombuffer(data[at:at + 4], order + "H")
            count = int(np.frombuffer(data[at + 4:at + (12 if big else 8)], order + ("Q" if big else "I"))[0])
            tags[int(tag)] = values(int(kind), count, at + (12 if big else 8))
        for offsets, counts in _DATA_TAGS:
            if tags.get(offsets) is not None and tags.get(counts) is not None and len(tags[offsets]):
                need = max(need, int((tags[offsets] + tags[counts]).max()))
        if tags.get(_SUBIFDS) is not None:
            pending += [int(o) for o in tags[_SUBIFDS]]
        pending.append(int(np.frombuffer(data[end:end + (8 if big else 4)], order + off_fmt)[0]))
    return need


class TiffReader(ImageReader):
    """Lazy TIFF reader (see the module docstring)."""

    backend = "tiff"

    def _open(self) -> _Handle:
        try:
            return _Handle(self.path)
        except (tifffile.TiffFileError, IndexError, ValueError, OSError) as error:
            size = self.path.stat().st_size
            needed = tiff_bytes_needed(self.path)
            if needed > size:
                raise ValueError(f"{self.path}: truncated: expected {needed} bytes but the file has {size}") from error
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
                        f"{self.path}: truncated: expected {int(ends.max())} bytes (the end of level {k}'s "
                        f"tiles) but the file has {size}"
                    )
            dims = dict(zip(axes, level.shape))
            shapes.append((dims.get(self._channel_axis, 1), dims["Y"], dims["X"]))
        return shapes, np.dtype(series.dtype)

    def _mpp(self, handle: _Handle) -> float | None:
        from streamcnn.io.resolution import tiff_mpp

        return tiff_mpp(handle.tif)

    def _read(self, handle: _Handle, level, top, left, height, width) -> np.ndarray:
        index = tuple(slice(top, top + height) if a == "Y" else slice(left, left + width) if a == "X"
                      else slice(None) if a == self._channel_axis else 0 for a in self._axes)
        _, h, w = self.level_shapes[level]
        if (top, left, height, width) == (0, 0, h, w):     # whole level: no zarr per-chunk overhead (4x on 128 px)
            region = handle.series.levels[level].asarray()[index]
        else:
            region = np.asarray(handle.level(level)[index])
        kept = [a for a in self._axes if a in ("Y", "X", self._channel_axis)]
        if self._channel_axis is None:
            return region[None]
        return np.moveaxis(region, kept.index(self._channel_axis), 0)
