"""The lazy image reader interface shared by every backend.

An :class:`ImageReader` describes an image (``shape`` (C, H, W) at level 0, ``dtype``,
pyramid ``level_shapes``, ``mpp`` (microns per pixel of each level, from the file's
metadata, see :mod:`streamcnn.io.resolution`)) and reads windows of it, ``read_region`` -> (C, h, w) numpy,
decoding only what the window touches. It satisfies :class:`streamcnn.RegionSource`, so
``StreamingModule(trunk, tile)(reader)`` reads each tile's window on demand.

Readers hold a path, not a file: the backend handle is opened lazily in each process
(and reopened after a fork), and pickling drops it, so readers travel to DataLoader
workers. This module owns the checks every backend shares (region bounds, level
numbers, wrapping decoder failures into errors that name the file).
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from streamcnn.utils.downsample import shrink_to

__all__ = ["ImageReader", "shrink_to"]


class ImageReader(ABC):
    """A lazily read image; see the module docstring. Subclasses implement the backend."""

    #: Backend name, as accepted by :func:`streamcnn.io.open_image`'s ``backend``.
    backend: str = ""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such image file")
        self._handle: Any = None
        self._handle_pid: int | None = None
        try:
            self.level_shapes, self.dtype = self._describe(self._file())
        except (ValueError, FileNotFoundError):
            self.close()
            raise
        except Exception as error:  # decoder libraries raise their own types
            self.close()
            raise ValueError(f"{self.path}: cannot open as an image with the {self.backend} backend: {error}") from error

    # -- backend hooks --------------------------------------------------------------------
    @abstractmethod
    def _open(self) -> Any:
        """Open the backend handle for ``self.path``."""

    @abstractmethod
    def _describe(self, handle: Any) -> tuple[list[tuple[int, int, int]], np.dtype]:
        """(level shapes as (C, H, W), numpy dtype); raise ValueError for unusable files."""

    @abstractmethod
    def _read(self, handle: Any, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        """The in-bounds window as (C, h, w)."""

    def _close(self, handle: Any) -> None:
        handle.close()

    def _mpp(self, handle: Any) -> float | None:
        """Level-0 microns per pixel from the file's metadata (see :mod:`.resolution`), or None."""
        return None

    # -- public interface -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) at full resolution (level 0)."""
        return self.level_shapes[0]

    @property
    def mpp(self) -> list[float | None]:
        """Microns per pixel of each level (None for every level when the file does not say)."""
        from streamcnn.io.resolution import level_mpps

        return level_mpps(self._mpp(self._file()), self.level_shapes)

    @property
    def level_count(self) -> int:
        return len(self.level_shapes)

    def read_region(self, top: int, left: int, height: int, width: int, level: int = 0) -> np.ndarray:
        """Pixels [top, top + height) x [left, left + width) of ``level`` as (C, height, width).

        Coordinates are in the pixels of ``level`` (level 0 = full resolution).
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} does not exist (the image has levels 0..{self.level_count - 1})")
        _, h, w = self.level_shapes[level]
        if height <= 0 or width <= 0 or top < 0 or left < 0 or top + height > h or left + width > w:
            raise ValueError(
                f"{self.path}: region top={top} left={left} height={height} width={width} is outside "
                f"the level-{level} image of {h} x {w} pixels (H x W)"
            )
        try:
            region = self._read(self._file(), level, int(top), int(left), int(height), int(width))
        except Exception as error:
            raise ValueError(
                f"{self.path}: cannot decode region top={top} left={left} height={height} width={width} "
                f"of level {level} (corrupt or truncated file?): {error}"
            ) from error
        return region

    def read_level(self, level: int) -> np.ndarray:
        """The whole of ``level`` as (C, H, W); level 0 is the full image (it may not fit in memory)."""
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} does not exist (the image has levels 0..{self.level_count - 1})")
        _, h, w = self.level_shapes[level]
        return self.read_region(0, 0, h, w, level)

    def read_thumbnail(self, max_size: int) -> np.ndarray:
        """The whole image, downsampled so its longer side is at most ``max_size`` (C, h, w).

        Reads the coarsest pyramid level that is still at least ``max_size`` on its longer
        side (never the full image when the pyramid has a suitable level), then averages
        it down to size (area interpolation), keeping the aspect ratio and the dtype.
        """
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        level = 0
        for k, (_, h, w) in enumerate(self.level_shapes):
            if max(h, w) >= max_size:
                level = k
        return shrink_to(self.read_level(level), max_size)

    # -- file handle lifecycle ----------------------------------------------------------------
    def _file(self) -> Any:
        if self._handle is None or self._handle_pid != os.getpid():
            # After a fork the parent's handle (and its file offset) is not ours to share.
            self._handle, self._handle_pid = self._open(), os.getpid()
        return self._handle

    def close(self) -> None:
        """Release the file handle (it is reopened if the reader is used again)."""
        if self._handle is not None and self._handle_pid == os.getpid():
            self._close(self._handle)
        self._handle = self._handle_pid = None

    def __enter__(self) -> "ImageReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = state["_handle_pid"] = None
        return state

    def __repr__(self) -> str:
        return (f"{type(self).__name__}('{self.path}', shape={self.shape}, dtype={np.dtype(self.dtype).name}, "
                f"levels={self.level_count})")
