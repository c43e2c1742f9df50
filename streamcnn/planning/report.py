"""What a memory plan reports: the candidates it weighed and the one it chose.

:class:`Candidate` is one way to run a training step with its predicted cost and peak;
:class:`PlanReport` holds them all and renders them for people (``str``: a table;
:meth:`PlanReport.plot`: a PNG of peak and cost against tile size) and programs
(:meth:`PlanReport.to_json`), and sets the chosen plan on a model (:meth:`PlanReport.apply`).
The search that fills them in is :mod:`streamcnn.planning.search`'s.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch.nn as nn

from streamcnn.utils.files import save_figure
from streamcnn.planning.flops import StepFlops
from streamcnn.planning.memory import CUDA_CONTEXT_BYTES, MemoryEstimate, budget_counts_suffix
from streamcnn.planning.plannable import Plannable
from streamcnn.utils.units import format_size

__all__ = ["Candidate", "PlanReport"]

MODES = ("conventional", "checkpoint", "stream", "stream+checkpoint")


@dataclass
class Candidate:
    """One way to run a training step, and what it is predicted to take.

    ``mode`` is one of :data:`MODES`; ``offload`` (a separate flag) keeps the streamed
    feature map and its gradient in host memory. ``predicted_peak_bytes`` is the allocator
    peak (what ``torch.cuda.max_memory_allocated`` reads on CUDA; the CPU allocator peak on
    CPU); ``predicted_device_bytes`` adds the CUDA reserved-memory and context allowances
    (on CPU: the predicted peak RSS). ``budgeted_bytes`` is the one of them the budget is
    compared with (the second unless the budget counts tensors). They are None, and ``fits``
    is None, for a plan that was not simulated because a cheaper one fits.
    ``forward_tile_size``: the no-grad forward's tile (None: the backward's; the image's
    side: one window), ``forward_overlap`` its overlap factor, ``forward_window`` its largest
    window. ``predicted_host_bytes``: host memory beside the device's (0 on CPU, where they
    are one). ``pool``: the trunk pools tile by tile for the head (``"meanmax"``), so the
    feature map never exists whole. ``bound``: not simulated but ruled out by a bound (a
    phase it shares with a simulated plan is over the budget); its bytes are then a lower
    bound. ``simulated``: its numbers come from a simulation of its own.
    """

    mode: str
    tile_size: int | None
    checkpoint: bool
    head_checkpoint: bool
    offload: bool
    n_tiles: int
    overlap_factor: float
    max_window: tuple[int, int] | None
    relative_cost: float
    predicted_peak_bytes: int | None = None
    predicted_device_bytes: int | None = None
    fits: bool | None = None
    too_large_tensor: bool = False   # on CUDA, a tensor of 2^31 or more elements (cuDNN refuses it)
    forward_tile_size: int | None = None
    forward_overlap: float | None = None
    forward_whole: bool = False      # the forward runs the whole image in one window
    predicted_host_bytes: int | None = None
    budgeted_bytes: int | None = None
    estimate: MemoryEstimate | None = field(default=None, repr=False)
    pool: str | None = None
    forward_window: tuple[int, int] | None = None
    bound: bool = False
    simulated: bool = False

    @property
    def name(self) -> str:
        return self.mode + (f" +pool {self.pool}" if self.pool else "") + (" +offload" if self.offload else "")

    @property
    def label(self) -> str:
        """The name and the tile size, as the table and messages print it."""
        return self.name + (f" {self.tile_size} px" if self.tile_size else "") + self.forward_label

    @property
    def forward_label(self) -> str:
        if self.forward_tile_size is None:
            return ""
        return " (forward: whole image)" if self.forward_whole else f" (forward {self.forward_tile_size} px)"

    def configure(self, model: nn.Module) -> None:
        """Set ``model``'s plan knobs (a :class:`~streamcnn.planning.plannable.Plannable`)."""
        if not isinstance(model, Plannable):
            raise TypeError(f"a plan configures a StreamingClassifier or another streamcnn.planning.plannable.Plannable "
                            f"(.trunk, .head, .configure_plan), got {type(model).__name__}; build one with "
                            "streamcnn.models.classifier.build_model")
        pool = {"pool": self.pool} if self.pool is not None or getattr(model, "trunk_pools", ()) else {}
        model.configure_plan(tile_size=self.tile_size, checkpoint=self.checkpoint,
                             head_checkpoint=self.head_checkpoint, output_device="cpu" if self.offload else None,
                             forward_tile_size=self.forward_tile_size, **pool)

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("estimate")
        out["name"] = self.name
        return out


@dataclass
class PlanReport:
    """The candidates, the chosen plan and why; ``str(report)`` is the table."""

    chosen: Candidate
    candidates: list[Candidate]
    budget_bytes: int
    model: str
    image_size: tuple[int, int]
    batch: int
    dtype: str
    device: str
    optimizer: str
    flops: StepFlops
    planning_seconds: float
    measured: MemoryEstimate | None = None
    accumulate: int = 1
    fixed: dict = field(default_factory=dict)   # knobs the caller fixed (constraints), by name
    counts: str = "process"                     # what the budget limits: streamcnn.planning.memory.BUDGET_COUNTS
    simulations: int = 0                        # steps simulated to choose

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - int(self.chosen.budgeted_bytes or 0)

    @property
    def reason(self) -> str:
        cheaper = [c for c in self.candidates if c.fits is False and (c.offload, c.relative_cost)
                   < (self.chosen.offload, self.chosen.relative_cost)]
        of = budget_counts_suffix(self.counts)
        why = f"the fastest plan predicted to fit {format_size(self.budget_bytes)}{of}"
        if cheaper:
            shown = ", ".join(f"{c.label} makes a tensor of 2^31 or more elements, which cuDNN refuses"
                              if c.too_large_tensor else
                              f"{c.label} needs {'at least ' if c.bound else ''}{format_size(c.budgeted_bytes)}"
                              for c in cheaper[:3])
            why += f"; faster plans do not fit ({shown}{', ...' if len(cheaper) > 3 else ''})"
        return why

    def apply(self, model: nn.Module) -> nn.Module:
        """Configure ``model`` (a StreamingClassifier) with the chosen plan, in place."""
        self.chosen.configure(model)
        return model

    def to_json(self) -> dict:
        out = {
            "mode": self.chosen.mode,
            "tile_size": self.chosen.tile_size,
            "forward_tile_size": self.chosen.forward_tile_size,
            "pool": self.chosen.pool,
            "predicted_host_bytes": self.chosen.predicted_host_bytes,
            "checkpoint": self.chosen.checkpoint,
            "head_checkpoint": self.chosen.head_checkpoint,
            "offload": self.chosen.offload,
            "predicted_peak_bytes": self.chosen.predicted_peak_bytes,
            "predicted_device_bytes": self.chosen.predicted_device_bytes,
            "budget_bytes": self.budget_bytes,
            "budget_counts": self.counts,
            "budgeted_bytes": self.chosen.budgeted_bytes,
            "headroom_bytes": self.headroom_bytes,
            "relative_cost": self.chosen.relative_cost,
            "reason": self.reason,
            "model": self.model,
            "image_size": list(self.image_size),
            "batch": self.batch,
            "accumulate": self.accumulate,
            "fixed": dict(self.fixed),
            "dtype": self.dtype,
            "device": self.device,
            "optimizer": self.optimizer,
            "flops": asdict(self.flops),
            "planning_seconds": round(self.planning_seconds, 3),
            "simulations": self.simulations,
            "cuda_context_bytes": CUDA_CONTEXT_BYTES if self.device == "cuda" else 0,
            "candidates": [c.to_json() for c in self.candidates],
        }
        if self.measured is not None:
            out["measured_peak_bytes"] = self.measured.allocated_bytes
            out["measured_reserved_bytes"] = self.measured.reserved_bytes
            out["measured_device_bytes"] = self.measured.process_bytes
        return out

    def __str__(self) -> str:
        h, w = self.image_size
        batch = f"batch {self.batch}" + (f" x {self.accumulate} accumulated" if self.accumulate > 1 else "")
        head = (f"memory plan: {self.model}, {h}x{w} px, {batch}, {self.dtype}, {self.optimizer}, "
                f"on {self.device}; budget {format_size(self.budget_bytes)}"
                + budget_counts_suffix(self.counts))
        if self.fixed:
            head += "; fixed: " + ", ".join(f"{k}={v}" for k, v in self.fixed.items())
        columns = ("", "plan", "tile", "tiles", "overlap", "peak", "RSS" if self.device == "cpu" else "on device",
                   "host", "rel. time", "fits")
        rows = [columns]
        skipped = [c for c in self.candidates if c.fits is None]
        bounded = [c for c in self.candidates if c.bound]
        for c in self.candidates:
            if c.fits is None or c.bound:
                continue
            rows.append((
                "->" if c is self.chosen else "",
                c.name,
                (f"{c.tile_size} px" if c.tile_size else "-") + (
                    "" if c.forward_tile_size is None else " / fwd " + (
                        "whole" if c.forward_whole else f"{c.forward_tile_size} px")),
                str(c.n_tiles),
                f"{c.overlap_factor:.2f}",
                format_size(c.predicted_peak_bytes) if c.predicted_peak_bytes is not None else "-",
                format_size(c.predicted_device_bytes) if c.predicted_device_bytes is not None else "-",
                format_size(c.predicted_host_bytes) if c.predicted_host_bytes else "-",
                f"{c.relative_cost:.2f}x",
                "yes" if c.fits else ("no: tensor >= 2^31 elements" if c.too_large_tensor else "no"),
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
        table = ["  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip() for r in rows]
        if bounded:
            table.append(f"({len(bounded)} plans ruled out without a simulation: the whole feature map over the "
                         "element limit, or a phase they share with a plan above over the budget)")
        if skipped:
            table.append(f"({len(skipped)} slower plans not simulated: a faster one fits; "
                         "plan(..., exhaustive=True) or tools/plan.py --all shows them)")
        lines = [head, *table,
                 f"chosen: {self.chosen.label} - {self.reason}.",
                 f"headroom: {format_size(self.headroom_bytes)} "
                 f"({100 * self.headroom_bytes / self.budget_bytes:.0f}% of the budget)."]
        limits = "which the budget limits" if self.counts == "process" else "shown beside it"
        if self.device == "cuda":
            lines.append(f"'peak' is predicted torch.cuda.max_memory_allocated"
                         f"{', which the budget limits' if self.counts == 'tensors' else ''}; 'on device' adds "
                         f"reserved-memory fragmentation and the CUDA context ({format_size(CUDA_CONTEXT_BYTES)}), "
                         f"{limits}. CUDA allowances are not yet calibrated on a GPU. 'host' is the "
                         "host memory beside it (image, offloaded feature map and gradient).")
        else:
            lines.append(f"'peak' is the predicted tensor peak{', which the budget limits' if self.counts == 'tensors' else ''}; "
                         f"'RSS' the process's resident memory (torch runtime + tensors + heap), {limits}.")
        if self.measured is not None:
            lines.append(f"measured: peak {format_size(self.measured.allocated_bytes)}, "
                         f"on device {format_size(self.measured.process_bytes)} "
                         f"(predicted {format_size(self.chosen.predicted_peak_bytes)}).")
        lines.append(f"planned in {self.planning_seconds:.1f} s ({self.simulations} steps simulated).")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> Path:
        """Predicted peak and relative time against tile size, with the budget line (PNG)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        fig, (mem, cost) = plt.subplots(1, 2, figsize=(11, 4.2))
        styles = {"conventional": "tab:red", "checkpoint": "tab:orange", "stream": "tab:blue",
                  "stream+checkpoint": "tab:green"}
        for c in self.candidates:
            if c.tile_size is None and c.predicted_device_bytes is not None:
                mem.axhline(c.predicted_device_bytes / 1e9, color=styles[c.mode], ls=":", label=c.name)
                cost.axhline(c.relative_cost, color=styles[c.mode], ls=":", label=c.name)
        for mode in ("stream", "stream+checkpoint"):
            for offload in (False, True):
                best: dict[int, Candidate] = {}   # per tile: the cheapest simulated forward tile
                for c in self.candidates:
                    if c.mode == mode and c.offload == offload and c.predicted_device_bytes is not None:
                        if c.tile_size not in best or c.relative_cost < best[c.tile_size].relative_cost:
                            best[c.tile_size] = c
                pts = sorted(best.items())
                if not pts:
                    continue
                label = mode + (" +offload" if offload else "")
                ls = "--" if offload else "-"
                mem.plot([t for t, _ in pts], [c.predicted_device_bytes / 1e9 for _, c in pts], ls,
                         marker="o", color=styles[mode], label=label)
                if not offload:  # offloading moves bytes, not FLOPs: same cost curve
                    cost.plot([t for t, _ in pts], [c.relative_cost for _, c in pts], ls, marker="o",
                              color=styles[mode], label=label)
        mem.axhline(self.budget_bytes / 1e9, color="black", lw=2, label=f"budget {format_size(self.budget_bytes)}")
        if self.chosen.tile_size is not None:
            mem.plot([self.chosen.tile_size], [self.chosen.predicted_device_bytes / 1e9], "k*", ms=14,
                     label="chosen")
        h, w = self.image_size
        mem.set(xscale="log", xlabel="tile size (px)", ylabel="predicted peak on device (GB)",
                title=f"{self.model} {h}x{w}, batch {self.batch}, {self.dtype}, {self.device}")
        cost.set(xscale="log", xlabel="tile size (px)", ylabel="relative time (FLOPs vs conventional)",
                 title=f"chosen: {self.chosen.label}")
        tiles = sorted({c.tile_size for c in self.candidates if c.tile_size and c.predicted_device_bytes})
        for ax in (mem, cost):
            ax.set_xticks(tiles, [str(t) for t in tiles], minor=False)
            ax.set_xticks([], minor=True)
        mem.legend(fontsize=7)
        cost.legend(fontsize=7)
        fig.tight_layout()
        return save_figure(fig, path, dpi=110)
