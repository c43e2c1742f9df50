"""The downsampling baseline: the whole image read at ``input_size`` px, a conventional CNN.

This is how the UltraMNIST paper's baselines (ResNet-50 at 256/512/1024 px, ...) see the
data, and it is the honest comparison for a streamed full-resolution run: same data,
same trunk and head, same memory budget, only the input resolution differs.
Lazy images are read from their pyramid (:meth:`streamcnn.io.ImageReader.read_thumbnail`
decodes the coarsest level that is still large enough), so a 4000 px image never has
to be decoded at full resolution; in-memory tensors are area-averaged.

The aspect ratio is kept: the long side becomes ``size`` and, with ``fit="pad"`` (the
default), the short side is padded with zeros on both sides to ``size`` (square inputs that
batch); with ``fit="long_side"`` the short side stays as it is (use batch size 1 when
the aspect ratios differ). Square images (UltraMNIST) come out the same either way.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["downsample_image", "downsampled_shape", "DownsampledDataset"]


def _check_fit(fit: str) -> None:
    if fit not in ("pad", "long_side"):
        raise ValueError(f"fit must be 'pad' or 'long_side', got {fit!r}")


def downsampled_shape(height: int, width: int, size: int, fit: str = "pad") -> tuple[int, int]:
    """(H, W) of an image of ``height`` x ``width`` px after :func:`downsample_image`."""
    _check_fit(fit)
    if fit == "pad":
        return size, size
    return max(1, round(height * size / max(height, width))), max(1, round(width * size / max(height, width)))


def downsample_image(image: Any, size: int, fit: str = "pad") -> torch.Tensor:
    """``image`` (a reader with ``read_thumbnail``, or a (C, H, W) array/tensor) as a float
    tensor in [0, 1] (integer pixels are divided by their maximum) whose long side is
    ``size``: (C, size, size) with ``fit="pad"``, aspect-exact with ``fit="long_side"``."""
    _check_fit(fit)
    if hasattr(image, "read_thumbnail"):
        pixels = torch.as_tensor(np.ascontiguousarray(image.read_thumbnail(size)))
    elif isinstance(image, (torch.Tensor, np.ndarray)):
        pixels = torch.as_tensor(image)
    else:
        raise TypeError(f"cannot downsample a {type(image).__name__}: expected an image reader or a (C, H, W) tensor")
    if pixels.dim() != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {tuple(pixels.shape)}")
    scale = float(torch.iinfo(pixels.dtype).max) if not pixels.is_floating_point() else 1.0
    pixels = pixels.float() / scale
    h, w = pixels.shape[1:]
    target = downsampled_shape(h, w, size, "long_side")
    if (h, w) != target:
        pixels = F.interpolate(pixels[None], size=target, mode="area")[0]
    if fit == "pad" and target != (size, size):
        top, left = (size - target[0]) // 2, (size - target[1]) // 2
        pixels = F.pad(pixels, (left, size - target[1] - left, top, size - target[0] - top))
    return pixels


class DownsampledDataset(Dataset):
    """``dataset``'s ``(image, label)`` items with the image downsampled to ``size`` px."""

    def __init__(self, dataset: Dataset, size: int, fit: str = "pad"):
        self.dataset = dataset
        self.size = size
        self.fit = fit

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        small = downsample_image(image, self.size, self.fit)
        if hasattr(image, "close"):
            image.close()
        return small, label

    def __getattr__(self, name: str):
        # num_classes, labels, ... of the wrapped dataset
        if name in ("dataset", "size", "fit"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
