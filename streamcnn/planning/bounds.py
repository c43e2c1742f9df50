"""A plan request resolved once, and what no plan for it can escape: bounds and refusals.

:class:`Request` holds what :func:`streamcnn.planning.search.plan` was asked (the model as a
meta-device template, the image, the budget, the step's knobs) and what every candidate
shares: the trunk's geometry, node sizes and feature channels, computed once, and the tile
summaries (:mod:`streamcnn.planning.tiles`), computed once per tile size.

:func:`refusal_from_bounds` refuses, before anything is simulated, what arithmetic rules
out: on CUDA a feature map of ``max_elements`` or more that every plan must hold whole (all
but a pool head pooled tile by tile), and a budget below what every plan needs (parameters,
gradients, optimizer state and, unless pooled, the feature map and its gradient). Each
refusal is one line naming the limit, what the request needs, and the largest image side
that could fit (:attr:`BudgetError.largest_side`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn

from streamcnn.engine.streaming import StreamingModule
from streamcnn.planning.memory import estimate_from_live, budget_counts_suffix, budgeted_bytes, check_budget_counts
from streamcnn.planning.plannable import Plannable, input_shape, meta_copy
from streamcnn.planning.tracking import LiveStorageTracker
from streamcnn.planning.tiles import TileSummary, candidate_tile_sizes, summarize
from streamcnn.utils.units import format_size, pair, parse_size, resolve_dtype

__all__ = ["MAX_TENSOR_ELEMENTS", "BudgetError", "Request", "refusal_from_bounds", "register_model_builder"]

MAX_TENSOR_ELEMENTS = 2**31  # cuDNN (and some CUDA kernels) index tensors with 32-bit integers


class BudgetError(ValueError):
    """No plan fits the budget; ``min_bytes`` is the smallest budget that would fit (a lower
    bound when the refusal came from bounds), ``largest_side`` the largest image side
    (the longer one, same aspect) that could fit, when known."""

    def __init__(self, message: str, min_bytes: int, largest_side: int | None = None):
        super().__init__(message)
        self.min_bytes = min_bytes
        self.largest_side = largest_side


# The planner sits below the model registries, so planning a model *by name* uses the builder that
# ``streamcnn.models`` registers here when it is imported (``import streamcnn`` does).
_MODEL_BUILDER: Callable[..., nn.Module] | None = None


def register_model_builder(builder: Callable[..., nn.Module]) -> None:
    """Let :func:`~streamcnn.planning.search.plan` take trunk names: ``builder(name, head=, num_classes=,
    in_channels=)`` returns a :class:`Plannable` (``streamcnn.models`` registers ``build_model``)."""
    global _MODEL_BUILDER
    _MODEL_BUILDER = builder


def _template(model: nn.Module | str, in_channels: int, num_classes: int | None, head: str) -> tuple[nn.Module, str]:
    if isinstance(model, str):
        if _MODEL_BUILDER is None:
            raise TypeError(f"plan({model!r}): no model registry is loaded; import streamcnn.models first "
                            "or pass a model built with streamcnn.models.classifier.build_model")
        with torch.device("meta"):
            return _MODEL_BUILDER(model, head=head, num_classes=num_classes or 2, in_channels=in_channels), model
    if not isinstance(model, Plannable) or not isinstance(model.trunk, StreamingModule):
        raise TypeError(f"plan() needs a model name or a streamcnn.planning.plannable.Plannable (.trunk a StreamingModule, "
                        f".head, .configure_plan), got {type(model).__name__}; build one with "
                        "streamcnn.models.classifier.build_model")
    params = sum(p.numel() for p in model.parameters())
    return meta_copy(model), f"{type(model).__name__} ({params / 1e6:.1f}M params)"


@dataclass
class Request:
    """A plan request with everything its candidates share."""

    template: nn.Module
    name: str
    image: tuple[int, int]
    budget: int
    batch: int
    accumulate: int
    autocast_dtype: torch.dtype | None
    device_type: str
    optimizer: str
    weight_decay: float
    tile_sizes: Sequence[int] | None
    allow_offload: bool
    lazy_input: bool
    counts: str
    exhaustive: bool
    max_elements: int | None
    fixed: dict
    _summaries: dict = field(default_factory=dict, repr=False)

    @classmethod
    def resolve(cls, model: nn.Module | str, image_size: int | Sequence[int], budget: int | str, *, in_channels: int,
                num_classes: int | None, head: str, device: str | torch.device, dtype, batch: int, accumulate: int,
                **knobs) -> "Request":
        """Check and resolve ``plan()``'s arguments (one-line errors) and build the template."""
        check_budget_counts(knobs["counts"])
        if batch < 1 or accumulate < 1:
            raise ValueError(f"batch and accumulate must be at least 1, got {batch} and {accumulate}")
        template, name = _template(model, in_channels, num_classes, head)
        return cls(template, name, pair(image_size), parse_size(budget), batch, accumulate, resolve_dtype(dtype),
                   torch.device(device).type, **knobs)

    # -- what every candidate shares ----------------------------------------------------------
    @property
    def dtype_name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]

    @property
    def limited(self) -> bool:
        """Whether tensors on the device must stay under ``max_elements`` (CUDA only)."""
        return self.device_type == "cuda" and self.max_elements is not None

    @property
    def pools(self) -> tuple[str, ...]:
        """The tile-by-tile pool modes the model's head can start from (``Plannable.trunk_pools``)."""
        return tuple(getattr(self.template, "trunk_pools", ()))

    @property
    def geometry(self):
        return self.template.trunk.geometry

    @property
    def feature_channels(self) -> int:
        if "channels" not in self._summaries:
            channels = input_shape(self.template, 1, 1)[1]
            probe = self.template.trunk.module(torch.empty(1, channels, 256, 256, device="meta"))
            self._summaries["channels"] = (probe.shape[1], probe.element_size())
        return self._summaries["channels"][0]

    def map_bytes(self, image: Sequence[int]) -> int:
        """Bytes of the feature map of a batch of ``image``-sized images."""
        self.feature_channels  # noqa: B018 - fills the probe
        itemsize = torch.finfo(self.autocast_dtype).bits // 8 if self.autocast_dtype else self._summaries["channels"][1]
        return self.batch * self.feature_channels * math.prod(self.geometry.output_size(image)) * itemsize

    def unstreamed_largest(self) -> int:
        """Elements of the largest tensor an unstreamed plan makes on the device: the image
        itself or a layer's output on the whole image (a forward on meta tensors)."""
        if "unstreamed" not in self._summaries:
            shape = input_shape(self.template, self.image, self.batch)
            with torch.no_grad(), LiveStorageTracker("meta") as tracker:
                self.template.trunk.module(torch.empty(shape, device="meta"))
            self._summaries["unstreamed"] = max(math.prod(shape), tracker.largest_elements)
        return self._summaries["unstreamed"]

    @property
    def map_elements(self) -> int:
        return self.batch * self.feature_channels * math.prod(self.geometry.output_size(self.image))

    def ladder(self) -> list[int]:
        sizes = self.tile_sizes if self.tile_sizes is not None else candidate_tile_sizes(
            self.image, max(self.geometry.output_stride))
        return sorted(set(int(t) for t in sizes))

    def summary(self, tile_size: int) -> TileSummary:
        key = ("tile", int(tile_size))
        if key not in self._summaries:
            if "sizes" not in self._summaries:
                self._summaries["sizes"] = self.geometry.node_sizes(self.image)
            self._summaries[key] = summarize(self.geometry, self.image, int(tile_size), self._summaries["sizes"])
        return self._summaries[key]

    # -- bounds -----------------------------------------------------------------------------
    def floor(self, image: Sequence[int], pooled: bool) -> tuple[int, dict[str, int]]:
        """Bytes (as the budget counts them) every plan for ``image`` needs, and their parts:
        parameters, buffers and optimizer state; the larger of the parameter gradients and the
        feature map held with its gradient (once, when it may be offloaded; not when pooled);
        on CPU the image unless read lazily."""
        trainable = sum(p.numel() * p.element_size() for p in self.template.parameters() if p.requires_grad)
        fixed = sum(t.numel() * t.element_size() for t in [*self.template.parameters(), *self.template.buffers()])
        parts = {"parameters and buffers": fixed, "optimizer state": 2 * trainable}
        held = 0 if pooled else (1 if self.device_type == "cuda" and self.allow_offload else 2) * self.map_bytes(image)
        if held > trainable:
            parts["the feature map and its gradient" if self.device_type == "cpu" or not self.allow_offload
                  else "the feature map"] = held
        else:
            parts["the gradients"] = trainable
        if self.device_type == "cpu" and not self.lazy_input:
            parts["the image"] = input_shape(self.template, tuple(image), self.batch)[1] * self.batch * math.prod(image) * 4
        live = sum(parts.values())
        return budgeted_bytes(estimate_from_live(self.device_type, live, 0), self.counts), parts

    def largest_side(self, fits) -> int | None:
        """The longest side (same aspect) for which ``fits(image)``, by bisection; None if none."""
        h, w = self.image
        longest, stride = max(h, w), max(self.geometry.output_stride)

        def scaled(side: int) -> tuple[int, int]:
            return max(1, round(h * side / longest)), max(1, round(w * side / longest))

        lo, hi = stride, longest
        if not fits(scaled(lo)):
            return None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(scaled(mid)) else (lo, mid)
        return lo

    def describe(self) -> str:
        h, w = self.image
        return f"{self.name} at {h}x{w} px (batch {self.batch}, {self.dtype_name}, {self.optimizer})"

    def refusal(self, smallest) -> BudgetError:
        """The refusal after a search in which nothing fit: what ``smallest`` (the candidate
        that needs least, simulated; None if every one makes a tensor over the limit) needs."""
        if smallest is None:
            return BudgetError(f"every plan on {self.device_type} for {self.describe()} makes a tensor of {self.max_elements:,} or more "
                               "elements, which CUDA kernels refuse whatever the budget; use smaller images, smaller "
                               "tiles or a trunk with fewer feature-map channels", 0)
        suggest = math.ceil(smallest.budgeted_bytes / 1e7) * 10**7
        others = (["a smaller batch"] if self.batch > 1 else []) + (["bf16"] if self.autocast_dtype is None else []) + \
            (["smaller tiles (tile_sizes=...)"] if smallest.tile_size else []) + \
            ([f"leaving {', '.join(sorted(self.fixed))} to the planner"] if self.fixed else []) + ["a smaller model"]
        hints = "; or try " + (", ".join(others[:-1]) + " or " if len(others) > 1 else "") + others[-1]
        of = budget_counts_suffix(self.counts)
        return BudgetError(
            f"no plan fits the budget of {format_size(self.budget)}{of} on {self.device_type} for {self.describe()}: "
            f"the smallest, "
            f"{smallest.label}, needs {format_size(smallest.budgeted_bytes)}{of}. Use a budget of at least "
            f"{format_size(suggest)}{hints}.", smallest.budgeted_bytes)


def refusal_from_bounds(request: Request) -> BudgetError | None:
    """The refusal arithmetic gives for ``request`` before any simulation, or None."""
    r = request
    pooled = "meanmax" in r.pools
    if r.limited and not pooled and r.map_elements >= r.max_elements:
        (oh, ow), c = r.geometry.output_size(r.image), r.feature_channels
        side = r.largest_side(lambda image: r.batch * c * math.prod(r.geometry.output_size(image)) < r.max_elements)
        return BudgetError(
            f"every plan on {r.device_type} for {r.describe()} holds the whole feature map on the device ({r.batch}x{c}x{oh}x{ow} = "
            f"{r.map_elements:,} elements; the head runs on it), over the limit of {r.max_elements:,} elements "
            f"(CUDA kernels index with 32 bits): the largest image side that fits is {side} px (a lower-resolution "
            "level), or use a pool head (--head pool), which pools tile by tile", 0, side)
    need, parts = r.floor(r.image, pooled)
    if r.budget >= need:
        return None
    side = r.largest_side(lambda image: r.floor(image, pooled)[0] <= r.budget)
    of = budget_counts_suffix(r.counts)
    what = "; ".join(f"{k} {format_size(v)}" for k, v in parts.items() if v)
    fits = (f", or images of at most {side} px a side (the largest that could fit)" if side else
            f"; no image size fits {format_size(r.budget)}{of}")
    return BudgetError(f"no plan fits the budget of {format_size(r.budget)}{of} on {r.device_type} for {r.describe()}: "
                       f"every plan needs at least {format_size(need)}{of} ({what}). Use a budget of at least "
                       f"{format_size(need)}{fits}.", need, side)
