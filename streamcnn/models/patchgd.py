"""PatchGD with a global patch: the patch-based baseline the benchmark compares streaming with.

The method (PatchGD, Gupta et al. 2022; the global patch of "Resource Efficient Perception
for Vision Systems", section III-A, ``../shared/papers/patchgd-global-patch-paper.txt``):

- the image is cut into non-overlapping ``patch_size`` patches; a backbone ``f1`` maps each
  patch to its feature map, and the maps tile a latent block ``Z`` (N, M, rows * h, cols * w)
  that encodes the whole image (each patch's map is kept, not averaged: the only pooling is
  the head's, once);
- the global patch, the whole image downsampled to ``patch_size``, goes through ``f1`` too;
  its feature map is *added* to ``Z`` (upsampled to ``Z``'s grid, so each position of ``Z``
  gets the global view of the same place) *before* the aggregator ``f2`` (the paper: the
  global feature "is fused with [the] feature[s] of other patches to obtain a joint
  representation", by addition, "We then pass [it] to f2");
- ``f2`` is 3x3 convolutions with GroupNorm over the fused block, then the project's ``pool``
  head (global mean and max, linear);
- a training micro-step (:meth:`PatchGDClassifier.micro_step`) first fills ``Z`` without
  gradients, then runs ``inner_iterations`` inner iterations: each samples a fraction
  ``sampling`` of the patches (without replacement within the micro-step), recomputes their
  features *with* gradients, writes them into a copy of ``Z``, and back-propagates the loss of
  the whole image through ``f2`` to ``f1``; gradients accumulate over the inner iterations
  (and the trainer's micro-batches) and the optimizer steps once, as the paper's UltraMNIST
  setting does (3 inner iterations). ``Z`` keeps the new features of the sampled patches.

Evaluation (``forward``) fills ``Z`` from every patch and classifies it. PatchGD is a
:class:`streamcnn.engine.step.Strategy`: the trainer runs its micro-step and the memory
prediction simulates it, so the budget binds PatchGD like every other arm.

Decisions where the papers are silent: the same patch positions are sampled for every image
of a micro-batch; GroupNorm in ``f2`` (micro-batches are small for BatchNorm).
"""
from __future__ import annotations

import math
import random
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from streamcnn.engine.step import Strategy, loss_of
from streamcnn.models.classifier import build_head, build_trunk
from streamcnn.utils.downsample import area_resize, downsample_image
from streamcnn.utils.units import pixels_to_unit

__all__ = ["PatchGDClassifier", "build_patchgd"]


class PatchGDClassifier(Strategy):
    """``head(f2(Z + up(f1(global patch))))``, trained by PatchGD micro-steps.

    ``backbone`` maps (n, C, p, p) patches to (n, channels, h, w) feature maps. ``sampling`` is
    the fraction of patches updated per inner iteration (at least one); ``patch_batch`` bounds
    how many patches one no-gradient pass runs (default: as many as an inner iteration).
    """

    budget_knobs = "model.patch_sampling, model.patch_size"

    def __init__(self, backbone: nn.Module, channels: int, num_classes: int, *, patch_size: int,
                 sampling: float = 0.25, inner_iterations: int = 3, head_depth: int = 2, dropout: float = 0.0,
                 global_patch: bool = True, patch_batch: int | None = None):
        super().__init__()
        if not 0 < sampling <= 1:
            raise ValueError(f"PatchGD sampling must be a fraction in (0, 1], got {sampling}")
        if inner_iterations < 1:
            raise ValueError(f"PatchGD inner_iterations must be at least 1, got {inner_iterations}")
        self.backbone = backbone
        self.patch_size = patch_size
        self.sampling = sampling
        self.inner_iterations = inner_iterations
        self.global_patch = global_patch
        self.patch_batch = patch_batch
        groups = math.gcd(8, channels)
        layers: list[nn.Module] = []
        for _ in range(head_depth):
            layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.GroupNorm(groups, channels),
                       nn.ReLU(inplace=True)]
        self.aggregator = nn.Sequential(*layers)
        self.head = build_head("pool", channels, num_classes, dropout=dropout)

    # -- geometry and pixels -------------------------------------------------------------------
    def grid(self, image_size: Sequence[int]) -> tuple[int, int]:
        """(rows, cols) of patches for an (H, W) image."""
        h, w = image_size
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"PatchGD cuts the image into {p} px patches, but the image is {h} x {w} px; "
                             f"choose model.patch_size dividing both sides")
        return h // p, w // p

    def patches_per_iteration(self, image_size: Sequence[int]) -> int:
        rows, cols = self.grid(image_size)
        return max(1, round(self.sampling * rows * cols))

    def describe(self, image_size: Sequence[int], batch: int) -> str:
        rows, cols = self.grid(image_size)
        return (f"PatchGD step: {rows} x {cols} patches of {self.patch_size} px, "
                f"{self.patches_per_iteration(image_size)} updated per inner iteration, {self.inner_iterations} "
                f"inner iterations, batch {batch}")

    def _parameter(self) -> torch.Tensor:
        return next(self.parameters())

    def _read(self, images: Any, indices: Sequence[int], cols: int) -> torch.Tensor:
        """The patches ``indices`` (row-major) of every image, as (N * len(indices), C, p, p)."""
        p, reference = self.patch_size, self._parameter()
        boxes = [((i // cols) * p, (i % cols) * p) for i in indices]
        if isinstance(images, torch.Tensor):
            crops = torch.stack([images[:, :, t:t + p, l:l + p] for t, l in boxes], dim=1)
            crops = crops.reshape(-1, *crops.shape[2:])
        else:  # region sources (lazy readers): only the sampled patches are decoded
            crops = torch.stack([torch.as_tensor(image.read_region(t, l, p, p)) for image in images
                                 for t, l in boxes])
        return pixels_to_unit(crops.to(reference.device), reference.dtype)

    def _global(self, images: Any) -> torch.Tensor:
        reference, p = self._parameter(), self.patch_size
        if isinstance(images, torch.Tensor):
            small = area_resize(pixels_to_unit(images, reference.dtype), (p, p))
        else:  # the reader's pyramid level nearest above p, averaged down (as the downsampling baseline reads)
            small = torch.stack([downsample_image(image, p) for image in images])
        return small.to(reference.device, reference.dtype)

    @staticmethod
    def _size(images: Any) -> tuple[int, tuple[int, int]]:
        if isinstance(images, torch.Tensor):
            return images.shape[0], (images.shape[-2], images.shape[-1])
        return len(images), tuple(images[0].shape[-2:])

    # -- the method ----------------------------------------------------------------------------
    @torch.no_grad()
    def fill(self, images: Any) -> torch.Tensor:
        """The latent block of every patch, patch-major: (N, rows * cols, M, h, w), without gradients."""
        n, size = self._size(images)
        rows, cols = self.grid(size)
        chunk = self.patch_batch or self.patches_per_iteration(size)
        parts = []
        for start in range(0, rows * cols, chunk):
            indices = range(start, min(start + chunk, rows * cols))
            maps = self.backbone(self._read(images, indices, cols))
            parts.append(maps.reshape(n, len(indices), *maps.shape[1:]))
        return torch.cat(parts, dim=1)

    @staticmethod
    def tile(z: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The patch-major block (N, rows * cols, M, h, w) as one map (N, M, rows * h, cols * w)."""
        n, _, m, h, w = z.shape
        rows, cols = grid
        return z.reshape(n, rows, cols, m, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n, m, rows * h, cols * w)

    def classify(self, z: torch.Tensor, global_map: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
        """Logits from the patch-major block and the global patch's feature map (fused before ``f2``)."""
        fused = self.tile(z, grid)
        if global_map is not None:
            fused = fused + F.interpolate(global_map, size=fused.shape[-2:], mode="nearest")
        return self.head(self.aggregator(fused))

    def _global_map(self, images: Any) -> torch.Tensor | None:
        return self.backbone(self._global(images)) if self.global_patch else None

    def forward(self, images: Any) -> torch.Tensor:
        """Logits of every image, from all its patches (evaluation, or training under ``no_grad``)."""
        if self.training and torch.is_grad_enabled():
            raise RuntimeError("PatchGD trains through its own micro_step (streamcnn.engine.step.micro_step runs it); "
                               "a plain forward with gradients would train the global patch only. Wrappers that call "
                               "forward, such as DistributedDataParallel, are not supported: train on one process")
        _, size = self._size(images)
        return self.classify(self.fill(images), self._global_map(images), self.grid(size))

    def micro_step(self, images: Any, labels: torch.Tensor, *, device_type: str, accumulate: int = 1,
                   amp_dtype: torch.dtype | None = None,
                   scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch of PatchGD: fill ``Z``, then the inner iterations, each with its backward.

        Each backward adds ``loss / (accumulate * inner_iterations)`` to the gradients, so one
        micro-step weighs as much as a conventional one. Returns the mean loss over the inner
        iterations and the last iteration's logits, detached.
        """
        n, size = self._size(images)
        grid = self.grid(size)
        count, k = grid[0] * grid[1], self.patches_per_iteration(size)
        order = random.sample(range(count), count)
        labels = labels.to(self._parameter().device)
        z = self.fill(images)
        total, logits = 0.0, None
        for j in range(self.inner_iterations):
            chosen = [order[(j * k + i) % count] for i in range(k)]
            index = torch.tensor(chosen, device=z.device)
            with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
                maps = self.backbone(self._read(images, chosen, grid[1]))
                maps = maps.reshape(n, k, *maps.shape[1:]).to(z.dtype)
                out = self.classify(z.index_copy(1, index, maps), self._global_map(images), grid)
                loss = loss_of(out, labels)
            scaled = loss / (accumulate * self.inner_iterations)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            z.index_copy_(1, index, maps.detach())
            total = total + loss.detach()
            logits = out.detach()
            del maps, out, loss, scaled
        return total / self.inner_iterations, logits  # type: ignore[return-value]


def build_patchgd(trunk: str, num_classes: int, in_channels: int, *, patch_size: int, sampling: float = 0.25,
                  inner_iterations: int = 3, head_depth: int = 2, dropout: float = 0.0, global_patch: bool = True,
                  weights: str | None = None, trunk_kwargs: dict | None = None) -> PatchGDClassifier:
    """PatchGD over a named trunk of the registry (:func:`streamcnn.models.classifier.build_trunk`, with ``trunk_kwargs``)."""
    backbone, channels = build_trunk(trunk, in_channels, weights, **(trunk_kwargs or {}))
    return PatchGDClassifier(backbone, channels, num_classes, patch_size=patch_size, sampling=sampling,
                             inner_iterations=inner_iterations, head_depth=head_depth, dropout=dropout,
                             global_patch=global_patch)
