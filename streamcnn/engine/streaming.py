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
``torch.utils.checkpoint`` does), so the recomputation matches the forward; so are the
masks of train-mode stochastic depth (:mod:`streamcnn.engine.droppath`), drawn once per
step and replayed for every tile.

The backward is one public primitive, :func:`stream_backward`: the autograd Function uses
it, and so does anything else that needs a streamed gradient (an input-gradient saliency
map). With ``pool="meanmax"`` the forward pools tile by tile
(:class:`streamcnn.engine.pooling.MeanMaxPool`) and the feature map never exists whole.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from streamcnn.engine.droppath import DropMasks, replaying
from streamcnn.engine.geometry import Tile, TilePlan, TrunkGeometry, UnsupportedLayerError, tile_plan
from streamcnn.engine.pooling import POOLS, MeanMaxPool, global_mean_max
from streamcnn.engine.segments import run
from streamcnn.engine.windows import RegionSource, StreamInput, Windows, read_windows
from streamcnn.utils import allocator

__all__ = ["RegionSource", "StreamingModule", "stream_backward", "TileGradient", "LIMITED_DEVICES"]

#: Device types whose kernels (cuDNN, some CUDA ops) index tensors with 32 bits: where
#: ``StreamingModule.max_elements`` applies. CPU kernels index with 64 bits.
LIMITED_DEVICES: tuple[str, ...] = ("cuda",)

#: dL/d(region of one tile) given ``(tile index, tile, the recomputed region)``.
TileGradient = Callable[[int, Tile, torch.Tensor], torch.Tensor]


def _region(t: torch.Tensor, rect) -> torch.Tensor:
    (r0, r1), (c0, c1) = rect
    return t[:, :, r0:r1, c0:c1]


def _wait_for_host_copies(features: torch.Tensor | None, device: torch.device) -> None:
    """Offload: the tiles reach the pinned host feature map by ``non_blocking`` copies, which a host
    reader (heatmaps, predictions, user code) could otherwise read before they land."""
    if features is not None and features.device.type == "cpu" and device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _check_pool(pool: str | None) -> str | None:
    if pool is not None and pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)} or None")
    return pool


def stream_backward(engine: "StreamingModule", x: StreamInput | Windows,
                    grad_features: torch.Tensor | TileGradient, *, params: Sequence[torch.Tensor] = (),
                    on_input_grad: Callable[[Tile, torch.Tensor], None] | None = None,
                    plan: TilePlan | None = None, masks: DropMasks | None = None,
                    autocast: tuple[bool, torch.dtype] | None = None) -> list[torch.Tensor | None]:
    """The streamed backward: for each tile, recompute its window with grad and send back its share.

    ``grad_features`` is dL/dF (the whole feature map) or a :data:`TileGradient` giving each
    tile's share (e.g. from pooled statistics, when F never existed whole). Returns the
    gradients of ``params`` summed over tiles (None where unused); ``on_input_grad(tile,
    grad_window)`` receives each window's input gradient (windows overlap: sum them to get
    dL/dx). ``plan``: the tiles (default: the engine's backward plan, one whole-image tile
    when ``tile_size`` is None). ``masks``: the drop-path masks of the forward (default: drawn
    once here, for all tiles). ``autocast``: (enabled, dtype) of the forward (default: now).
    """
    device = engine.compute_device
    windows = x if isinstance(x, Windows) else read_windows(x, device, engine.compute_dtype, engine.memory_format)
    image_size = windows.shape[2:]
    if plan is None:
        plan = engine.plan(image_size) if engine.tile_size is not None else tile_plan(
            engine.geometry, image_size, max(image_size))
    engine.check_elements(windows.shape[:2], plan)
    if masks is None:
        masks = DropMasks.draw(engine.module, windows.shape[0], device, engine.compute_dtype)
    enabled, dtype = autocast or (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
    params = list(params)
    if not params and on_input_grad is None:
        raise ValueError("stream_backward needs parameters or an input-gradient receiver")
    grad_params: list[torch.Tensor | None] = [None] * len(params)
    with replaying(masks):
        for i, (tile, window) in enumerate(engine._progress(windows.each(plan.tiles), len(plan.tiles), "backward")):
            if on_input_grad is not None:
                window = window.detach().requires_grad_(True)
            with torch.enable_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled):
                out = _region(run(engine.module, window, engine.checkpoint), tile.crop)
            if isinstance(grad_features, torch.Tensor):
                g = _region(grad_features, tile.region).to(device, non_blocking=True)
            else:
                g = grad_features(i, tile, out.detach())
            wrt = params + ([window] if on_input_grad is not None else [])
            grads = torch.autograd.grad(out, wrt, g.to(out.dtype), allow_unused=True)
            for j, gp in enumerate(grads[: len(params)]):
                if gp is not None:
                    grad_params[j] = gp if grad_params[j] is None else grad_params[j].add_(gp)
            if on_input_grad is not None and grads[-1] is not None:
                on_input_grad(tile, grads[-1])
            del out, grads, wrt, window, g
            allocator.release_cached(device)
    return grad_params


class _StreamFunction(torch.autograd.Function):
    """Forward: tiles without grad (into a feature map, or pooled). Backward: :func:`stream_backward`."""

    @staticmethod
    def forward(ctx, engine: "StreamingModule", plan: TilePlan, forward_plan: TilePlan, windows: Windows,
                x: torch.Tensor | None, pool: str | None, *params: torch.Tensor) -> torch.Tensor:
        device = engine.compute_device
        ctx.engine, ctx.plan, ctx.windows, ctx.params = engine, plan, windows, params
        ctx.autocast = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
        ctx.x_meta = None if x is None else (x.shape, x.dtype, x.device)
        ctx.masks = DropMasks.draw(engine.module, windows.shape[0], device, engine.compute_dtype)
        ctx.pool = MeanMaxPool(forward_plan.output_size) if pool is not None else None
        ctx.set_materialize_grads(False)
        features = None
        target = engine.output_device or device
        allocator.release_cached(device)
        tiles = forward_plan.tiles
        with replaying(ctx.masks):
            for tile, window in engine._progress(windows.each(tiles), len(tiles), "forward"):
                out = _region(engine.module(window), tile.crop)
                del window
                dtype = ctx.autocast[1] if ctx.autocast[0] and out.is_floating_point() else out.dtype
                if ctx.pool is not None:
                    ctx.pool.add(out)
                elif features is None:
                    n, c = out.shape[:2]
                    engine.check_elements((n, c), map_size=forward_plan.output_size)
                    pin = target.type == "cpu" and out.device.type == "cuda"
                    features = torch.empty((n, c, *forward_plan.output_size), dtype=dtype, device=target,
                                           pin_memory=pin)
                if features is not None:
                    _region(features, tile.region).copy_(out, non_blocking=True)
                del out
                allocator.release_cached(device)
        if ctx.pool is not None:
            return ctx.pool.pooled(dtype).to(target)
        _wait_for_host_copies(features, device)
        return features

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor | None):
        params = list(ctx.params)
        n_inputs = 6 + len(params)
        if grad is None:
            return (None,) * n_inputs
        grad_x = on_input_grad = None
        if ctx.x_meta is not None and ctx.needs_input_grad[4]:
            shape, dtype, x_device = ctx.x_meta
            grad_x = torch.zeros(shape, dtype=dtype, device=x_device)

            def on_input_grad(tile: Tile, g: torch.Tensor) -> None:
                (t, b), (l, r) = tile.window
                grad_x[:, :, t:b, l:r] += g.to(grad_x.device)

        grad_of: torch.Tensor | TileGradient = grad
        if ctx.pool is not None:
            pool, pooled_grad = ctx.pool, grad
            if pool.tiles != len(ctx.plan.tiles):
                raise RuntimeError("a pooled forward ran without grad and cannot be differentiated")
            grad_of = lambda i, _tile, region: pool.gradient(i, region, pooled_grad.to(region.device))  # noqa: E731
        grad_params = (stream_backward(ctx.engine, ctx.windows, grad_of, params=params, on_input_grad=on_input_grad,
                                       plan=ctx.plan, masks=ctx.masks, autocast=ctx.autocast)
                       if params or on_input_grad is not None else [])
        return (None, None, None, None, grad_x, None, *grad_params)


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
            each convolution or composite block (see :func:`streamcnn.engine.segments.segments`): inside each tile when
            streaming, over the whole image when ``tile_size`` is None. Larger tiles fit in
            the same memory.
        memory_format: the layout windows are given to ``module`` in; ``torch.channels_last``
            for a module converted with ``.to(memory_format=torch.channels_last)`` (faster under
            bf16 autocast on CPUs with native bf16, see :mod:`streamcnn.utils.cpu`).
        output_device: where the feature map lives (e.g. ``"cpu"`` for gigapixel images:
            pinned host memory); default: the compute device.
        progress: show a tqdm bar over tiles.
        pool: ``None`` returns the feature map (N, C, h, w). ``"meanmax"`` returns the (N, 2C)
            global mean and max per channel, ``cat([F.mean((2, 3)), F.amax((2, 3))])``, pooled
            tile by tile: the feature map never exists whole, and the gradient is autograd's,
            ties included (:class:`streamcnn.engine.pooling.MeanMaxPool`). A pooled step's
            forward uses the backward's tiles (``forward_tile_size`` then serves inference).
        max_elements: the most elements a tensor the engine makes may have (the feature map,
            an input window, the whole image when not streaming) when computing on a device
            whose kernels index with 32 bits (:data:`LIMITED_DEVICES`: CUDA). A one-line
            ``ValueError`` names the tensor and the fix; ``None``: no limit.

    The compute device is the device of the module's parameters. The input may be an
    (N, C, H, W) tensor on any device, or region source(s) read one window at a time.
    """

    def __init__(self, module: nn.Module, tile_size: int | Sequence[int] | None, *,
                 forward_tile_size: int | Sequence[int] | None = None, checkpoint: bool = False,
                 output_device: torch.device | str | None = None, progress: bool = False,
                 memory_format: torch.memory_format = torch.contiguous_format, pool: str | None = None,
                 max_elements: int | None = 2**31):
        super().__init__()
        self.module = module
        self.tile_size = tile_size
        self.forward_tile_size = forward_tile_size
        self.checkpoint = checkpoint
        self.output_device = torch.device(output_device) if output_device is not None else None
        self.progress = progress
        self.memory_format = memory_format
        self.pool = _check_pool(pool)
        self.max_elements = max_elements
        self._plans: dict[tuple, TilePlan] = {}
        self._geometry_key: tuple | None = None
        self._geometry: TrunkGeometry | None = None
        self._unstreamable: tuple | None = None

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

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype windows are read in: the trunk's floating-point parameters'."""
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    def check_elements(self, batch_channels: Sequence[int], plan: TilePlan | None = None,
                       map_size: Sequence[int] | None = None) -> None:
        """One-line ``ValueError`` when a window of ``plan`` or a feature map of ``map_size``
        (with ``batch_channels`` = (N, C) of that tensor) would reach ``max_elements``."""
        if self.max_elements is None or self.compute_device.type not in LIMITED_DEVICES:
            return
        n, c = batch_channels
        limit = f"the limit of {self.max_elements:,} elements (StreamingModule.max_elements; CUDA kernels index with 32 bits)"
        if plan is not None and n * c * math.prod(plan.max_window) >= self.max_elements:
            h, w = plan.max_window
            raise ValueError(f"an input window of {n}x{c}x{h}x{w} = {n * c * h * w:,} elements reaches {limit}. "
                             "Fix: a smaller tile_size / forward_tile_size")
        if map_size is not None and n * c * math.prod(map_size) >= self.max_elements:
            h, w = map_size
            raise ValueError(f"the feature map of {n}x{c}x{h}x{w} = {n * c * h * w:,} elements reaches {limit}. "
                             "Fix: pool it tile by tile (pool='meanmax', for a pool head), read a lower-resolution "
                             "level or a smaller image")

    def _progress(self, items: Iterator, total: int, what: str) -> Iterator:
        if not self.progress or total < 2:
            return items
        from tqdm.auto import tqdm
        return tqdm(items, total=total, desc=f"stream {what}", unit="tile", leave=False)

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: StreamInput) -> torch.Tensor:
        """The feature map of ``x``, or with ``pool`` its (N, 2C) global mean and max."""
        return self._stream(x, self.pool)

    def feature_map(self, x: StreamInput) -> torch.Tensor:
        """The whole feature map of ``x`` whatever ``pool`` says (e.g. for a class-activation map)."""
        return self._stream(x, None)

    def _stream(self, x: StreamInput, pool: str | None) -> torch.Tensor:
        _check_pool(pool)
        windows = read_windows(x, self.compute_device, self.compute_dtype, self.memory_format)
        self._check_channels(windows.shape[1])
        if self.tile_size is None:
            h, w = windows.shape[2:]
            if (self.max_elements is not None and self.compute_device.type in LIMITED_DEVICES
                    and math.prod(windows.shape) >= self.max_elements):
                raise ValueError(f"the image of {'x'.join(map(str, windows.shape))} elements reaches the limit of "
                                 f"{self.max_elements:,} elements (StreamingModule.max_elements). Fix: stream it "
                                 "(a tile_size)")
            out = run(self.module, windows.read(((0, h), (0, w))), self.checkpoint)
            if pool is not None:
                out = global_mean_max(out)
            return out if self.output_device is None else out.to(self.output_device)
        params = [p for p in self.module.parameters() if p.requires_grad]
        tensor_in = x if isinstance(x, torch.Tensor) else None
        plan = self.plan(windows.shape[2:])
        needs_grad = torch.is_grad_enabled() and (bool(params) or (tensor_in is not None and tensor_in.requires_grad))
        # A pooled step pools on the backward's tiles, so each tile's maxima are the ones it recomputes.
        forward_plan = plan if pool is not None and needs_grad else self.forward_plan(windows.shape[2:])
        self.check_elements(windows.shape[:2], forward_plan)
        self.check_elements(windows.shape[:2], plan)
        return _StreamFunction.apply(self, plan, forward_plan, windows, tensor_in, pool, *params)

    def _check_channels(self, channels: int) -> None:
        """One line, before anything runs, when the image's channels do not fit the trunk."""
        key = self._training_state()
        if self._unstreamable == key:
            return
        try:
            geometry = self.geometry
        except UnsupportedLayerError:
            self._unstreamable = key  # only ever run conventionally: torch's own error stands
            return
        geometry.check_channels(channels)

    def extra_repr(self) -> str:
        return (f"tile_size={self.tile_size}, forward_tile_size={self.forward_tile_size}, "
                f"checkpoint={self.checkpoint}, output_device={self.output_device}, pool={self.pool}")
