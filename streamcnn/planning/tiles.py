"""What the planner needs of a tile plan, without listing every tile.

A streamed plan's windows are separable: a tile's window is its row's input interval times
its column's (:meth:`~streamcnn.engine.geometry.TrunkGeometry.input_window` works per axis).
:func:`summarize` therefore prices a tile size from the rows and the columns alone (tile
count, overlap factor, largest window) in O(rows + cols) instead of O(rows x cols): at
100,000 px and 512 px tiles that is 400 window walks instead of 40,000. :func:`reduced_plan`
is the plan the memory simulation runs: the largest window, repeated (every tile after the
first is alike for memory). Both agree with :func:`~streamcnn.engine.geometry.tile_plan`
(checked in the tests). :func:`candidate_tile_sizes` is the ladder of tile sizes a plan tries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from streamcnn.engine.geometry import Tile, TilePlan, TrunkGeometry
from streamcnn.utils.units import pair

__all__ = ["TileSummary", "summarize", "reduced_plan", "candidate_tile_sizes"]


def candidate_tile_sizes(image_size: int | Sequence[int], stride: int) -> list[int]:
    """Tile sides to try: powers of two and 1.5x steps, multiples of ``stride``, from 256 px
    (a quarter of the image for small images; 1/64 of it for huge ones, so that a plan has
    at most about 64 x 64 tiles) up to below the image's longer side."""
    side = max(pair(image_size))
    low = max(min(256, max(stride, side // 4 // stride * stride)), side // 64)
    sizes, base = [], 64
    while base < side:
        for s in (base, base * 3 // 2):
            if low <= s < side and s % stride == 0:
                sizes.append(s)
        base *= 2
    return sizes


@dataclass(frozen=True)
class TileSummary:
    """A tile size's plan on one image, as the planner prices it."""

    tile_size: int
    grid: tuple[int, int]
    overlap_factor: float
    max_window: tuple[int, int]
    output_size: tuple[int, int]
    largest: Tile                 # a tile with the largest window

    @property
    def n_tiles(self) -> int:
        return self.grid[0] * self.grid[1]


def _balanced(n: int, parts: int) -> list[tuple[int, int]]:
    """``range(n)`` in ``parts`` contiguous intervals differing by at most one (as ``tile_plan``)."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def summarize(geometry: TrunkGeometry, image: Sequence[int], tile_size: int,
              sizes: list | None = None) -> TileSummary:
    """The plan :func:`~streamcnn.engine.geometry.tile_plan` makes for ``tile_size``, summarised.
    ``sizes``: ``geometry.node_sizes(image)`` when the caller has it (it depends on the image only)."""
    image = (int(image[0]), int(image[1]))
    sizes = sizes or geometry.node_sizes(image)
    out = geometry.output_size(image)
    stride = geometry.output_stride
    region = tuple(max(1, tile_size // stride[ax]) for ax in range(2))
    grid = tuple(-(-out[ax] // region[ax]) for ax in range(2))
    rows, cols = _balanced(out[0], grid[0]), _balanced(out[1], grid[1])
    row_windows = [geometry.input_window((r, cols[0]), image, sizes)[0] for r in rows]
    col_windows = [geometry.input_window((rows[0], c), image, sizes)[1] for c in cols]
    heights = [b - t for t, b in row_windows]
    widths = [r - left for left, r in col_windows]
    i, j = heights.index(max(heights)), widths.index(max(widths))
    window = (row_windows[i], col_windows[j])
    first = geometry.offset_in_output((window[0][0], window[1][0]))
    crop = ((rows[i][0] - first[0], rows[i][1] - first[0]), (cols[j][0] - first[1], cols[j][1] - first[1]))
    return TileSummary(int(tile_size), grid, sum(heights) * sum(widths) / math.prod(image),
                       (max(heights), max(widths)), tuple(out), Tile((rows[i], cols[j]), window, crop))


def reduced_plan(summary: TileSummary, image: Sequence[int], stride: tuple[int, int], repeats: int) -> TilePlan:
    """A plan of ``summary``'s largest window ``repeats`` times, with the real plan's sizes."""
    region = tuple(max(1, summary.tile_size // stride[ax]) for ax in range(2))
    return TilePlan(tuple(image), summary.output_size, (summary.tile_size, summary.tile_size), region, stride,
                    summary.grid, (summary.largest,) * repeats)
