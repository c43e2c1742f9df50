"""A tiny task where full resolution matters, and a tiny trunk to learn it in seconds.

Each image is a mid-grey square holding one small patch of one of four textures at a
random even position: flat grey (the same as the background), a one-pixel checkerboard,
one-pixel horizontal stripes or one-pixel vertical stripes, all with mean 0.5. The label
is the texture. Averaging any aligned 2x2 block of any texture gives 0.5, so the images
of all four classes become *identical* when downsampled by area averaging by any even
factor: a downsampling baseline is at chance, and only a model that sees full resolution
can learn the task. Training on it while streaming (tile smaller than the image) is the
test that the streamed loop really learns.

``tiny-cnn`` (in :data:`streamcnn.models.classifier.TRUNKS`) is a 4-layer stride-8 trunk
that learns the task in a few hundred CPU steps; its receptive field is small, so
streaming it uses tiles much smaller than the image with little overlap.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

__all__ = ["TEXTURES", "SyntheticTextures", "texture_patch"]

TEXTURES = ("flat", "checkerboard", "horizontal stripes", "vertical stripes")


def texture_patch(kind: int, size: int) -> torch.Tensor:
    """A (size, size) float patch of texture ``kind`` (index into :data:`TEXTURES`), mean 0.5."""
    rows = torch.arange(size).view(-1, 1)
    cols = torch.arange(size).view(1, -1)
    if kind == 0:
        return torch.full((size, size), 0.5)
    if kind == 1:
        return ((rows + cols) % 2).float().expand(size, size).clone()
    if kind == 2:
        return (rows % 2).float().expand(size, size).clone()
    if kind == 3:
        return (cols % 2).float().expand(size, size).clone()
    raise ValueError(f"texture index {kind} out of range 0..{len(TEXTURES) - 1}")


class SyntheticTextures(Dataset):
    """``count`` images of ``size`` px, (1, H, W) float in [0, 1], label = texture index.

    Deterministic: image ``i`` depends only on ``(seed, i)``. Classes cycle (balanced).
    """

    num_classes = len(TEXTURES)

    def __init__(self, count: int, size: int = 256, seed: int = 0, patch: int = 12):
        if patch % 2 or size < patch + 2:
            raise ValueError(f"patch must be even and smaller than the image, got patch={patch}, size={size}")
        self.count, self.size, self.seed, self.patch = count, size, seed, patch
        self.labels = [i % self.num_classes for i in range(count)]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        label = self.labels[index]
        image = torch.full((1, self.size, self.size), 0.5)
        top, left = (2 * torch.randint(0, (self.size - self.patch) // 2 + 1, (2,), generator=generator)).tolist()
        image[0, top:top + self.patch, left:left + self.patch] = texture_patch(label, self.patch)
        return image, label
