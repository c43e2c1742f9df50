"""PatchGD with a global patch: the patch-based baseline the benchmark compares streaming with.

The method (PatchGD, Gupta et al. 2022; the global patch of "Resource Efficient Perception
for Vision Systems", section III-A):

- the image is cut into non-overlapping ``patch_size`` patches; a backbone ``f1`` maps each
  patch to a feature vector (its feature map, averaged), and the vectors tile a latent block
  ``Z`` of shape (N, M, rows, cols) that encodes the whole image;
- a training micro-step first fills ``Z`` without gradients, then runs ``inner_iterations``
  inner iterations: each samples a fraction ``sampling`` of the patches (without replacement
  within the micro-step), recomputes their features *with* gradients, writes them into a copy
  of ``Z``, and back-propagates the loss of the whole image through the aggregator ``f2`` to
  ``f1``; gradients accumulate over the inner iterations (and the trainer's micro-batches)
  and the optimizer steps once, as the paper's UltraMNIST setting does (3 inner iterations,
  accumulation 3). ``Z`` keeps the new features of the sampled patches;
- the global patch, the whole image downsampled to ``patch_size``, goes through ``f1`` too;
  its pooled features are *added* to the pooled output of ``f2`` before the linear classifier
  (the paper found addition better than concatenation for classification).

Evaluation (and a plain ``forward``) fills ``Z`` from every patch and classifies it.
:meth:`PatchGDClassifier.micro_step` is the model's own micro-step: the trainer runs it and
the memory prediction (:func:`streamcnn.planning.memory.predict_step_memory`) simulates it, through
:func:`streamcnn.engine.step.training_step`, so the budget binds PatchGD like every other arm.

Decisions where the papers are silent: the same patch positions are sampled for every image
of a micro-batch; the patch features are averaged over the backbone's feature map; ``f2`` is
3x3 convolutions with GroupNorm over ``Z`` (GroupNorm, not BatchNorm: micro-batches are small).
"""
from __future__ import annotations

import math
import random
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from streamcnn.utils.units import pixels_to_unit

__all__ = ["PatchGDClassifier", "build_patchgd", "check_budget"]


class PatchGDClassifier(nn.Module):
    """``classifier(pool(f2(Z)) + pool(f1(global patch)))``, trained by PatchGD micro-steps.

    ``backbone`` maps (n, C, p, p) patches to (n, channels, h, w) feature maps. ``sampling`` is
    the fraction of patches updated per inner iteration (at least one); ``patch_batch`` bounds
    how many patches one no-gradient pass runs (default: as many as an inner iteration).
    """

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
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_classes))

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
            small = F.interpolate(pixels_to_unit(images, reference.dtype), size=(p, p), mode="area")
        else:  # the reader's pyramid level nearest above p, averaged down (as the downsampling baseline reads)
            from streamcnn.training.baselines import downsample_image

            small = torch.stack([downsample_image(image, p) for image in images])
        return small.to(reference.device, reference.dtype)

    @staticmethod
    def _size(images: Any) -> tuple[int, tuple[int, int]]:
        if isinstance(images, torch.Tensor):
            return images.shape[0], (images.shape[-2], images.shape[-1])
        return len(images), tuple(images[0].shape[-2:])

    def _features(self, patches: torch.Tensor) -> torch.Tensor:
        return self.backbone(patches).mean(dim=(2, 3))

    # -- the method ----------------------------------------------------------------------------
    @torch.no_grad()
    def fill(self, images: Any) -> torch.Tensor:
        """The latent block ``Z`` (N, M, rows * cols) of every patch, without gradients."""
        n, size = self._size(images)
        rows, cols = self.grid(size)
        chunk = self.patch_batch or self.patches_per_iteration(size)
        parts = []
        for start in range(0, rows * cols, chunk):
            indices = range(start, min(start + chunk, rows * cols))
            parts.append(self._features(self._read(images, indices, cols)).reshape(n, len(indices), -1))
        return torch.cat(parts, dim=1).transpose(1, 2).contiguous()

    def classify(self, z: torch.Tensor, global_features: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
        """Logits from the latent block (N, M, rows * cols) and the global patch's features."""
        pooled = self.aggregator(z.reshape(*z.shape[:2], *grid)).mean(dim=(2, 3))
        if global_features is not None:
            pooled = pooled + global_features
        return self.classifier(pooled)

    def forward(self, images: Any) -> torch.Tensor:
        """Logits of every image, from all its patches (evaluation, or training under ``no_grad``)."""
        if self.training and torch.is_grad_enabled():
            raise RuntimeError("PatchGD trains through its own micro_step (streamcnn.engine.step.micro_step takes it); a "
                               "plain forward with gradients would train the global patch only. Wrappers that call "
                               "forward, such as DistributedDataParallel, are not supported: train on one process")
        _, size = self._size(images)
        z = self.fill(images)
        g = self._features(self._global(images)) if self.global_patch else None
        return self.classify(z, g, self.grid(size))

    def micro_step(self, images: Any, labels: torch.Tensor, *, device_type: str, accumulate: int = 1,
                   amp_dtype: torch.dtype | None = None,
                   scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch of PatchGD: fill ``Z``, then the inner iterations, each with its backward.

        Each backward adds ``loss / (accumulate * inner_iterations)`` to the gradients, so one
        micro-step weighs as much as a conventional one. Returns the mean loss over the inner
        iterations and the last iteration's logits, detached (as :func:`streamcnn.engine.step.micro_step`).
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
            with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
                feats = self._features(self._read(images, chosen, grid[1])).reshape(n, k, -1).transpose(1, 2)
                index = torch.tensor(chosen, device=z.device)
                zj = z.index_copy(2, index, feats.to(z.dtype))
                g = self._features(self._global(images)) if self.global_patch else None
                out = self.classify(zj, g, grid)
                loss = F.cross_entropy(out.float(), labels)
            scaled = loss / (accumulate * self.inner_iterations)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            z.index_copy_(2, index, feats.detach().to(z.dtype))
            total = total + loss.detach()
            logits = out.detach()
            del feats, zj, g, out, loss, scaled
        return total / self.inner_iterations, logits  # type: ignore[return-value]


def build_patchgd(trunk: str, num_classes: int, in_channels: int, *, patch_size: int, sampling: float = 0.25,
                  inner_iterations: int = 3, head_depth: int = 2, dropout: float = 0.0, global_patch: bool = True,
                  weights: str | None = None, trunk_kwargs: dict | None = None) -> PatchGDClassifier:
    """PatchGD over a named trunk of the registry (:func:`streamcnn.models.classifier.build_trunk`, with ``trunk_kwargs``)."""
    from streamcnn.models.classifier import build_trunk

    backbone, channels = build_trunk(trunk, in_channels, weights, **(trunk_kwargs or {}))
    return PatchGDClassifier(backbone, channels, num_classes, patch_size=patch_size, sampling=sampling,
                             inner_iterations=inner_iterations, head_depth=head_depth, dropout=dropout,
                             global_patch=global_patch)


def check_budget(model: PatchGDClassifier, image_size: Sequence[int], budget: str | int, *, batch: int = 1,
                 accumulate: int = 1, dtype: torch.dtype | None = None, device: str = "cpu",
                 optimizer: str = "adamw", weight_decay: float = 0.0,
                 counts: str = "process") -> tuple[str, dict[str, Any]]:
    """Predict a PatchGD step's peak (:func:`streamcnn.planning.memory.predict_step_memory`) and check the
    part of it that ``counts`` (:data:`streamcnn.planning.memory.BUDGET_COUNTS`) against ``budget``; returns a description and a JSON report, or raises
    :class:`streamcnn.planning.search.BudgetError`. PatchGD has no plan to choose: its memory is set by
    the patch size, the sampling rate and the batch, which the config fixes."""
    from streamcnn.planning.memory import budget_counts_suffix, budgeted_bytes, predict_step_memory
    from streamcnn.planning.search import BudgetError
    from streamcnn.utils.units import format_size, parse_size

    limit = parse_size(budget)
    estimate = predict_step_memory(model, image_size, batch=batch, dtype=dtype, device=device, optimizer=optimizer,
                                   weight_decay=weight_decay, accumulate=accumulate)
    k, rows_cols = model.patches_per_iteration(image_size), model.grid(image_size)
    what = (f"PatchGD step: {rows_cols[0]} x {rows_cols[1]} patches of {model.patch_size} px, {k} updated per inner "
            f"iteration, {model.inner_iterations} inner iterations, batch {batch}, on {device}")
    need, of = budgeted_bytes(estimate, counts), budget_counts_suffix(counts)
    if need > limit:
        raise BudgetError(f"{what} needs {format_size(need)}{of}, over the budget of {format_size(limit)}{of}: lower "
                          f"model.patch_sampling, model.patch_size or train.batch_size, or use a budget of at least "
                          f"{format_size(need)}", need)
    text = f"{what}: predicted peak {format_size(need)}{of} fits the budget of {format_size(limit)}{of}"
    return text, {"method": "patchgd", "predicted_bytes": need, "budget_bytes": limit, "budget_counts": counts,
                  "predicted_peak_bytes": estimate.allocated_bytes, "predicted_device_bytes": estimate.process_bytes,
                  "patches_per_iteration": k, "grid": list(rows_cols), "patch_size": model.patch_size,
                  "inner_iterations": model.inner_iterations}
