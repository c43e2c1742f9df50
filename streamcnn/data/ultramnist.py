"""UltraMNIST generator: faithful samples written as tiled pyramidal BigTIFFs, and its statistics.

A sample (Gupta et al., arXiv 2206.12681; ``docs/data.md`` lists the rules) is a binary
canvas holding 3 to 5 real MNIST digits whose SUM (0..27) is the label. Generation has
two stages, kept apart so that statistics and resumed runs never need pixels:

- :func:`sample_layout` draws everything random about image ``i`` (class, digits, digit
  instances, V-shaped scales, non-overlapping boxes, background parameters) from a
  generator seeded by ``(seed, split, i)`` only, so any image can be redrawn alone.
- :func:`render_layout` turns a layout into the uint8 {0, 255} canvas, deterministically.

Scaled canvases: every length of the 4000 px reference (digit sides, circle radii,
checker cells) is multiplied by ``size / 4000``, and digit sides are floored at
:data:`MIN_DIGIT_PX` (14 px, the reference's smallest digit) so that digits stay
legible on small canvases. Below 4000 the floor merges the smallest scales: at 512 px
the scales f = 1..3 all give 14 px digits.

Background, computed exactly but cheaply: the reference warps a nearest-upsampled
n x n checkerboard with a bicubic affine, zooms 2x on the centre and thresholds (Otsu).
Its cells are hundreds of pixels wide, so bicubic interpolation then a threshold at the
middle just reproduces the warped cell edges; we therefore map each pixel centre through
the composed inverse transform (zoom, affine, upsample) and read its grid cell, a few
rows at a time. Circles and triangles are filled row span by row span.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..files import TEMPORARY_GLOB, atomic_write, atomic_write_text, save_figure
from .digits import SPLITS, DigitBank, load_digit_bank
from .tissue import otsu_threshold as _otsu_threshold

__all__ = [
    "generate_ultramnist",
    "sample_layout",
    "render_layout",
    "write_pyramid_tiff",
    "layout_statistics",
    "Layout",
    "class_multisets",
    "MANIFEST_COLUMNS",
    "REFERENCE_SIZE",
    "MIN_DIGIT_PX",
]

REFERENCE_SIZE = 4000
NUM_CLASSES = 28
MIN_DIGIT_PX = 14
MANIFEST_COLUMNS = ("id", "path", "label", "digits", "boxes")
TILE_SIZE = 256
#: Scale factors 1..75 and their V-shaped weights 38..1 (f = 1..38), 1..37 (f = 39..75).
SCALE_FACTORS = np.arange(1, 76)
SCALE_WEIGHTS = np.concatenate([np.arange(38, 0, -1), np.arange(1, 38)]).astype(np.float64)
MAX_PLACEMENT_TRIES = 10_000
_SPLIT_CODE = {"train": 0, "test": 1}
_PARAMS_FILE = "generation.json"


@lru_cache(maxsize=None)
def class_multisets(label: int) -> tuple[tuple[int, ...], ...]:
    """Every sorted multiset of 3, 4 or 5 digits (0..9) summing to ``label``."""
    return tuple(combo for k in (3, 4, 5)
                 for combo in itertools.combinations_with_replacement(range(10), k) if sum(combo) == label)


@dataclass
class Layout:
    """Everything random about one image; :func:`render_layout` makes its pixels.

    ``boxes`` are ``[x, y, w, h]`` of each digit square in level-0 pixels, in the order of
    ``digits`` (ascending values: the placement order). ``instances`` index the split's
    digit bank within each value.
    """

    size: int
    label: int
    digits: list[int]
    instances: list[int]
    boxes: list[list[int]]
    grid: np.ndarray = field(repr=False)            # (n, n) bool checkerboard cells
    affine: tuple[float, float, float]              # rotation deg, scale, x-shear deg
    circles: list[tuple[float, float, float]]       # centre x, centre y, radius
    triangles: list[tuple[float, ...]]              # x0, y0, x1, y1, x2, y2


def _label_for(seed: int, split: str, index: int) -> int:
    # Each block of 28 consecutive images holds every class once, in a shuffled order:
    # exact class balance for counts that are multiples of 28, still a function of (seed, split, i).
    block_rng = np.random.default_rng([seed, _SPLIT_CODE[split], 1, index // NUM_CLASSES])
    return int(block_rng.permutation(NUM_CLASSES)[index % NUM_CLASSES])


def digit_side(factor: int, half: bool, size: int) -> int:
    """Side in pixels of a digit of scale ``factor`` on a ``size`` canvas (see module docstring)."""
    reference = 14 if factor == 1 and half else 28 * factor
    return max(MIN_DIGIT_PX, round(reference * size / REFERENCE_SIZE))


def sample_layout(index: int, *, size: int = REFERENCE_SIZE, seed: int = 0, split: str = "train",
                  bank_sizes: Sequence[int]) -> Layout:
    """Draw image ``index`` of (seed, split); ``bank_sizes[v]`` = instances of digit v in the split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if size < 4 * MIN_DIGIT_PX:
        raise ValueError(f"canvas size {size} is too small: UltraMNIST needs at least {4 * MIN_DIGIT_PX} px")
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], 0, index])
    label = _label_for(seed, split, index)
    options = class_multisets(label)
    digits = list(options[rng.integers(len(options))])
    instances = [int(rng.integers(bank_sizes[d])) for d in digits]
    probabilities = SCALE_WEIGHTS / SCALE_WEIGHTS.sum()
    boxes: list[list[int]] = []
    for _ in digits:
        for _attempt in range(MAX_PLACEMENT_TRIES):
            # On overlap, redraw both the scale and the position (as the reference does).
            factor = int(rng.choice(SCALE_FACTORS, p=probabilities))
            half = bool(rng.integers(2)) if factor == 1 else False
            side = digit_side(factor, half, size)
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if not any(x < bx + bw and bx < x + side and y < by + bh and by < y + side for bx, by, bw, bh in boxes):
                boxes.append([x, y, side, side])
                break
        else:
            raise RuntimeError(f"could not place {len(digits)} digits without overlap on a {size} px canvas")
    scale = size / REFERENCE_SIZE
    n = int(rng.integers(12, 24))
    grid = rng.integers(0, 2, size=(n, n)).astype(bool)
    affine = (float(rng.uniform(-45, 45)), float(rng.uniform(0.8, 1.2)), float(rng.uniform(-50, 50)))
    circles = [(float(rng.uniform(0, size)), float(rng.uniform(0, size)), float(rng.integers(50, 1000)) * scale)
               for _ in range(int(rng.integers(0, 5)))]
    triangles = [tuple(float(v) for v in rng.uniform(0, size, size=6)) for _ in range(int(rng.integers(0, 5)))]
    return Layout(size, label, digits, instances, boxes, grid, affine, circles, triangles)


# -- rendering ---------------------------------------------------------------------------
def _checkerboard(layout: Layout, rows_per_block: int = 32) -> np.ndarray:
    """The warped, zoomed checkerboard, thresholded: (S, S) uint8 in {0, 1}."""
    size, grid = layout.size, layout.grid
    n = len(grid)
    rotation, scale, shear = layout.affine
    t, s = math.radians(rotation), math.radians(shear)
    forward = scale * np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]) @ np.array(
        [[1.0, math.tan(s)], [0.0, 1.0]])
    # Output pixel centre p -> crop coordinate c + (p - c) / 2 -> affine source c + A^-1 (.) -> cell * n / S.
    centre = size / 2
    to_cell = np.linalg.inv(forward) * (n / size) / 2
    offsets = np.arange(size) + 0.5 - centre
    # The grid gets a ring of empty cells; coordinates are clipped into it (fill 0 outside the warp).
    table = np.zeros((n + 2, n + 2), dtype=np.uint8)
    table[1:-1, 1:-1] = grid
    table = table.ravel()
    u_x, v_x = (to_cell[0, 0] * offsets).astype(np.float32), (to_cell[1, 0] * offsets).astype(np.float32)
    u_y = (to_cell[0, 1] * offsets + centre * n / size + 1).astype(np.float32)
    v_y = (to_cell[1, 1] * offsets + centre * n / size + 1).astype(np.float32)
    out = np.empty((size, size), dtype=np.uint8)
    for r0 in range(0, size, rows_per_block):    # small blocks stay in cache: ~5x faster than whole arrays
        r1 = min(size, r0 + rows_per_block)
        u = np.add.outer(u_y[r0:r1], u_x)
        np.floor(u, out=u)
        np.clip(u, 0, n + 1, out=u)
        v = np.add.outer(v_y[r0:r1], v_x)
        np.floor(v, out=v)
        np.clip(v, 0, n + 1, out=v)
        v *= n + 2
        v += u
        np.take(table, v.astype(np.intp), out=out[r0:r1])
    return out


def _fill_spans(canvas: np.ndarray, rows: np.ndarray, left: np.ndarray, right: np.ndarray) -> None:
    """Set pixels whose centres x + 0.5 lie in [left, right] on each row."""
    first = np.clip(np.ceil(left - 0.5), 0, canvas.shape[1]).astype(int)
    last = np.clip(np.floor(right - 0.5) + 1, 0, canvas.shape[1]).astype(int)
    for y, a, b in zip(rows.tolist(), first.tolist(), last.tolist()):
        if a < b:
            canvas[y, a:b] = 1


def _shapes(layout: Layout) -> np.ndarray:
    """Filled circles and triangles on black: (S, S) uint8 in {0, 1}."""
    size = layout.size
    canvas = np.zeros((size, size), dtype=np.uint8)
    centres = np.arange(size) + 0.5
    for cx, cy, r in layout.circles:
        rows = np.arange(max(0, math.floor(cy - r)), min(size, math.ceil(cy + r)))
        half = np.sqrt(np.maximum(r * r - (centres[rows] - cy) ** 2, 0))
        inside = np.abs(centres[rows] - cy) <= r
        _fill_spans(canvas, rows[inside], cx - half[inside], cx + half[inside])
    for tri in layout.triangles:
        xs, ys = np.array(tri[0::2]), np.array(tri[1::2])
        rows = np.arange(max(0, math.floor(ys.min())), min(size, math.ceil(ys.max())))
        yc = centres[rows]
        crossings = []
        for i, j in ((0, 1), (1, 2), (2, 0)):
            if ys[i] == ys[j]:
                continue
            t = (yc - ys[i]) / (ys[j] - ys[i])
            crossings.append(np.where((t >= 0) & (t <= 1), xs[i] + t * (xs[j] - xs[i]), np.nan))
        if not crossings:
            continue
        crossings = np.array(crossings)
        hit = ~np.all(np.isnan(crossings), axis=0)
        _fill_spans(canvas, rows[hit], np.nanmin(crossings[:, hit], axis=0), np.nanmax(crossings[:, hit], axis=0))
    return canvas


def _nearest_resize(digit: np.ndarray, side: int) -> np.ndarray:
    index = np.arange(side) * digit.shape[0] // side     # integer factors: exact block replication
    return digit[np.ix_(index, index)]


def render_layout(layout: Layout, bank: DigitBank) -> np.ndarray:
    """The (S, S) uint8 {0, 255} image of ``layout``, with digits from ``bank``."""
    size = layout.size
    image = _checkerboard(layout)
    image ^= _shapes(layout)
    digits = [_nearest_resize(bank.by_value[d][k], box[2])
              for d, k, box in zip(layout.digits, layout.instances, layout.boxes)]
    # Otsu over the whole digit canvas, from its histogram: boxes never overlap, so
    # "add and clip" changes nothing and the rest of the canvas is zeros.
    histogram = sum(np.bincount(d.ravel(), minlength=256) for d in digits)
    histogram[0] += size * size - sum(d.size for d in digits)
    threshold = _otsu_threshold(histogram)
    for (x, y, w, h), digit in zip(layout.boxes, digits):
        image[y:y + h, x:x + w] ^= (digit > threshold).view(np.uint8)
    image *= 255
    return image


def write_pyramid_tiff(image: np.ndarray, path: str | Path, *, tile: int = TILE_SIZE,
                       compression: str = "deflate") -> None:
    """Write a (H, W) or (H, W, C) uint8 array as a tiled, pyramidal BigTIFF, atomically.

    Levels are separate pages (not SubIFDs) so that OpenSlide sees all of them; each level
    halves the previous one (mean of 2 x 2) down to one tile.
    """
    import pyvips

    path = Path(path)
    array = np.ascontiguousarray(image if image.ndim == 3 else image[:, :, None])
    h, w, bands = array.shape
    vips_image = pyvips.Image.new_from_memory(array.data, w, h, bands, "uchar")
    atomic_write(path, lambda tmp: vips_image.tiffsave(str(tmp), tile=True, tile_width=tile, tile_height=tile,
                                                        pyramid=True, subifd=False, bigtiff=True,
                                                        compression=compression))


# -- the data set --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    size: int
    seed: int
    split: str
    mnist_dir: str | None
    image_dir: Path


_worker_bank: dict[tuple[str, str | None], DigitBank] = {}


def _bank(split: str, mnist_dir: str | None) -> DigitBank:
    key = (split, mnist_dir)
    if key not in _worker_bank:
        _worker_bank[key] = load_digit_bank(split, mnist_dir)
    return _worker_bank[key]


def _image_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def _make_image(job: _Job, index: int) -> dict:
    """Write image ``index`` unless it exists already; return its manifest row."""
    bank = _bank(job.split, job.mnist_dir)
    layout = sample_layout(index, size=job.size, seed=job.seed, split=job.split,
                           bank_sizes=[len(v) for v in bank.by_value])
    name = _image_name(job.split, index)
    path = job.image_dir / f"{name}.tiff"
    if not path.exists():      # files only ever appear complete (written, then renamed)
        write_pyramid_tiff(render_layout(layout, bank), path)
    return {"id": name, "path": f"{job.image_dir.name}/{path.name}", "label": layout.label,
            "digits": json.dumps(layout.digits), "boxes": json.dumps(layout.boxes)}


def _check_params(out_dir: Path, params: dict) -> None:
    """Refuse to mix images of other parameters in one folder; record ours."""
    params_path = out_dir / _PARAMS_FILE
    if params_path.exists():
        existing = json.loads(params_path.read_text())
        if existing != params:
            changed = {k: (existing.get(k), v) for k, v in params.items() if existing.get(k) != v}
            raise ValueError(
                f"{out_dir} already holds UltraMNIST images made with other parameters {changed} "
                f"(see {params_path}); use another --out folder or delete that one"
            )
    else:
        atomic_write_text(params_path, json.dumps(params, indent=2) + "\n")


def generate_ultramnist(out_dir: str | Path, count: int, size: int = REFERENCE_SIZE, seed: int = 0,
                        split: str = "train", workers: int = 1, mnist_dir: str | Path | None = None,
                        preview: str | Path | None = None, progress: bool = True) -> Path:
    """Generate ``count`` UltraMNIST images into ``out_dir``; return the manifest path.

    Writes ``out_dir/images/<split>_<i>.tiff`` (tiled 256 px, deflate, pyramidal BigTIFF,
    levels as pages) and ``out_dir/manifest.csv`` with columns ``id,path,label,digits,boxes``.
    Image ``i`` depends only on ``(seed, split, i)``, so runs with different ``count`` or
    ``workers`` agree on their common images. An interrupted run resumes: complete images
    are kept, missing ones are made, the manifest is rewritten atomically. ``preview``
    writes a PNG contact sheet of the first images with their boxes and labels.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    mnist = None if mnist_dir is None else str(Path(mnist_dir).resolve())
    bank = load_digit_bank(split, mnist)        # fail early on a bad --mnist folder
    _check_params(out_dir, {"size": size, "seed": seed, "split": split, "digits": bank.source})
    for stale in image_dir.glob(TEMPORARY_GLOB):     # left by an interrupted run
        stale.unlink(missing_ok=True)

    job = _Job(size, seed, split, mnist, image_dir)
    rows = _run_jobs(job, range(count), workers, progress)
    manifest = out_dir / "manifest.csv"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(manifest, buffer.getvalue())
    if preview is not None:
        write_preview(out_dir, rows[:16], preview)
    return manifest


def _run_jobs(job: _Job, indices: Iterable[int], workers: int, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    indices = list(indices)
    bar = tqdm(total=len(indices), desc=f"UltraMNIST {job.split} {job.size}px", unit="img", disable=not progress)
    rows: list[dict] = []
    with bar:
        if workers == 1:
            for i in indices:
                rows.append(_make_image(job, i))
                bar.update()
        else:
            # spawn: libvips' thread pool does not survive fork.
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                for row in pool.map(_make_image, itertools.repeat(job), indices, chunksize=4):
                    rows.append(row)
                    bar.update()
    return rows


def write_preview(root: Path, rows: Sequence[dict], path: str | Path, thumb: int = 512) -> Path:
    """A PNG contact sheet of ``rows``' images (from their pyramids) with digit boxes and labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from ..io import open_image

    cols = min(4, len(rows))
    grid_rows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(3.2 * cols, 3.4 * grid_rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, row in zip(axes.ravel(), rows):
        with open_image(Path(root) / row["path"]) as reader:
            image = reader.read_thumbnail(thumb)[0]
            factor = image.shape[0] / reader.shape[1]
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        for (x, y, w, h), d in zip(json.loads(row["boxes"]), json.loads(row["digits"])):
            ax.add_patch(Rectangle((x * factor - 0.5, y * factor - 0.5), w * factor, h * factor,
                                   fill=False, edgecolor="tab:red", linewidth=1))
            ax.text(x * factor, y * factor - 2, str(d), color="tab:red", fontsize=7, va="bottom")
        ax.set_title(f"{row['id']}  label {row['label']} = {' + '.join(map(str, json.loads(row['digits'])))}", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


# -- statistics ------------------------------------------------------------------------------
def layout_statistics(count: int, size: int = REFERENCE_SIZE, seed: int = 0, split: str = "train",
                      progress: bool = False) -> dict:
    """Statistics of ``count`` layouts (no pixels): the figures the spec quotes for the reference."""
    from tqdm.auto import tqdm

    bank_sizes = [len(v) for v in load_digit_bank(split).by_value]
    sides, smallest, counts, values, labels = [], [], [], [], []
    for i in tqdm(range(count), desc="layouts", disable=not progress):
        layout = sample_layout(i, size=size, seed=seed, split=split, bank_sizes=bank_sizes)
        image_sides = [b[2] for b in layout.boxes]
        sides += image_sides
        smallest.append(min(image_sides))
        counts.append(len(layout.digits))
        values += layout.digits
        labels.append(layout.label)
    sides_arr, smallest_arr, counts_arr = np.array(sides), np.array(smallest), np.array(counts)
    return {
        "images": count,
        "size": size,
        "digit_side_quantiles": {f"{q}%": float(np.percentile(sides_arr, q)) for q in (10, 25, 50, 75, 90)},
        "digit_side_mean": float(sides_arr.mean()),
        "share_with_digit_at_most": {f"{t}px": float((smallest_arr <= t * size / REFERENCE_SIZE).mean())
                                     for t in (14, 28, 56, 112)},
        "digit_count_share": {str(k): float((counts_arr == k).mean()) for k in (3, 4, 5)},
        "digit_count_mean": float(counts_arr.mean()),
        "digit_value_counts": np.bincount(values, minlength=10).tolist(),
        "label_counts": np.bincount(labels, minlength=NUM_CLASSES).tolist(),
    }

