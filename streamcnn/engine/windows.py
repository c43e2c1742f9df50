"""Input windows: the crops of an image the engine runs its trunk on, read onto the compute device.

The image is an (N, C, H, W) tensor on any device, or region sources (a reader or a slide
view, :class:`RegionSource`) read one window at a time, so that a gigapixel image never
has to exist whole. :func:`read_windows` turns either into a :class:`Windows`: the batch's
shape and a function that returns the window ``((top, bottom), (left, right))`` on the
compute device, in the compute dtype (uint8 pixels are mapped to [0, 1]) and memory format.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch

from streamcnn.engine.geometry import Tile
from streamcnn.utils.units import pixels_to_unit

__all__ = ["RegionSource", "StreamInput", "Windows", "read_windows"]

Rect = tuple[tuple[int, int], tuple[int, int]]


@runtime_checkable
class RegionSource(Protocol):
    """An image read a window at a time (e.g. :func:`streamcnn.io.open_image`).

    ``shape`` is (C, H, W) at full resolution; ``read_region(top, left, height, width)``
    returns that window as a (C, h, w) numpy array or tensor.
    """

    shape: tuple[int, int, int]

    def read_region(self, top: int, left: int, height: int, width: int) -> Any: ...


StreamInput = Union[torch.Tensor, RegionSource, Sequence[RegionSource]]


@dataclass
class Windows:
    """Reads input windows, from a tensor or from region sources, onto the compute device."""

    shape: tuple[int, int, int, int]            # N, C, H, W
    read: Callable[[Rect], torch.Tensor]
    prefetch: bool = False                      # decode the next window while this one computes

    def each(self, tiles: Sequence[Tile]) -> Iterator[tuple[Tile, torch.Tensor]]:
        """``(tile, window)`` in order; with ``prefetch``, the next read runs in a thread."""
        if not self.prefetch or len(tiles) < 2:
            for tile in tiles:
                yield tile, self.read(tile.window)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamcnn-read") as pool:
            pending = pool.submit(self.read, tiles[0].window)
            for i, tile in enumerate(tiles):
                window = pending.result()
                if i + 1 < len(tiles):
                    pending = pool.submit(self.read, tiles[i + 1].window)
                yield tile, window


def read_windows(x: StreamInput, device: torch.device, dtype: torch.dtype,
                 memory_format: torch.memory_format = torch.contiguous_format) -> Windows:
    """The :class:`Windows` of ``x``: a tensor, a region source or a list of them (one batch)."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"StreamingModule expects an (N, C, H, W) tensor, got shape {tuple(x.shape)}")

        def read(win: Rect) -> torch.Tensor:
            (t, b), (l, r) = win
            return x[:, :, t:b, l:r].to(device, non_blocking=True).contiguous(memory_format=memory_format)

        return Windows(tuple(x.shape), read)  # type: ignore[arg-type]

    sources = [x] if isinstance(x, RegionSource) else list(x)
    if not sources or not all(isinstance(s, RegionSource) for s in sources):
        raise TypeError(
            "StreamingModule input must be an (N, C, H, W) tensor, an object with `shape` and "
            f"`read_region(top, left, height, width)`, or a list of such objects; got {type(x).__name__}"
        )
    shapes = {tuple(s.shape) for s in sources}
    if len(shapes) != 1:
        raise ValueError(f"a batch of region sources must share one shape, got {sorted(shapes)}")
    c, h, w = shapes.pop()

    def read_sources(win: Rect) -> torch.Tensor:
        (t, b), (l, r) = win
        crops = [torch.as_tensor(np.ascontiguousarray(s.read_region(t, l, b - t, r - l))) for s in sources]
        batch = torch.stack(crops)
        if device.type == "cuda":
            batch = batch.pin_memory()
        return pixels_to_unit(batch.to(device, non_blocking=True), dtype).contiguous(memory_format=memory_format)

    return Windows((len(sources), c, h, w), read_sources, prefetch=True)
