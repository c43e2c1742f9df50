"""A torch Dataset over a slide table (CSV) of images, and a collate that never stacks gigapixels.

The table names each image (``path`` or ``slide_id``) and its ``label`` (an integer or a
class name), see :mod:`streamcnn.data.table`. Every file's header is checked when the
dataset is made (:func:`streamcnn.data.slides.inspect_slides`): bad files are named at
once, or skipped with ``on_error="skip"`` (listed in ``skipped``). Each item is read at
the chosen pyramid ``level`` (or the level nearest ``mpp``) and, with ``tissue``, cropped
to the tissue's bounding box. With ``lazy=True`` an item is a lazy reader (or a
:class:`~streamcnn.data.slides.SlideView` of one), which
:class:`streamcnn.StreamingModule` consumes one window at a time; with ``lazy=False``
it is the whole image as a tensor, for images that fit in memory; ``in_memory`` keeps each
image after its first read, compressed with zstd (small datasets read for many epochs: a
generated 128 px UltraMNIST image takes 0.8 ms to read from its TIFF and about 0.05 ms to
decompress, and is held in 1.4 kB instead of 16 kB). Images that will be kept are read while
their headers are checked, so each file is opened once, in ``workers`` processes.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from streamcnn.io import ImageReader, open_image
from streamcnn.data.parallel import worker_count
from streamcnn.data.slides import KeptPixels, SlideView, inspect_slides
from streamcnn.data.table import read_slide_table

__all__ = ["IN_MEMORY_LIMIT", "ManifestDataset", "collate_images"]

#: ``in_memory=None`` keeps decoded images in memory when they total at most this many samples
#: (pixels x channels; bytes for 8-bit images).
IN_MEMORY_LIMIT = 2 * 2**30
#: About how long checking (and reading) one small file takes: 1 ms for a 128 px TIFF.
CHECK_SECONDS = 1e-3


class ManifestDataset(Dataset):
    """Images and integer labels listed in ``root/manifest``.

    Args:
        root: folder the table's relative paths and slide ids start from.
        manifest: the CSV file (relative to ``root`` or absolute); ``None`` takes every image
            in ``root``, unlabelled.
        lazy: return :class:`~streamcnn.io.ImageReader` objects (default) instead of
            (C, H, W) tensors of the image's dtype (uint8 for 8-bit images).
        transform: applied to the image (reader or tensor) before it is returned.
        in_memory: with ``lazy=False``, keep every image after its first read (zstd-compressed);
            ``None``: when they total at most :data:`IN_MEMORY_LIMIT` samples (uncompressed).
            Ignored for lazy readers.
        num_classes: number of classes; default the number of class names, or max label + 1.
        classes: class names in label order (e.g. a trained model's), to number named labels.
        require_labels: unlabelled images are an error (training) or allowed (prediction;
            their label is -1).
        level, mpp, tissue, mask_suffix, on_error: see :func:`streamcnn.data.slides.inspect_slides`.
        workers: processes that check the files (and read the images to keep); ``None``: one per
            core this process may use, as many as the files repay (:func:`streamcnn.data.parallel.worker_count`).
        progress: a bar while the files are checked.
    """

    def __init__(self, root: str | os.PathLike, manifest: str | os.PathLike | None = "manifest.csv",
                 lazy: bool = True, transform: Callable[[Any], Any] | None = None, num_classes: int | None = None,
                 *, classes: Sequence[str] | None = None, require_labels: bool = True, level: int | None = None,
                 mpp: float | None = None, tissue: Literal["none", "otsu", "mask"] = "none",
                 mask_suffix: str = "_mask", on_error: Literal["raise", "skip"] = "raise",
                 in_memory: bool | None = None, workers: int | None = None, progress: bool = False):
        self.root = Path(root)
        self.lazy = lazy
        self.transform = transform
        table = read_slide_table(self.root, manifest, classes=classes, require_labels=require_labels,
                                 mask_suffix=mask_suffix)
        self.manifest = table.source
        # images read while checking: all that will surely be kept (in_memory=None: all of them
        # when every one is at most its share of IN_MEMORY_LIMIT)
        keep_below = 0 if lazy or in_memory is False else \
            sys.maxsize if in_memory else IN_MEMORY_LIMIT // max(1, len(table.rows))
        entries, self.skipped = inspect_slides([r.path for r in table.rows], level=level, mpp=mpp, tissue=tissue,
                                               masks=[r.mask for r in table.rows], mask_suffix=mask_suffix,
                                               on_error=on_error, keep_below=keep_below, progress=progress,
                                               workers=worker_count(len(table.rows), CHECK_SECONDS) if workers is None else workers)
        kept = [(row, entry) for row, entry in zip(table.rows, entries) if entry is not None]
        if not kept:
            raise ValueError(f"{self.manifest}: no readable images left after skipping {len(self.skipped)} bad file(s)")
        self.entries = [dataclasses.replace(entry, pixels=None) for _, entry in kept]
        self.paths: list[Path] = [row.path for row, _ in kept]
        self.labels: list[int] = [-1 if row.label is None else row.label for row, _ in kept]
        # the table's own columns, per image: its id as written, patient (grouping), split, fold
        self.ids: list[str] = [row.id or row.path.name for row, _ in kept]
        self.patients: list[str | None] = [row.patient for row, _ in kept]
        self.splits: list[str | None] = [row.split for row, _ in kept]
        self.folds: list[int | None] = [row.fold for row, _ in kept]
        self.classes: list[str] | None = table.classes
        self.channels = self.entries[0].channels
        known = max(self.labels) + 1
        self.num_classes = num_classes if num_classes is not None else len(self.classes) if self.classes else known
        if known > self.num_classes:
            raise ValueError(f"{self.manifest}: label {known - 1} >= num_classes {self.num_classes}")
        samples = sum(e.size[0] * e.size[1] * e.channels for e in self.entries)
        keep = not lazy and (samples <= IN_MEMORY_LIMIT if in_memory is None else in_memory)
        self._kept: dict[int, KeptPixels] | None = None
        if keep:
            self._kept = {i: entry.pixels for i, (_, entry) in enumerate(kept) if entry.pixels is not None}

    @property
    def class_names(self) -> list[str]:
        """The class names, or the label numbers as text when the table has integer labels."""
        return list(self.classes) if self.classes else [str(i) for i in range(self.num_classes)]

    def largest(self) -> int:
        """Index of the image with the most pixels as read (the one that sets the memory bound)."""
        return max(range(len(self.entries)), key=lambda i: (self.entries[i].size[0] * self.entries[i].size[1],
                                                            self.entries[i].size))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[ImageReader | SlideView | torch.Tensor, int]:
        kept = self._kept.get(index) if self._kept is not None else None
        image = kept.tensor() if kept is not None else self._read(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]

    def _read(self, index: int) -> ImageReader | SlideView | torch.Tensor:
        """Image ``index``: a reader (lazy) or the decoded tensor (kept, compressed, when in memory)."""
        entry = self.entries[index]
        reader = open_image(entry.path)
        full = entry.level == 0 and entry.box == (0, 0, *reader.level_shapes[0][1:])
        source: Any = reader if full else SlideView(reader, entry.level, entry.box)
        if self.lazy:
            return source
        with reader:
            array = np.ascontiguousarray(source.read_region(0, 0, *entry.size))
        if self._kept is not None:
            self._kept[index] = KeptPixels.of(array)
        return torch.from_numpy(array)

    @property
    def kept_bytes(self) -> int:
        """Bytes of the images kept in memory so far (compressed)."""
        return sum(len(pixels.blob) for pixels in self._kept.values()) if self._kept is not None else 0


def collate_images(batch: Sequence[tuple[Any, int]]) -> tuple[list[ImageReader] | torch.Tensor | list, torch.Tensor]:
    """Collate ``(image, label)`` pairs without stacking lazy images.

    Images: a list of readers when they are readers (never read here), a stacked tensor
    when all are tensors of one shape, otherwise a list. Labels: a LongTensor.
    """
    images = [image for image, _ in batch]
    labels = torch.tensor([label for _, label in batch], dtype=torch.long)
    if images and all(isinstance(i, torch.Tensor) for i in images) and len({i.shape for i in images}) == 1:
        return torch.stack(images), labels
    return images, labels
