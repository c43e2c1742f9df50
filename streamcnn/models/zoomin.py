"""Zoom-In: two-stage attention sampling of full-resolution regions (Kong & Henao, CVPR 2022).

The method ("Efficient Classification of Very Large Images with Tiny Objects", arXiv
2106.02694; summary in ``../shared/papers/README.md``), which the benchmark compares streaming with:

- **Stage I**: an attention network ``a1`` on the image downscaled by ``scale1`` gives one
  logit per ``tile`` px tile of the image (its map averaged over each tile's area); their
  softmax is a distribution over tiles, from which ``samples`` tiles are drawn *with
  replacement*;
- **Stage II**: an attention network ``a2`` on each drawn tile, downscaled by ``scale2``, gives
  a distribution over its ``subtile`` px sub-tiles, from which one is drawn;
- the drawn sub-tiles, at full resolution, go through the feature extractor (a trunk of the
  registry, globally mean- and max-pooled); the features are averaged with the
  attention-sampling estimator of Katharopoulos & Fleuret (ICML 2019): with ``q`` the
  probability a sample was drawn with (``a1(tile) * a2(sub-tile | tile)``), the aggregate
  is ``mean_i (q_i / stop_grad(q_i)) f(x_i)``, whose value is the Monte-Carlo estimate of
  ``E_q[f]`` and whose gradient is the score-function estimate of ``grad E_q[f]``, so both
  attention networks learn from the classification loss without seeing the unsampled regions;
- a linear classifier predicts from the aggregate; training adds ``- entropy * (H(a1) + H(a2))``
  to the loss (the attention-sampling paper's entropy regulariser, which keeps the attention
  from collapsing before it has learned where to look).

Memory and time depend on ``samples`` and the sizes, not on the image size. Evaluation draws
the samples too (the estimator is what was trained), from a generator seeded with
``eval_seed`` so that an evaluation is repeatable.

Not implemented: the paper's contrastive samples (low-attention regions drawn as negatives
during training).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from streamcnn.engine.step import Strategy, loss_of
from streamcnn.models.classifier import build_trunk
from streamcnn.utils.downsample import area_resize
from streamcnn.utils.units import pixels_to_unit

__all__ = ["ZoomInClassifier", "attention_network", "build_zoomin"]


def attention_network(in_channels: int, width: int = 8) -> nn.Sequential:
    """A small CNN giving one attention logit per pixel of its (stride-2) output map."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(width, 1, 1))


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(dim=-1).mean()


def _crops(images: torch.Tensor, index: torch.Tensor, side: int, cols: int) -> torch.Tensor:
    """``images`` (N, C, H, W), ``index`` (N, S) cells of a ``side`` px grid with ``cols`` columns:
    the (N * S, C, side, side) crops."""
    n, c, h, w = images.shape
    cells = images.reshape(n, c, h // side, side, w // side, side).permute(0, 2, 4, 1, 3, 5)
    cells = cells.reshape(n, (h // side) * (w // side), c, side, side)
    picked = cells.gather(1, index[:, :, None, None, None].expand(-1, -1, c, side, side))
    return picked.reshape(-1, c, side, side)


class ZoomInClassifier(Strategy):
    """``classifier(mean_i (q_i / sg(q_i)) f(sub-tile_i))`` over sub-tiles drawn by two attention stages."""

    budget_knobs = "model.strategy_kwargs (samples, subtile, tile)"

    def __init__(self, backbone: nn.Module, channels: int, num_classes: int, in_channels: int, *, tile: int,
                 subtile: int, scale1: float = 0.25, scale2: float = 0.5, samples: int = 8, entropy: float = 0.01,
                 attention_width: int = 8, eval_seed: int = 0):
        super().__init__()
        if tile % subtile:
            raise ValueError(f"Zoom-In needs the tile ({tile} px) to be a multiple of the sub-tile ({subtile} px)")
        if samples < 1:
            raise ValueError(f"Zoom-In needs at least one sample, got samples={samples}")
        self.backbone = backbone
        self.tile, self.subtile = tile, subtile
        self.scale1, self.scale2 = scale1, scale2
        self.samples, self.entropy, self.eval_seed = samples, entropy, eval_seed
        self.attention1 = attention_network(in_channels, attention_width)
        self.attention2 = attention_network(in_channels, attention_width)
        self.classifier = nn.Linear(2 * channels, num_classes)

    def grid(self, image_size: Sequence[int]) -> tuple[int, int]:
        """(rows, cols) of Stage I tiles for an (H, W) image."""
        h, w = image_size
        if h % self.tile or w % self.tile:
            raise ValueError(f"Zoom-In cuts the image into {self.tile} px tiles, but the image is {h} x {w} px; "
                             f"choose a tile size dividing both sides")
        return h // self.tile, w // self.tile

    def describe(self, image_size: Sequence[int], batch: int) -> str:
        rows, cols = self.grid(image_size)
        per_tile = (self.tile // self.subtile) ** 2
        return (f"Zoom-In step: {self.samples} of {rows} x {cols} tiles of {self.tile} px drawn on the image at "
                f"{self.scale1:g}x, one of {per_tile} sub-tiles of {self.subtile} px drawn in each at "
                f"{self.scale2:g}x, batch {batch}")

    @staticmethod
    def _attention(net: nn.Module, pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Softmax over the ``grid`` cells of ``net``'s map, averaged over each cell: (N, rows * cols)."""
        logits = F.adaptive_avg_pool2d(net(pixels), grid).flatten(1)
        return torch.softmax(logits.float(), dim=1)

    def _draw(self, p: torch.Tensor, count: int) -> torch.Tensor:
        generator = None
        if not self.training:
            generator = torch.Generator(p.device).manual_seed(self.eval_seed)
        return torch.multinomial(p.detach(), count, replacement=True, generator=generator)

    def attend(self, images: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the attention entropy ``H(a1) + H(a2)`` (mean over images and tiles)."""
        if not isinstance(images, torch.Tensor):
            raise TypeError("Zoom-In reads image tensors (set data.lazy: false); lazy readers are not supported")
        reference = next(self.classifier.parameters())
        x = pixels_to_unit(images.to(reference.device), reference.dtype)
        n, _, h, w = x.shape
        rows, cols = self.grid((h, w))
        low = area_resize(x, (max(1, round(h * self.scale1)), max(1, round(w * self.scale1))))
        a1 = self._attention(self.attention1, low, (rows, cols))                       # (N, tiles)
        first = self._draw(a1, self.samples)                                            # (N, S)
        tiles = _crops(x, first, self.tile, cols)                                       # (N * S, C, T, T)
        per_side = self.tile // self.subtile
        mid_side = max(1, round(self.tile * self.scale2))
        a2 = self._attention(self.attention2, area_resize(tiles, (mid_side, mid_side)), (per_side, per_side))
        second = self._draw(a2, 1)                                                      # (N * S, 1)
        subtiles = _crops(tiles, second, self.subtile, per_side)                        # (N * S, C, t, t)
        maps = self.backbone(subtiles)
        features = torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1).reshape(n, self.samples, -1)
        q = a1.gather(1, first) * a2.gather(1, second).reshape(n, self.samples)         # (N, S)
        weight = (q / q.detach()).to(features.dtype)
        aggregate = (weight[:, :, None] * features).mean(dim=1)
        return self.classifier(aggregate), _entropy(a1) + _entropy(a2)

    def forward(self, images: Any) -> torch.Tensor:
        return self.attend(images)[0]

    def micro_step(self, images: Any, labels: torch.Tensor, *, device_type: str, accumulate: int = 1,
                   amp_dtype: torch.dtype | None = None,
                   scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, the loss with the entropy regulariser, backward of ``/ accumulate``; returns the
        cross-entropy (without the regulariser) and the logits, detached."""
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, entropy = self.attend(images)
            loss = loss_of(logits, labels)
        scaled = (loss - self.entropy * entropy) / accumulate
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return loss.detach(), logits.detach()


def build_zoomin(trunk: str, num_classes: int, in_channels: int, *, weights: str | None = None,
                 trunk_kwargs: dict | None = None, **options: Any) -> ZoomInClassifier:
    """Zoom-In over a named trunk of the registry; ``options``: :class:`ZoomInClassifier`'s keywords
    (``tile``, ``subtile``, ``scale1``, ``scale2``, ``samples``, ``entropy``, ...)."""
    backbone, channels = build_trunk(trunk, in_channels, weights, **(trunk_kwargs or {}))
    return ZoomInClassifier(backbone, channels, num_classes, in_channels, **options)
