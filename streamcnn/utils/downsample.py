"""Area downsampling, defined once: every smaller view of an image in the project is made here.

- :func:`area_resize`: float tensors (..., H, W) averaged over areas to (h, w) (``F.interpolate``
  with ``mode="area"``, the average of the pixels each output pixel covers);
- :func:`shrink_to`: a (C, H, W) numpy image whose longer side becomes at most ``max_size``,
  aspect and dtype kept (integer pixels rounded): readers' thumbnails, heatmap pyramids;
- :func:`downsample_image` / :func:`downsampled_shape`: an image (a reader with
  ``read_thumbnail``, or a (C, H, W) array) as model input in [0, 1] at ``size`` px, padded to a
  square or aspect-exact: the downsampling baseline's input and PatchGD's global patch.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["area_resize", "downsample_image", "downsampled_shape", "shrink_to"]


def area_resize(pixels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Float ``pixels`` (..., H, W) area-averaged to ``size`` (h, w); unchanged when already that size."""
    size = (int(size[0]), int(size[1]))
    if tuple(pixels.shape[-2:]) == size:
        return pixels
    lead = pixels.shape[:-2]
    flat = pixels.reshape(-1, 1, *pixels.shape[-2:])
    return F.interpolate(flat, size=size, mode="area").reshape(*lead, *size)


def shrink_to(image: np.ndarray, max_size: int) -> np.ndarray:
    """(C, h, w) ``image`` area-averaged so its longer side is at most ``max_size`` (aspect and dtype kept)."""
    _, h, w = image.shape
    factor = max_size / max(h, w)
    if factor >= 1:
        return image
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    small = area_resize(torch.from_numpy(image.astype(np.float32)), size)
    if np.issubdtype(image.dtype, np.integer):
        small = small.round()
    return small.numpy().astype(image.dtype)


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
    pixels = area_resize(pixels, target)
    if fit == "pad" and target != (size, size):
        top, left = (size - target[0]) // 2, (size - target[1]) // 2
        pixels = F.pad(pixels, (left, size - target[1] - left, top, size - target[0] - top))
    return pixels
