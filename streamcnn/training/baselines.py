"""The downsampling baseline: the whole image read at ``input_size`` px, a conventional CNN.

This is how the UltraMNIST paper's baselines (ResNet-50 at 256/512/1024 px, ...) see the
data, and it is the honest comparison for a streamed full-resolution run: same data,
same trunk and head, same memory budget, only the input resolution differs.
Lazy images are read from their pyramid (:meth:`streamcnn.io.ImageReader.read_thumbnail`
decodes the coarsest level that is still large enough), so a 4000 px image never has
to be decoded at full resolution; in-memory tensors are area-averaged (:mod:`streamcnn.utils.downsample` owns both).

The aspect ratio is kept: the long side becomes ``size`` and, with ``fit="pad"`` (the
default), the short side is padded with zeros on both sides to ``size`` (square inputs that
batch); with ``fit="long_side"`` the short side stays as it is (use batch size 1 when
the aspect ratios differ). Square images (UltraMNIST) come out the same either way.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from streamcnn.utils.downsample import downsample_image, downsampled_shape

__all__ = ["downsample_image", "downsampled_shape", "DownsampledDataset"]


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
