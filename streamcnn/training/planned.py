"""The model a config describes, planned under its memory budget and placed on its device.

:func:`apply_memory_plan` is the one place where the memory budget meets the model;
:func:`planned_model` is what every entry point (train, evaluate, predict, benchmarks) builds
a model with, so the plan that runs is the one the report showed.
"""
from __future__ import annotations

from typing import Any

import torch

from streamcnn.engine.step import Strategy
from streamcnn.models.classifier import StreamingClassifier, build_model
from streamcnn.models.patchgd import build_patchgd
from streamcnn.models.strategy import check_budget
from streamcnn.models.zoomin import build_zoomin
from streamcnn.planning.search import enforce_budget, plan
from streamcnn.training.config import TrainConfig, apply_overrides
from streamcnn.training.loop import resolve_amp
from streamcnn.utils.allocator import keep_freed_memory
from streamcnn.utils.cpu import preferred_memory_format
from streamcnn.utils.units import parse_size

__all__ = ["build_training_model", "apply_memory_plan", "planned_model", "share_of"]


def build_training_model(config: TrainConfig) -> StreamingClassifier:
    """The config's model (untrained unless ``model.weights``), not yet planned."""
    m = config.model
    if m.in_channels is None or m.num_classes is None:
        raise ValueError("model.in_channels and model.num_classes come from the data: resolve them first with "
                         "streamcnn.training.datasets.fit_model_to_data(config, dataset), or set them")
    if m.mode == "patchgd":
        if m.patch_size is None:
            raise ValueError("model.mode is patchgd but model.patch_size is not set; set it to a side that divides "
                             "the image (e.g. a quarter of it)")
        return build_patchgd(m.trunk, m.num_classes, m.in_channels, patch_size=m.patch_size,
                             sampling=m.patch_sampling, inner_iterations=m.inner_iterations, weights=m.weights,
                             trunk_kwargs=m.trunk_kwargs)
    if m.mode == "zoomin":
        return build_zoomin(m.trunk, m.num_classes, m.in_channels, weights=m.weights, trunk_kwargs=m.trunk_kwargs,
                            **m.strategy_kwargs)
    return build_model(m.trunk, m.head, num_classes=m.num_classes, in_channels=m.in_channels, weights=m.weights,
                       head_kwargs=m.head_kwargs, trunk_kwargs=m.trunk_kwargs)


def apply_memory_plan(model: StreamingClassifier, config: TrainConfig, image_size: tuple[int, int],
                      device: torch.device, *, batch: int = 1) -> tuple[str, dict[str, Any] | None]:
    """Set how the model runs (tile, checkpointing, feature-map device).

    Returns a description for people and the planner's JSON report (None without a budget).
    With a ``plan.budget`` the planner (:func:`streamcnn.planning.search.plan`) chooses the fastest
    plan predicted to fit the config's step (micro-batch ``batch``, ``train.accumulate``,
    amp, optimizer) and raises :class:`streamcnn.planning.search.BudgetError` (naming the smallest
    budget that would fit) when nothing does; the choices the config fixes (not ``auto``)
    are constraints of that search, so the prediction holds for what runs. Without a
    budget the model runs as the config says (conventional unless it fixes a tile).
    ``image_size`` is what the model sees (the small image in the downsampling baseline,
    which is planned and enforced under the same budget).
    """
    p = config.plan
    if isinstance(model, Strategy):  # PatchGD, Zoom-In: nothing to plan, the config fixes their memory
        if p.budget is None:
            return f"no budget: {type(model).__name__} as the config says", None
        return check_budget(model, image_size, p.budget, batch=batch, accumulate=config.train.accumulate,
                            dtype=resolve_amp(config.train.amp, device), device=device.type,
                            optimizer=config.optim.name, weight_decay=config.optim.weight_decay,
                            counts=p.budget_counts)
    offload = "auto" if p.output_device is None else torch.device(p.output_device).type == "cpu"
    if p.budget is not None:
        report = plan(model, image_size, p.budget, batch=batch, accumulate=config.train.accumulate,
                      dtype=resolve_amp(config.train.amp, device), device=device.type, optimizer=config.optim.name,
                      weight_decay=config.optim.weight_decay, tile_size=p.tile_size, checkpoint=p.checkpoint,
                      head_checkpoint=p.head_checkpoint, offload=offload, progress=config.train.progress,
                      counts=p.budget_counts)
        report.apply(model)
        description, report_json = str(report), report.to_json()
    else:
        fixed_or = lambda value, default: default if value == "auto" else value  # noqa: E731
        model.configure_plan(tile_size=fixed_or(p.tile_size, None), checkpoint=fixed_or(p.checkpoint, False),
                             head_checkpoint=fixed_or(p.head_checkpoint, False), output_device=p.output_device)
        description, report_json = "no budget: the config's settings (conventional unless it fixes a tile)", None
    running = (f"running with: tile_size={model.trunk.tile_size}, checkpoint={model.trunk.checkpoint}, "
               f"head_checkpoint={model.head_checkpoint}, output_device={model.trunk.output_device}")
    return f"{description}\n{running}", report_json


def planned_model(config: TrainConfig, image_size: tuple[int, int], device: torch.device,
                  state: dict[str, Any] | None = None, shares: int = 1) -> tuple[StreamingClassifier, str, dict[str, Any] | None]:
    """The config's model (with ``state`` loaded), planned for ``image_size`` under the config's
    budget, moved to ``device``, with the budget enforced on CUDA; and the plan's text and JSON.
    ``shares`` local processes split the batch and the budget (:func:`share_of`)."""
    model = build_training_model(config)
    if state is not None:
        model.load_state_dict(state)
    config = share_of(config, shares)
    plan_text, plan_json = apply_memory_plan(model, config, image_size, device, batch=config.train.batch_size)
    model.to(device)
    fmt = preferred_memory_format(device)
    if fmt != torch.contiguous_format and isinstance(model, StreamingClassifier):
        model.use_memory_format(fmt)
    if device.type == "cpu":
        keep_freed_memory()  # the steps repeat: reuse freed pages rather than fault in new ones
    if config.plan.budget is not None and device.type == "cuda":
        enforce_budget(config.plan.budget, device, counts=config.plan.budget_counts)
    return model, plan_text, plan_json


def share_of(config: TrainConfig, shares: int) -> TrainConfig:
    """What one of ``shares`` local processes runs: its part of the batch, and of the budget
    a part as large as each process's and the waiting parent's (which holds the data)."""
    if shares == 1:
        return config
    overrides: list[tuple[str, Any]] = [("train.batch_size", config.train.batch_size // shares)]
    if config.plan.budget is not None:
        overrides.append(("plan.budget", str(parse_size(config.plan.budget) // (shares + 1))))
    return apply_overrides(config, overrides)
