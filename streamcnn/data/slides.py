"""What the model reads of each slide: the pyramid level, the tissue crop, and header checks.

:func:`inspect_slides` opens every file's header before training (no pixels, except a
thumbnail when cropping to tissue), so a bad file is named before the first step: a file
that does not open ("not an image", "truncated: expected N bytes ..."), lacks the level
asked for, or whose channels disagree with the rest. It returns one :class:`SlideEntry`
per good file: the level to read (``level``, or the level whose microns per pixel is
closest to ``mpp`` without being coarser, i.e. never upsampling), and the box to read
(the whole level, or the tissue's bounding box).

Asked to (``keep_below``), it also reads every image of at most that many samples while
its file is open and keeps the pixels zstd-compressed (:class:`KeptPixels`), so a data set of
small images that will be held in memory opens each file once; with ``workers`` the files are
checked in that many processes (:mod:`streamcnn.data.parallel`).

A :class:`SlideView` is that level and box of an open reader, itself a region source:
the streaming engine reads it a window at a time, so a 40x slide trains at 10x by
reading the 10x level lazily, never resampling the 40x pixels.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Sequence

import imagecodecs
import numpy as np
import torch

from streamcnn.io import ImageReader, open_image
from streamcnn.io.reader import shrink_to
from streamcnn.data.parallel import process_map
from streamcnn.data.tissue import tissue_box, tissue_mask

__all__ = ["SlideEntry", "SlideView", "KeptPixels", "choose_level", "inspect_slides", "BadFiles", "THUMBNAIL_SIZE"]

THUMBNAIL_SIZE = 1024      # long side of the thumbnails tissue detection looks at
Tissue = Literal["none", "otsu", "mask"]


class KeptPixels(NamedTuple):
    """An image's pixels as read, zstd-compressed (a 128 px UltraMNIST image: 1.4 kB of 16 kB)."""

    blob: bytes
    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, array: np.ndarray) -> "KeptPixels":
        array = np.ascontiguousarray(array)
        return cls(imagecodecs.zstd_encode(array), array.shape, array.dtype)

    def tensor(self) -> torch.Tensor:
        array = np.empty(self.shape, self.dtype)
        imagecodecs.zstd_decode(self.blob, out=array.reshape(-1))
        return torch.from_numpy(array)


@dataclass(frozen=True)
class SlideEntry:
    """One good file: which level and which box of it the model reads."""

    path: Path
    level: int
    box: tuple[int, int, int, int]      # top, left, height, width in pixels of ``level``
    channels: int
    mpp: float | None                   # of ``level``; None when the file does not say
    pixels: KeptPixels | None = field(default=None, repr=False, compare=False)  # read when asked (keep_below)

    @property
    def size(self) -> tuple[int, int]:
        return self.box[2], self.box[3]


class BadFiles(ValueError):
    """Files that failed the header check; ``problems`` lists (path, reason)."""

    def __init__(self, problems: list[tuple[Path, str]]):
        self.problems = problems
        shown = "; ".join(reason for _, reason in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        super().__init__(f"{len(problems)} bad image file(s): {shown}{more}. Fix or remove them, or set "
                         "data.on_error=skip to train without them")


def choose_level(reader: ImageReader, level: int | None = None, mpp: float | None = None) -> tuple[int, str | None]:
    """(level index, warning or None) for ``level`` or ``mpp`` (see the module docstring)."""
    if mpp is not None:
        mpps = reader.mpp
        if mpps[0] is not None:
            fine_enough = [k for k, m in enumerate(mpps) if m <= mpp * 1.01]    # 1%: rounded level sizes
            if fine_enough:
                return max(fine_enough, key=lambda k: mpps[k]), None
            return 0, f"{reader.path}: level 0 is {mpps[0]:.4g} mpp, coarser than data.mpp={mpp}: reading level 0"
        fallback = level or 0
        return fallback, f"{reader.path}: no microns-per-pixel metadata: reading level {fallback} (data.level)"
    return level or 0, None


def _mask_box(reader: ImageReader, level: int, tissue: Tissue, mask: Path | None) -> tuple[int, int, int, int]:
    _, h, w = reader.level_shapes[level]
    if tissue == "otsu":
        found = tissue_mask(reader.read_thumbnail(THUMBNAIL_SIZE))
    else:
        if mask is None or not mask.is_file():
            raise ValueError(f"tissue mask {mask} not found (data.tissue=mask: name it like the slide plus "
                             "data.mask_suffix, or give a mask column)")
        with open_image(mask) as m:
            found = m.read_thumbnail(THUMBNAIL_SIZE).max(axis=0) > 0
    box = tissue_box(found, (h, w))
    return box if box is not None else (0, 0, h, w)


def _inspect(path: Path, level: int | None, mpp: float | None, tissue: Tissue,
             mask: Path | None, keep_below: int = 0) -> tuple[SlideEntry, str | None]:
    with open_image(path) as reader:
        k, warning = choose_level(reader, level, mpp)
        if k >= reader.level_count:
            raise ValueError(f"{path}: has levels 0..{reader.level_count - 1}, no level {k} (data.level)")
        c, h, w = reader.level_shapes[k]
        box = (0, 0, h, w) if tissue == "none" else _mask_box(reader, k, tissue, mask)
        pixels = KeptPixels.of(reader.read_region(*box, k)) if c * box[2] * box[3] <= keep_below else None
        return SlideEntry(path, k, box, c, reader.mpp[k], pixels), warning


def _inspect_or_reason(args: tuple, level: int | None, mpp: float | None, tissue: Tissue,
                       keep_below: int) -> tuple[SlideEntry | None, str | None]:
    """(entry, warning) of one file, or (None, why it is bad): for worker processes."""
    path, mask = args
    try:
        return _inspect(path, level, mpp, tissue, mask, keep_below)
    except (ValueError, FileNotFoundError, OSError) as error:
        reason = str(error)
        return None, reason if str(path) in reason else f"{path}: {reason}"


def inspect_slides(paths: Sequence[Path], *, level: int | None = None, mpp: float | None = None,
                   tissue: Tissue = "none", masks: Sequence[Path | None] | None = None, mask_suffix: str = "_mask",
                   on_error: Literal["raise", "skip"] = "raise", keep_below: int = 0, workers: int = 1,
                   progress: bool = False) -> tuple[list[SlideEntry | None], list[tuple[Path, str]]]:
    """Check every file's header; (entry per path, None where skipped) and the (path, reason) skipped.

    ``on_error="raise"`` raises :class:`BadFiles` naming every bad file instead. Images of at
    most ``keep_below`` samples (channels x pixels of the box) are read and kept in their
    entry's ``pixels``. ``workers`` processes check the files (a bar unless not ``progress``).
    """
    jobs = []
    for i, path in enumerate(paths):
        mask = masks[i] if masks is not None and masks[i] is not None else None
        if mask is None and tissue == "mask":
            found = sorted(path.parent.glob(f"{path.name.split('.')[0]}{mask_suffix}.*"))
            mask = found[0] if found else path.with_name(f"{path.name.split('.')[0]}{mask_suffix}.png")
        jobs.append((path, mask))
    check = functools.partial(_inspect_or_reason, level=level, mpp=mpp, tissue=tissue, keep_below=keep_below)
    entries: list[SlideEntry | None] = []
    problems: list[tuple[Path, str]] = []
    fallbacks: list[str] = []
    for (path, _), (entry, note) in zip(jobs, process_map(check, jobs, workers, desc="checking images",
                                                          progress=progress)):
        entries.append(entry)
        if entry is None:
            problems.append((path, note))
        elif note:
            fallbacks.append(note)
    counts: dict[int, int] = {}
    for entry in entries:
        if entry is not None:
            counts[entry.channels] = counts.get(entry.channels, 0) + 1
    if len(counts) > 1:
        usual = max(counts, key=lambda c: counts[c])
        for i, entry in enumerate(entries):
            if entry is not None and entry.channels != usual:
                problems.append((entry.path, f"{entry.path}: has {entry.channels} channels, the other images "
                                             f"have {usual}"))
                entries[i] = None
    if fallbacks:
        warnings.warn(f"{len(fallbacks)} image(s) without usable mpp metadata, e.g. {fallbacks[0]}", stacklevel=2)
    if problems and on_error == "raise":
        raise BadFiles(problems)
    return entries, problems


class SlideView:
    """A level and box of a reader, read lazily (a :class:`streamcnn.RegionSource`)."""

    def __init__(self, reader: ImageReader, level: int, box: tuple[int, int, int, int]):
        self.reader, self.level, self.box = reader, level, box
        self.path, self.dtype = reader.path, reader.dtype
        self.shape = (reader.level_shapes[level][0], box[2], box[3])

    def read_region(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        return self.reader.read_region(self.box[0] + top, self.box[1] + left, height, width, self.level)

    def read_thumbnail(self, max_size: int) -> np.ndarray:
        """The view downsampled so its longer side is at most ``max_size`` (area average, aspect kept)."""
        _, h0, w0 = self.reader.level_shapes[self.level]
        top, left, h, w = self.box
        level = self.level
        for k in range(self.level, self.reader.level_count):    # the coarsest level still large enough
            if max(h, w) * self.reader.level_shapes[k][2] / w0 >= max_size:
                level = k
        _, hk, wk = self.reader.level_shapes[level]
        sy, sx = hk / h0, wk / w0
        t, l_ = int(top * sy), int(left * sx)
        b, r = min(hk, max(t + 1, round((top + h) * sy))), min(wk, max(l_ + 1, round((left + w) * sx)))
        return shrink_to(self.reader.read_region(t, l_, b - t, r - l_, level), max_size)

    def close(self) -> None:
        self.reader.close()

    def __repr__(self) -> str:
        return f"SlideView('{self.path}', level={self.level}, box={self.box})"
