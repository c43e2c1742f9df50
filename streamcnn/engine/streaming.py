"""Exact tiled streaming of a CNN trunk, integrated with autograd.

:class:`StreamingModule` wraps a trunk of local layers. Its forward pass partitions
the feature map into disjoint tiles (see :func:`streamcnn.engine.geometry.tile_plan`), runs
the trunk without grad on each tile's input window and writes the tile's region into
the feature map. Nothing else is kept.

Its backward pass receives dL/dF. For each tile it crops the input window again,
runs the trunk *with* grad, and asks autograd for the gradient of the tile's region
with the matching slice of dL/dF. Because the regions partition the feature map and
every window contains the whole dependency cone of its region, the sum over tiles is
exactly the full-image gradient; values that are wrong near a window's edge lie
outside the cone and receive zero gradient. Plain autograd does all the calculus, so
every local layer gets exact gradients without custom kernels.

The no-grad forward keeps no activations beyond the layer it is computing, so it may use
its own, larger tiles (``forward_tile_size``; often the whole image): the feature map it
writes is the same whatever the partition. Only the backward, which holds one tile's
activations, needs small tiles. Compute then falls from ``rf (2 Tf + Tb)`` towards
``rf_fwd Tf + rf (Tf + Tb)`` (``rf``: a plan's window area over the image area).

Under autocast the feature map (and therefore its gradient) is stored in the autocast
dtype: half the bytes of a float32 one, which matters for gigapixel images whose
feature map lives in host memory.

On CPU, glibc's heap would keep freed tile-sized blocks (see :mod:`streamcnn.utils.allocator`);
the engine returns them to the system after each tile, so the process's memory follows
its tensors.

The parameter gradients are summed over tiles *inside* the backward and returned as
the gradients of the parameters passed to the autograd Function, so autograd
accumulates each ``.grad`` exactly once per step; DistributedDataParallel's hooks
therefore fire once per parameter, as they do for an ordinary module.

Autocast state is captured in forward and restored in backward (as
``torch.utils.checkpoint`` does), so the recomputation matches the forward.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint as _checkpoint

from streamcnn.utils import allocator
from streamcnn.engine.geometry import Tile, TilePlan, TrunkGeometry, UnsupportedLayerError, tile_plan
from streamcnn.utils.units import pixels_to_unit

__all__ = ["RegionSource", "StreamingModule"]


@runtime_checkable
class RegionSource(Protocol):
    """An image read a window at a time (e.g. :func:`streamcnn.io.open_image`).

    ``shape`` is (C, H, W) at full resolution; ``read_region(top, left, height, width)``
    returns that window as a (C, h, w) numpy array or tensor.
    """

    shape: tuple[int, int, int]

    def read_region(self, top: int, left: int, height: int, width: int) -> Any: ...


StreamInput = Union[torch.Tensor, RegionSource, Sequence[RegionSource]]


@dataclass
class _Windows:
    """Reads input windows, from a tensor or from region sources, onto the compute device."""

    shape: tuple[int, int, int, int]            # N, C, H, W
    read: Callable[[tuple[tuple[int, int], tuple[int, int]]], torch.Tensor]
    prefetch: bool = False                      # decode the next window while this one computes

    def each(self, tiles: Sequence[Tile]) -> Iterator[tuple[Tile, torch.Tensor]]:
        """``(tile, window)`` in order; with ``prefetch``, the next read runs in a thread."""
        if not self.prefetch or len(tiles) < 2:
            for tile in tiles:
                yield tile, self.read(tile.window)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamcnn-read") as pool:
            pending = pool.submit(self.read, tiles[0].window)
            for i, tile in enumerate(tiles):
                window = pending.result()
                if i + 1 < len(tiles):
                    pending = pool.submit(self.read, tiles[i + 1].window)
                yield tile, window


def _windows_for(x: StreamInput, device: torch.device, dtype: torch.dtype,
                 memory_format: torch.memory_format = torch.contiguous_format) -> _Windows:
    if isinstance(x, torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"StreamingModule expects an (N, C, H, W) tensor, got shape {tuple(x.shape)}")

        def read(win):
            (t, b), (l, r) = win
            return x[:, :, t:b, l:r].to(device, non_blocking=True).contiguous(memory_format=memory_format)

        return _Windows(tuple(x.shape), read)  # type: ignore[arg-type]

    sources = [x] if isinstance(x, RegionSource) else list(x)
    if not sources or not all(isinstance(s, RegionSource) for s in sources):
        raise TypeError(
            "StreamingModule input must be an (N, C, H, W) tensor, an object with `shape` and "
            f"`read_region(top, left, height, width)`, or a list of such objects; got {type(x).__name__}"
        )
    shapes = {tuple(s.shape) for s in sources}
    if len(shapes) != 1:
        raise ValueError(f"a batch of region sources must share one shape, got {sorted(shapes)}")
    c, h, w = shapes.pop()

    def read(win):
        (t, b), (l, r) = win
        crops = [torch.as_tensor(np.ascontiguousarray(s.read_region(t, l, b - t, r - l))) for s in sources]
        batch = torch.stack(crops)
        if device.type == "cuda":
            batch = batch.pin_memory()
        return pixels_to_unit(batch.to(device, non_blocking=True), dtype).contiguous(memory_format=memory_format)

    return _Windows((len(sources), c, h, w), read, prefetch=True)


def _segments(module: nn.Module) -> list[nn.Module]:
    """Checkpoint segments of ``module``.

    The leaves of nested ``nn.Sequential`` containers, grouped so that each segment
    starts at a convolution or a composite block (e.g. a residual block) and carries
    the light layers after it (norm, activation, pooling). A segment therefore never
    starts at an in-place activation, whose input the previous segment would have saved.
    """
    def leaves(m: nn.Module):
        if isinstance(m, nn.Sequential):
            for child in m:
                yield from leaves(child)
        else:
            yield m

    groups: list[list[nn.Module]] = []
    for leaf in leaves(module):
        heavy = isinstance(leaf, nn.modules.conv._ConvNd) or any(True for _ in leaf.children())
        if heavy or not groups:
            groups.append([leaf])
        else:
            groups[-1].append(leaf)
    return [g[0] if len(g) == 1 else nn.Sequential(*g) for g in groups]


def _run(module: nn.Module, x: torch.Tensor, checkpoint: bool) -> torch.Tensor:
    if not checkpoint or not torch.is_grad_enabled():
        return module(x)
    for seg in _segments(module):
        x = _checkpoint(seg, x, use_reentrant=False)
    return x


def _region(t: torch.Tensor, rect) -> torch.Tensor:
    (r0, r1), (c0, c1) = rect
    return t[:, :, r0:r1, c0:c1]


class _StreamFunction(torch.autograd.Function):
    """Forward: tiles without grad. Backward: tiles recomputed with grad, summed."""

    @staticmethod
    def forward(ctx, engine: "StreamingModule", plan: TilePlan, forward_plan: TilePlan, windows: _Windows,
                x: torch.Tensor | None, *params: torch.Tensor) -> torch.Tensor:
        device = engine.compute_device
        ctx.engine, ctx.plan, ctx.windows, ctx.params = engine, plan, windows, params
        ctx.autocast = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
        ctx.x_meta = None if x is None else (x.shape, x.dtype, x.device)
        ctx.set_materialize_grads(False)
        features = None
        allocator.release_cached(device)
        tiles = forward_plan.tiles
        for tile, window in engine._progress(windows.each(tiles), len(tiles), "forward"):
            out = _region(engine.module(window), tile.crop)
            del window
            if features is None:
                n, c = out.shape[:2]
                target = engine.output_device or out.device
                pin = target.type == "cpu" and out.device.type == "cuda"
                dtype = ctx.autocast[1] if ctx.autocast[0] and out.is_floating_point() else out.dtype
                features = torch.empty((n, c, *forward_plan.output_size), dtype=dtype, device=target,
                                       pin_memory=pin)
            _region(features, tile.region).copy_(out, non_blocking=True)
            del out
            allocator.release_cached(device)
        return features

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_features: torch.Tensor | None):
        engine, plan, windows, params = ctx.engine, ctx.plan, ctx.windows, list(ctx.params)
        n_inputs = 5 + len(params)
        if grad_features is None:
            return (None,) * n_inputs
        device = engine.compute_device
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        grad_x = None
        if ctx.x_meta is not None and ctx.needs_input_grad[4]:
            shape, dtype, x_device = ctx.x_meta
            grad_x = torch.zeros(shape, dtype=dtype, device=x_device)
        enabled, dtype = ctx.autocast
        for tile, window in engine._progress(windows.each(plan.tiles), len(plan.tiles), "backward"):
            if grad_x is not None:
                window = window.detach().requires_grad_(True)
            g = _region(grad_features, tile.region).to(device, non_blocking=True)
            with torch.enable_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled):
                out = _region(_run(engine.module, window, engine.checkpoint), tile.crop)
            wrt = params + ([window] if grad_x is not None else [])
            grads = torch.autograd.grad(out, wrt, g.to(out.dtype), allow_unused=True)
            for i, gp in enumerate(grads[: len(params)]):
                if gp is not None:
                    grad_params[i] = gp if grad_params[i] is None else grad_params[i].add_(gp)
            if grad_x is not None and grads[-1] is not None:
                (t, b), (l, r) = tile.window
                grad_x[:, :, t:b, l:r] += grads[-1].to(grad_x.device)
            del out, grads, wrt, window, g
            allocator.release_cached(device)
        return (None, None, None, None, grad_x, *grad_params)


class StreamingModule(nn.Module):
    """Run ``module`` over an image tile by tile, with exactly the full-image gradients.

    Args:
        module: a trunk of local layers (see :class:`streamcnn.engine.geometry.TrunkGeometry`).
        tile_size: side (int or (h, w)) of the disjoint image area each tile computes, in
            image pixels; rounded down to the trunk's stride. Each tile also reads a halo of
            receptive field around it. Larger tiles: fewer, less overlapping tiles (faster),
            more memory per tile. ``None`` runs the trunk conventionally on the whole image
            (no tiling), which is what a memory plan chooses when the image fits.
        forward_tile_size: the same for the no-grad forward pass, which keeps no
            activations and so can use much larger tiles; ``None``: ``tile_size``. A size at
            least the image's runs the forward on the whole image in one window. Gradients
            do not depend on it (the feature map is the same for any partition).
        checkpoint: recompute activations during the backward, in segments that start at
            each convolution or composite block (see ``_segments``): inside each tile when
            streaming, over the whole image when ``tile_size`` is None. Larger tiles fit in
            the same memory.
        memory_format: the layout windows are given to ``module`` in; ``torch.channels_last``
            for a module converted with ``.to(memory_format=torch.channels_last)`` (faster under
            bf16 autocast on CPUs with native bf16, see :mod:`streamcnn.utils.cpu`).
        output_device: where the feature map lives (e.g. ``"cpu"`` for gigapixel images:
            pinned host memory); default: the compute device.
        progress: show a tqdm bar over tiles.

    The compute device is the device of the module's parameters. The input may be an
    (N, C, H, W) tensor on any device, or region source(s) read one window at a time.
    """

    def __init__(self, module: nn.Module, tile_size: int | Sequence[int] | None, *,
                 forward_tile_size: int | Sequence[int] | None = None, checkpoint: bool = False,
                 output_device: torch.device | str | None = None, progress: bool = False,
                 memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__()
        self.module = module
        self.tile_size = tile_size
        self.forward_tile_size = forward_tile_size
        self.checkpoint = checkpoint
        self.output_device = torch.device(output_device) if output_device is not None else None
        self.progress = progress
        self.memory_format = memory_format
        self._plans: dict[tuple, TilePlan] = {}
        self._geometry_key: tuple | None = None
        self._geometry: TrunkGeometry | None = None

    # -- geometry ----------------------------------------------------------------------
    def _training_state(self) -> tuple:
        return tuple(m.training for m in self.module.modules())

    @property
    def geometry(self) -> TrunkGeometry:
        """The trunk's geometry, re-validated whenever a train/eval mode changed."""
        key = self._training_state()
        if self._geometry is None or key != self._geometry_key:
            self._geometry = TrunkGeometry(self.module)
            self._geometry_key = key
            self._plans.clear()
        return self._geometry

    def plan(self, image_size: Sequence[int]) -> TilePlan:
        """The :class:`TilePlan` of the backward pass for images of ``image_size`` (H, W)."""
        return self._cached_plan(image_size, self.tile_size)

    def forward_plan(self, image_size: Sequence[int]) -> TilePlan:
        """The :class:`TilePlan` of the no-grad forward pass (``forward_tile_size``)."""
        if self.forward_tile_size is None:
            return self.plan(image_size)
        return self._cached_plan(image_size, self.forward_tile_size)

    def _cached_plan(self, image_size: Sequence[int], tile_size) -> TilePlan:
        geometry = self.geometry
        key = (tuple(image_size), tile_size)
        if key not in self._plans:
            self._plans[key] = tile_plan(geometry, image_size, tile_size)
        return self._plans[key]

    def use_plan(self, plan: TilePlan) -> None:
        """Stream images of ``plan.image_size`` with ``plan`` instead of the one
        :meth:`plan` would make (e.g. a simulation's reduced plan); forgotten when
        ``tile_size`` or the geometry changes."""
        self.geometry  # noqa: B018 - validate first, so a mode change does not drop the plan
        self._plans[(tuple(plan.image_size), self.tile_size)] = plan

    @property
    def compute_device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        for b in self.module.buffers():
            return b.device
        return torch.device("cpu")

    def _compute_dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    def _progress(self, items: Iterator, total: int, what: str) -> Iterator:
        if not self.progress or total < 2:
            return items
        from tqdm.auto import tqdm
        return tqdm(items, total=total, desc=f"stream {what}", unit="tile", leave=False)

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: StreamInput) -> torch.Tensor:
        windows = _windows_for(x, self.compute_device, self._compute_dtype(), self.memory_format)
        self._check_channels(windows.shape[1])
        if self.tile_size is None:
            h, w = windows.shape[2:]
            out = _run(self.module, windows.read(((0, h), (0, w))), self.checkpoint)
            return out if self.output_device is None else out.to(self.output_device)
        plan = self.plan(windows.shape[2:])
        forward_plan = self.forward_plan(windows.shape[2:])
        params = [p for p in self.module.parameters() if p.requires_grad]
        tensor_in = x if isinstance(x, torch.Tensor) else None
        return _StreamFunction.apply(self, plan, forward_plan, windows, tensor_in, *params)

    def _check_channels(self, channels: int) -> None:
        """One line, before anything runs, when the image's channels do not fit the trunk."""
        key = self._training_state()
        if getattr(self, "_unstreamable", None) == key:
            return
        try:
            geometry = self.geometry
        except UnsupportedLayerError:
            self._unstreamable = key  # only ever run conventionally: torch's own error stands
            return
        geometry.check_channels(channels)

    def extra_repr(self) -> str:
        return (f"tile_size={self.tile_size}, forward_tile_size={self.forward_tile_size}, "
                f"checkpoint={self.checkpoint}, output_device={self.output_device}")
