"""Where a trained model looks: class-activation maps and exact input-gradient saliency.

:func:`explain` runs one image (a tensor, a reader or a slide view) through a
:class:`~streamcnn.models.classifier.StreamingClassifier` and returns its logits and two maps for a
class:

- ``cam``: Grad-CAM on the trunk's feature map, ``relu(sum_k mean(dlogit/dF_k) * F_k)``,
  one value per feature position (stride px of the image). It needs only the head's
  gradient, which works for every head (for the ``pool`` head it is the classic CAM up to
  the max-pool term).
- ``input_gradient``: dlogit/dx of the whole image, computed by the engine's streamed
  backward (:func:`streamcnn.engine.streaming.stream_backward`): each tile's input window
  is run through the trunk with grad and its share of dlogit/dF is sent back to the
  window, summed here over overlapping windows, so it equals full-image autograd; it never holds
  more than a tile's activations, and the (C, H, W) float32 sum goes to a memory-mapped
  file in ``scratch`` when it would exceed ``in_memory_bytes``. Saliency is its absolute
  value, maximum over channels (Simonyan et al. 2014).

:func:`write_heatmap_tiff` writes a map as a tiled pyramidal TIFF aligned with the slide
and :func:`write_overlay_png` draws it over the slide's thumbnail.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from streamcnn.utils.downsample import area_resize
from streamcnn.utils.files import atomic_write, save_figure
from streamcnn.engine.streaming import StreamingModule, stream_backward
from streamcnn.engine.windows import read_windows
from streamcnn.models.classifier import StreamingClassifier

__all__ = ["Explanation", "explain", "saliency", "to_uint8", "write_heatmap_tiff", "write_overlay_png"]


@dataclass
class Explanation:
    logits: torch.Tensor                 # (num_classes,)
    target: int                          # the class the maps explain
    cam: np.ndarray                      # (h, w) float32, feature-map resolution
    input_gradient: np.ndarray | None    # (C, H, W) of the image as the model reads it


def explain(model: StreamingClassifier, image: Any, target: int | None = None, *, input_gradient: bool = True,
            scratch: str | Path | None = None, in_memory_bytes: int = 2**29) -> Explanation:
    """Logits, Grad-CAM and (optionally) the streamed input gradient for ``target`` (default: predicted)."""
    engine = model.trunk
    head_device = next(model.head.parameters()).device
    with torch.no_grad():
        features = engine.feature_map(image[None] if isinstance(image, torch.Tensor) and image.dim() == 3 else image)
    features = features.to(head_device).requires_grad_(True)
    with torch.enable_grad():
        logits = model.head(features)[0]
        target = int(logits.argmax()) if target is None else int(target)
        (grad_features,) = torch.autograd.grad(logits[target], features)
    weights = grad_features.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * features.detach()).sum(dim=1))[0].float().cpu().numpy()
    grad_x = _input_gradient(engine, image, grad_features, scratch, in_memory_bytes) if input_gradient else None
    return Explanation(logits.detach().float().cpu(), target, cam, grad_x)


def _input_gradient(engine: StreamingModule, image: Any, grad_features: torch.Tensor, scratch,
                    in_memory_bytes: int) -> np.ndarray:
    source = image[None] if isinstance(image, torch.Tensor) and image.dim() == 3 else image
    windows = read_windows(source, engine.compute_device, engine.compute_dtype, engine.memory_format)
    _, c, h, w = windows.shape
    numpy_dtype = np.float64 if engine.compute_dtype == torch.float64 else np.float32
    if c * h * w * np.dtype(np.float32).itemsize > in_memory_bytes:
        folder = Path(scratch) if scratch is not None else Path(tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=folder, prefix=".input-gradient-", suffix=".npy", delete=False)
        handle.close()
        total = np.lib.format.open_memmap(handle.name, mode="w+", dtype=numpy_dtype, shape=(c, h, w))
        Path(handle.name).unlink()      # the mapping stays valid; nothing is left on disk
    else:
        total = np.zeros((c, h, w), dtype=numpy_dtype)
    torch_dtype = torch.float64 if numpy_dtype == np.float64 else torch.float32

    def add(tile, grad: torch.Tensor) -> None:
        (t, b), (l_, r) = tile.window
        total[:, t:b, l_:r] += grad[0].to(torch_dtype).cpu().numpy()

    stream_backward(engine, windows, grad_features, on_input_grad=add)
    return total


def saliency(input_gradient: np.ndarray) -> np.ndarray:
    """(H, W): the largest absolute input gradient over channels."""
    return np.abs(input_gradient).max(axis=0)


def to_uint8(values: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """0..255, scaled so the ``percentile``-th value (and above) is 255."""
    top = float(np.percentile(values, percentile)) if values.size else 0.0
    top = top if top > 0 else float(values.max()) if values.size and values.max() > 0 else 1.0
    return (np.clip(values / top, 0, 1) * 255).round().astype(np.uint8)


def _shrink(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return area_resize(torch.from_numpy(image.astype(np.float32)), size).round().numpy().astype(np.uint8)


def write_heatmap_tiff(heatmap: np.ndarray, path: str | Path, level_shapes: Sequence[tuple[int, int]],
                       box: tuple[int, int, int, int] | None = None, mpp: float | None = None,
                       tile: int = 256) -> Path:
    """Write ``heatmap`` (uint8, covering ``box`` of the first level) as a pyramidal TIFF.

    ``level_shapes`` are the (H, W) of the pyramid to write, finest first (the slide's own
    levels from the level the model read, so the heatmap lines up level for level with the
    slide); the map is placed at ``box`` (top, left, height, width, default the whole level,
    resized to it if its resolution differs) on a zero canvas. ``mpp`` (of the first level)
    is written as the resolution tags.
    """
    import tifffile

    h0, w0 = level_shapes[0]
    top, left, bh, bw = box if box is not None else (0, 0, h0, w0)
    canvas = np.zeros((h0, w0), dtype=np.uint8)
    canvas[top:top + bh, left:left + bw] = _upsample(heatmap, (bh, bw))
    levels = [canvas] + [_shrink(canvas, tuple(s)) for s in level_shapes[1:]]

    def write(tmp: Path) -> None:
        resolution = {}
        if mpp:
            resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
        with tifffile.TiffWriter(tmp, bigtiff=canvas.size > 2**31) as tif:
            tif.write(levels[0], tile=(tile, tile), compression="zlib", subifds=len(levels) - 1,
                      photometric="minisblack", **resolution)
            for level in levels[1:]:
                tif.write(level, tile=(tile, tile), compression="zlib", subfiletype=1, photometric="minisblack")
    return atomic_write(path, write)


def _upsample(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize (each feature position covers a block of pixels)."""
    if heatmap.shape == tuple(size):
        return heatmap
    rows = np.minimum(np.arange(size[0]) * heatmap.shape[0] // size[0], heatmap.shape[0] - 1)
    cols = np.minimum(np.arange(size[1]) * heatmap.shape[1] // size[1], heatmap.shape[1] - 1)
    return heatmap[np.ix_(rows, cols)]


def write_overlay_png(thumbnail: np.ndarray, heatmap: np.ndarray, path: str | Path, *, title: str = "",
                      box_fraction: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> Path:
    """``heatmap`` (uint8) over ``thumbnail`` ((C, h, w) uint8, the whole slide); the map covers
    ``box_fraction`` (top, left, height, width as fractions of the slide)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, h, w = thumbnail.shape
    t, l_, bh, bw = box_fraction
    fig, ax = plt.subplots(figsize=(6, 6 * h / w + 0.4), dpi=100)
    picture = np.moveaxis(thumbnail, 0, -1)
    ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture[..., :3], cmap="gray")
    ax.imshow(heatmap, cmap="inferno", alpha=0.5, extent=(l_ * w, (l_ + bw) * w, (t + bh) * h, t * h),
              interpolation="nearest" if heatmap.shape[0] < h / 4 else "antialiased")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path, bbox_inches="tight")
