"""Per-image augmentation that a tiled read can apply window by window, exactly.

An :class:`AugmentedView` is a region source over another (a reader, a
:class:`~streamcnn.data.slides.SlideView`, an array): its ``read_region`` maps the window
asked for back to the source window it comes from (flips and 90-degree rotations map
rectangles to rectangles), reads that, and transforms it. Every colour operation is a
function of the pixel alone: brightness and contrast about a fixed pivot (half the value
range, not the image's mean, which no tile knows) and HED stain jitter (Ruifrok-Johnston
colour deconvolution, each stain's optical density scaled and shifted). So the streamed
model sees, tile by tile, exactly the augmented image a whole-image model would see; the
engine needs no change. Pixels keep their dtype (uint8 in, uint8 out; normalising comes last).

:class:`AugmentedDataset` draws each image's operations from ``(seed, index, epoch)``:
the same for every tile of an image in a step, new every epoch, identical after a resume.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from streamcnn.io.reader import shrink_to

__all__ = ["AUGMENTS", "SLIDE_AUGMENT", "Augmentation", "AugmentedView", "AugmentedDataset", "check_augment"]

AUGMENTS = ("flip", "rot90", "brightness", "contrast", "hed")
SLIDE_AUGMENT = ["flip", "rot90"]       # the field's default for slides
BRIGHTNESS, CONTRAST, HED_SCALE, HED_SHIFT = 0.1, 0.1, 0.05, 0.05
# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB) in optical density
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def check_augment(names: Sequence[str], channels: int | None = None) -> list[str]:
    """``names`` checked (known, and ``hed`` only for 3 channels); one line naming the fix if not."""
    unknown = [n for n in names if n not in AUGMENTS]
    if unknown:
        raise ValueError(f"data.augment: unknown augmentation(s) {unknown}; choose from {', '.join(AUGMENTS)}")
    if "hed" in names and channels is not None and channels != 3:
        raise ValueError(f"data.augment: hed stain jitter needs RGB images, these have {channels} channel(s): "
                         "drop hed from data.augment")
    return list(names)


@dataclass(frozen=True)
class Augmentation:
    """One image's draw: flips, then ``rot90`` quarter turns (counter-clockwise), then colour."""

    hflip: bool = False
    vflip: bool = False
    rot90: int = 0
    brightness: float = 0.0             # added, as a fraction of the value range
    contrast: float = 1.0               # factor about the pivot
    hed_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hed_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def draw(cls, names: Sequence[str], seed: Sequence[int]) -> "Augmentation":
        rng = np.random.default_rng(list(seed))
        u = rng.random(11)          # always 11 draws: one op's values do not depend on the others being on
        return cls(hflip="flip" in names and u[0] < 0.5, vflip="flip" in names and u[1] < 0.5,
                   rot90=int(u[2] * 4) if "rot90" in names else 0,
                   brightness=(2 * u[3] - 1) * BRIGHTNESS if "brightness" in names else 0.0,
                   contrast=1 + (2 * u[4] - 1) * CONTRAST if "contrast" in names else 1.0,
                   hed_scale=tuple(1 + (2 * u[5:8] - 1) * HED_SCALE) if "hed" in names else (1.0, 1.0, 1.0),
                   hed_shift=tuple((2 * u[8:11] - 1) * HED_SHIFT) if "hed" in names else (0.0, 0.0, 0.0))

    @property
    def colour(self) -> bool:
        return (self.brightness, self.contrast, self.hed_scale, self.hed_shift) != (0.0, 1.0, (1.0,) * 3, (0.0,) * 3)

    def geometry(self, block: np.ndarray) -> np.ndarray:
        """A (C, h, w) block flipped and rotated as the whole image is."""
        if self.hflip:
            block = block[:, :, ::-1]
        if self.vflip:
            block = block[:, ::-1, :]
        return np.rot90(block, self.rot90, axes=(1, 2)) if self.rot90 else block

    def colours(self, block: np.ndarray) -> np.ndarray:
        """The colour operations, pixel by pixel (float64), back in the block's dtype."""
        if not self.colour:
            return block
        top = float(np.iinfo(block.dtype).max) if block.dtype.kind in "ui" else 1.0
        x = block.astype(np.float64)
        if self.hed_scale != (1.0,) * 3 or self.hed_shift != (0.0,) * 3:
            od = -np.log((x + top / 255) / (top + top / 255))     # optical density, never log(0)
            hed = np.einsum("chw,cs->shw", od, _HED_FROM_RGB)
            hed = hed * np.array(self.hed_scale)[:, None, None] + np.array(self.hed_shift)[:, None, None]
            x = (top + top / 255) * np.exp(-np.einsum("shw,sc->chw", hed, _RGB_FROM_HED)) - top / 255
        pivot = top / 2
        x = (x - pivot) * self.contrast + pivot + self.brightness * top
        x = np.clip(x, 0.0, top)
        return (np.rint(x) if block.dtype.kind in "ui" else x).astype(block.dtype)


class AugmentedView:
    """``source`` as augmented by ``augmentation``, read a window at a time (a region source)."""

    def __init__(self, source: Any, augmentation: Augmentation):
        self.source, self.augmentation = source, augmentation
        c, h, w = (int(n) for n in source.shape)
        self.source_shape = (c, h, w)
        self.shape = (c, w, h) if augmentation.rot90 % 2 else (c, h, w)
        self.dtype = getattr(source, "dtype", None)
        self.path = getattr(source, "path", None)

    def _source_point(self, y: int, x: int) -> tuple[int, int]:
        """The source pixel that lands on output pixel (y, x)."""
        a = self.augmentation
        _, h, w = self.source_shape
        ph, pw = (w, h) if a.rot90 % 2 else (h, w)      # the shape before each undone quarter turn
        for _ in range(a.rot90):         # np.rot90 once: out[i, j] = in[j, W - 1 - i] for an input W wide
            ph, pw = pw, ph
            y, x = x, pw - 1 - y
        if a.vflip:
            y = h - 1 - y
        if a.hflip:
            x = w - 1 - x
        return y, x

    def read_region(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        (y0, x0), (y1, x1) = self._source_point(top, left), self._source_point(top + height - 1, left + width - 1)
        t, l_ = min(y0, y1), min(x0, x1)
        block = np.asarray(self.source.read_region(t, l_, abs(y1 - y0) + 1, abs(x1 - x0) + 1))
        return np.ascontiguousarray(self.augmentation.colours(self.augmentation.geometry(block)))

    def read_thumbnail(self, max_size: int) -> np.ndarray:
        """The source's thumbnail, flipped and rotated, coloured pixel by pixel (for the downsampling
        baseline: the colour of a mean is near, not equal to, the mean of the colours)."""
        if hasattr(self.source, "read_thumbnail"):
            thumbnail = np.asarray(self.source.read_thumbnail(max_size))
        else:
            thumbnail = shrink_to(np.asarray(self.source.read_region(0, 0, *self.source_shape[1:])), max_size)
        return np.ascontiguousarray(self.augmentation.colours(self.augmentation.geometry(thumbnail)))

    def close(self) -> None:
        if hasattr(self.source, "close"):
            self.source.close()

    def __repr__(self) -> str:
        return f"AugmentedView({self.source!r}, {self.augmentation})"


class _ArraySource:
    """A (C, H, W) array as a region source."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype

    def read_region(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        return self.array[:, top:top + height, left:left + width]


class AugmentedDataset(Dataset):
    """``dataset``'s images augmented with ``names``, drawn from (seed, index, :attr:`epoch`).

    Lazy images become :class:`AugmentedView` s; tensors (images held in memory) come back as
    tensors of the augmented image. Set :attr:`epoch` before each epoch (the training loader
    does, :func:`streamcnn.training.datasets.make_loader`).
    """

    def __init__(self, dataset: Dataset, names: Sequence[str], seed: int = 0):
        self.dataset, self.names, self.seed, self.epoch = dataset, check_augment(names), seed, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        view = AugmentedView(_ArraySource(image.numpy()) if isinstance(image, torch.Tensor) else image,
                             Augmentation.draw(self.names, (self.seed, index, self.epoch)))
        if isinstance(image, torch.Tensor):
            return torch.from_numpy(view.read_region(0, 0, *view.shape[1:])), label
        return view, label
