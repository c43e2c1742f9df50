"""A torch Dataset over a manifest CSV of images, and a collate that never stacks gigapixels.

The manifest names each image (``path``, relative to the data root or absolute) and its
integer ``label``; any other columns are ignored. Images are opened with
:func:`streamcnn.io.open_image`, so the same Dataset serves generated UltraMNIST folders
and a user's own folder of slides. With ``lazy=True`` an item is the lazy reader itself
(what :class:`streamcnn.StreamingModule` consumes, one window at a time); with
``lazy=False`` it is the whole image as a tensor, for images that fit in memory.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from ..io import ImageReader, open_image

__all__ = ["ManifestDataset", "collate_images"]


class ManifestDataset(Dataset):
    """Images and integer labels listed in ``root/manifest``.

    Args:
        root: folder the manifest's relative paths start from.
        manifest: the CSV file (relative to ``root`` or absolute), with at least the
            columns ``path`` and ``label``.
        lazy: return :class:`~streamcnn.io.ImageReader` objects (default) instead of
            (C, H, W) tensors of the image's dtype (uint8 for 8-bit images).
        transform: applied to the image (reader or tensor) before it is returned.
        num_classes: number of classes; default max label + 1.
    """

    def __init__(self, root: str | os.PathLike, manifest: str | os.PathLike = "manifest.csv", lazy: bool = True,
                 transform: Callable[[Any], Any] | None = None, num_classes: int | None = None):
        self.root = Path(root)
        self.manifest = self.root / manifest
        self.lazy = lazy
        self.transform = transform
        if not self.manifest.is_file():
            raise FileNotFoundError(f"manifest {self.manifest} not found (expected a CSV with columns path,label)")
        with open(self.manifest, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("path", "label") if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{self.manifest}: missing column(s) {missing}; found {reader.fieldnames}")
            rows = list(reader)
        if not rows:
            raise ValueError(f"{self.manifest}: no rows")
        self.paths: list[Path] = []
        self.labels: list[int] = []
        for line, row in enumerate(rows, start=2):    # line 1 is the header
            path = Path(row["path"])
            self.paths.append(path if path.is_absolute() else self.root / path)
            try:
                self.labels.append(int(row["label"]))
            except (TypeError, ValueError):
                raise ValueError(
                    f"{self.manifest}, line {line} ({row['path']}): label {row['label']!r} is not an integer"
                ) from None
            if self.labels[-1] < 0:
                raise ValueError(f"{self.manifest}, line {line} ({row['path']}): label {self.labels[-1]} is negative")
        missing_files = [str(p) for p in self.paths if not p.is_file()]
        if missing_files:
            more = f" and {len(missing_files) - 3} more" if len(missing_files) > 3 else ""
            raise FileNotFoundError(f"{self.manifest}: image file(s) not found: {', '.join(missing_files[:3])}{more}")
        self.num_classes = num_classes if num_classes is not None else max(self.labels) + 1
        if max(self.labels) >= self.num_classes:
            raise ValueError(f"{self.manifest}: label {max(self.labels)} >= num_classes {self.num_classes}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[ImageReader | torch.Tensor, int]:
        reader = open_image(self.paths[index])
        if self.lazy:
            image: Any = reader
        else:
            with reader:
                image = torch.from_numpy(reader.read_level(0))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


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
