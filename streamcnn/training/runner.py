"""A whole training run from a config: data, model, memory plan, epochs, checkpoints, reports.

:func:`fit` is what ``tools/train.py`` calls. Its output directory holds
``config.yaml`` (the resolved config), ``plan.txt``/``plan.json`` (the memory plan),
``metrics.jsonl`` (one line per evaluated epoch), ``last.pt`` and ``best.pt`` (written
atomically after every epoch, and ``last.pt`` also every ``train.checkpoint_minutes``
within an epoch), ``loss_curve.png``, ``confusion_matrix.png`` and, with
``data.on_error=skip``, ``skipped.txt``.

Resume: ``fit(config, resume=True)`` continues from ``OUT/last.pt`` (or, when that does not
read, the newest checkpoint of the run that does) with the model,
optimizer, scheduler, scaler and random state it holds, mid-epoch if it was written
mid-epoch (the epoch's batch order is a function of (seed, epoch), so the remaining
batches are known; the epoch's running totals are in the checkpoint), and rewrites
``metrics.jsonl`` from the history stored in that checkpoint. A run killed at any point
(even ``kill -9``) and resumed therefore evaluates every epoch exactly once and, on
the same machine, reproduces the uninterrupted run's metrics and weights.

The model and its memory plan come from :mod:`streamcnn.training.planned` (re-exported here).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml
from torch.utils.data import Dataset

from streamcnn.utils.cpu import usable_cores
from streamcnn.utils.files import atomic_write_text
from streamcnn.utils.precision import needs_grad_scaler
from streamcnn.training.checkpointing import (checkpoint_candidates, load_newest_readable, rng_state, save_checkpoint,
                                              seed_everything, set_rng_state)
from streamcnn.training.config import TrainConfig, apply_overrides
from streamcnn.data.splits import write_split_csv
from streamcnn.training.datasets import (build_datasets, fit_model_to_data, loss_weights, make_loader, resolve_accumulation,
                                         split_table, unwrap_dataset)
from streamcnn.training.distributed import (DistributedContext, all_reduce_sum, broadcast_object, gather_objects,
                                            init_distributed, resolve_device, run_local_processes, wrap_ddp)
from streamcnn.training.loop import evaluate, train_one_epoch
from streamcnn.training.metrics import (check_best_by, labels_are_grades, plot_confusion_matrix, plot_loss_curve,
                                        validation_metrics, write_metrics)
from streamcnn.training.optim import build_optimizer, build_scheduler
from streamcnn.training.planned import apply_memory_plan, build_training_model, planned_model, share_of
from streamcnn.training.spec import RunSpec, resolve_run

__all__ = ["build_training_model", "apply_memory_plan", "planned_model", "fit", "RunFiles", "local_processes",
           "share_of", "LOCAL_PROCESS_MIN_STEPS"]


@dataclass(frozen=True)
class RunFiles:
    """The files of a run directory."""

    out: Path

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    @property
    def best(self) -> Path:
        return self.out / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"


#: train.processes=auto trains on one process per core only for runs of at least this many steps.
LOCAL_PROCESS_MIN_STEPS = 500


def local_processes(config: TrainConfig, train_set: Dataset) -> int:
    """How many local processes train (``train.processes``). ``auto``: one per core on a CPU
    when the run has at least :data:`LOCAL_PROCESS_MIN_STEPS` optimizer steps, the batch
    divides evenly, and each process's step is planned within its share of the budget; else 1."""
    wanted = config.train.processes
    if wanted != "auto":
        if config.train.batch_size % int(wanted):
            raise ValueError(f"train.batch_size={config.train.batch_size} does not split evenly between "
                             f"train.processes={wanted}: choose a batch size they divide, or fewer processes")
        return int(wanted)
    cores = usable_cores()
    if resolve_device(config.train.device).type != "cpu" or cores < 2:
        return 1
    steps = len(train_set) // (config.train.batch_size * config.train.accumulate) * config.train.epochs  # type: ignore[arg-type]
    if min(steps, config.train.max_steps or steps) < LOCAL_PROCESS_MIN_STEPS:
        return 1
    fitted, image_size, _ = fit_model_to_data(apply_overrides(config, [("train.progress", False)]), train_set)
    for processes in range(cores, 1, -1):
        if config.train.batch_size % processes == 0 and _plans_within_share(fitted, image_size, processes):
            return processes
    return 1


def _plans_within_share(config: TrainConfig, image_size: tuple[int, int], processes: int) -> bool:
    try:
        apply_memory_plan(build_training_model(config), share_of(config, processes), image_size,
                          torch.device("cpu"), batch=config.train.batch_size // processes)
    except ValueError:      # its share of the budget is too small
        return False
    return True


def _is_better(row: dict[str, Any], best: dict[str, Any] | None, best_by: str = "auto") -> bool:
    if best is None:
        return True
    if best_by != "auto" and row.get(best_by) is not None and best.get(best_by) is not None:
        return row[best_by] < best[best_by] if best_by.endswith("loss") else row[best_by] > best[best_by]
    if row.get("val_accuracy") is not None and best.get("val_accuracy") is not None:
        return row["val_accuracy"] > best["val_accuracy"]
    return row["train_loss"] < best["train_loss"]


def _best(history: list[dict[str, Any]], best_by: str = "auto") -> dict[str, Any] | None:
    best = None
    for row in history:
        if _is_better(row, best, best_by):
            best = row
    return best


@dataclass
class _Trainer:
    """What a checkpoint saves and restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    def state(self, rng: list, epoch: int, step: int, history: list, config: TrainConfig,
              image_size: tuple[int, int]) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
                "epoch": epoch, "step": step, "history": history, "config": config.to_dict(), "image_size": image_size}

    def restore(self, state: dict[str, Any], context: DistributedContext) -> tuple[int, int, list[dict[str, Any]]]:
        """Load ``state``; return (epoch, step, history) at its end."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]  # one per rank; a different world size continues from rank 0's
        set_rng_state(rng[context.rank] if len(rng) == context.world_size else rng[0])
        return state["epoch"], state["step"], state["history"]


def _epoch_row(epoch: int, step: int, result, lr: float, val, val_metrics: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "epoch": epoch, "step": step, "train_loss": result.loss, "train_accuracy": result.accuracy,
        "images": result.images, "images_per_second": result.images / result.seconds,
        "megapixels_per_second": result.megapixels / result.seconds, "peak_memory_bytes": result.peak_memory_bytes,
        "lr": lr, "seconds": result.seconds, "val_accuracy": None, "val_loss": None,
    }
    if val is not None:
        row.update(val_accuracy=val.accuracy, val_loss=val.loss, val_seconds=val.seconds, **val_metrics)
    return row


def _mid_epoch_saver(trainer: _Trainer, files: RunFiles, config: TrainConfig, context: DistributedContext,
                     epoch: int, step: int, history: list, image_size: tuple[int, int]):
    """``on_step`` for :func:`train_one_epoch`: every ``train.checkpoint_minutes``, write ``last.pt``
    with the epoch in progress (batches done, running totals), so ``--resume`` continues mid-epoch."""
    last = time.monotonic()

    def save(batches: int, steps: int, totals: torch.Tensor, seconds: float) -> None:
        nonlocal last
        due = torch.tensor([float(time.monotonic() - last >= 60 * config.train.checkpoint_minutes)])
        if not float(all_reduce_sum(due, context)[0]):      # every rank decides alike
            return
        rng = gather_objects(rng_state(), context)
        if context.is_main:
            state = trainer.state(rng, epoch - 1, step + steps, history, config, image_size)
            state["in_progress"] = {"epoch": epoch, "batches": batches, "totals": totals.tolist(), "seconds": seconds}
            save_checkpoint(files.last, state)
        last = time.monotonic()
    return save


def fit(config: TrainConfig, *, resume: bool = False, train_set: Dataset | None = None,
        val_set: Dataset | None = None) -> list[dict[str, Any]]:
    """Train as ``config`` says; return the metrics history (one dict per epoch).

    ``train_set``/``val_set`` replace the config's data (programmatic use). Every process
    of a ``torchrun`` launch calls this; only rank 0 writes files. Outside torchrun, the data is
    loaded here and ``train.processes`` local processes may train on it (:func:`local_processes`).
    """
    if "WORLD_SIZE" not in os.environ and config.train.processes != 1:
        if config.out is None and not resume:
            config = apply_overrides(config, [("out", time.strftime("runs/%Y%m%d-%H%M%S"))])
        if train_set is None:      # once, here: the processes are handed it
            train_set, val_set = build_datasets(config, init_distributed(config.train.device))
        processes = local_processes(config, train_set)
        if processes > 1:
            return run_local_processes(processes, _fit_in_group, config, resume, train_set, val_set, processes)
    return _fit_in_group(config, resume, train_set, val_set)


def _fit_in_group(config: TrainConfig, resume: bool, train_set: Dataset | None, val_set: Dataset | None,
                  shares: int = 1) -> list[dict[str, Any]]:
    spec = resolve_run(config, shares=shares)
    try:
        return _fit(spec, resume, train_set, val_set)
    finally:
        spec.context.close()


@dataclass
class _Run:
    """One process's view of a run being trained: what :func:`_prepare` builds, :func:`_train` uses."""

    config: TrainConfig
    context: DistributedContext
    files: RunFiles
    amp_dtype: torch.dtype | None
    trainer: _Trainer
    train_set: Dataset
    train_loader: Any
    val_loader: Any
    image_size: tuple[int, int]
    plan_text: str
    plan_json: dict[str, Any] | None
    val_set: Dataset | None = None


def _fit(spec: RunSpec, resume: bool, train_set: Dataset | None, val_set: Dataset | None) -> list[dict[str, Any]]:
    run = _prepare(spec, resume, train_set, val_set)
    context = spec.context
    epoch, step, history, in_progress = _resume(run, resume)
    if context.is_main:
        _write_run_files(run, history)
    return _train(run, epoch, step, history, in_progress)


def _prepare(spec: RunSpec, resume: bool, train_set: Dataset | None, val_set: Dataset | None) -> _Run:
    """Data, planned model, loaders, optimizer: everything but the random state a resume restores."""
    config, context, amp_dtype = spec.config, spec.context, spec.amp_dtype
    if config.out is None:
        if resume:
            raise ValueError("--resume needs the run's folder: pass --out DIR (the folder holding last.pt)")
        config = apply_overrides(config, [("out", broadcast_object(time.strftime("runs/%Y%m%d-%H%M%S"), context))])
    files = RunFiles(Path(config.out))
    if files.last.exists() and not resume:
        raise FileExistsError(f"{files.last} exists: pass --resume to continue that run, or choose another --out")
    device = context.device
    if train_set is None:
        train_set, val_set = build_datasets(config, context)
    config, batch_line = resolve_accumulation(config, train_set)
    if batch_line and context.is_main:
        print(batch_line, flush=True)
    config, image_size, planned_for = fit_model_to_data(config, train_set)
    check_best_by(config.train.best_by)
    seed_everything(config.train.seed)
    model, plan_text, plan_json = planned_model(config, image_size, device, shares=context.shares)
    plan_text = f"planned for {planned_for}\n{plan_text}"
    if context.shares > 1:
        plan_text += (f"\n{context.shares} local processes (train.processes), one thread each, each with "
                      f"{config.train.batch_size // context.shares} images of every batch of {config.train.batch_size}")
    if plan_json is not None:
        plan_json["planned_for"] = planned_for
    train_loader = make_loader(train_set, config, context, train=True)
    val_loader = make_loader(val_set, config, context, train=False) if val_set is not None else None
    steps_per_epoch = len(train_loader) // config.train.accumulate
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one optimizer step "  # type: ignore[arg-type]
                         f"(batch_size {config.train.batch_size} x accumulate {config.train.accumulate} x "
                         f"{context.world_size // context.shares} processes); lower train.accumulate or add data")
    total_steps = steps_per_epoch * config.train.epochs
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)
    optimizer = build_optimizer(model, config.optim)
    trainer = _Trainer(model, optimizer, build_scheduler(optimizer, config.optim, total_steps, steps_per_epoch),
                       torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(amp_dtype)))
    return _Run(config, context, files, amp_dtype, trainer, train_set, train_loader, val_loader, image_size,
                plan_text, plan_json, val_set)


def _resume(run: _Run, resume: bool) -> tuple[int, int, list[dict[str, Any]], dict[str, Any] | None]:
    """(epoch, step, history, epoch in progress) to continue from: the newest checkpoint of the run
    that reads (read to host memory, whatever the device), or the beginning."""
    files, context = run.files, run.context
    if resume and files.out.is_dir() and checkpoint_candidates(files.out):
        say = (lambda line: print(line, flush=True)) if context.is_main else None
        _, saved = load_newest_readable(files.out, say=say)
        epoch, step, history = run.trainer.restore(saved, context)
        return epoch, step, history, saved.get("in_progress")
    if resume and context.is_main:
        print(f"{files.last} does not exist yet: starting the run from the beginning", flush=True)
    return 0, 0, [], None


def _write_run_files(run: _Run, history: list[dict[str, Any]]) -> None:
    files, config = run.files, run.config
    files.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(files.out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    atomic_write_text(files.out / "plan.txt", run.plan_text + "\n")
    if run.plan_json is not None:
        atomic_write_text(files.out / "plan.json", json.dumps(run.plan_json, indent=1))
    write_metrics(files.metrics, history)  # a resumed run forgets what happened after last.pt
    split = split_table(run.train_set, run.val_set) if config.data.kind == "manifest" else None
    if split is not None:
        write_split_csv(files.out / "split.csv", *split)
    skipped = getattr(unwrap_dataset(run.train_set)[0], "skipped", None)
    if skipped:
        atomic_write_text(files.out / "skipped.txt", "".join(f"{reason}\n" for _, reason in skipped))
        print(f"skipped {len(skipped)} bad file(s) (data.on_error=skip), listed in {files.out / 'skipped.txt'}",
              flush=True)
    if config.train.progress:
        print(run.plan_text, flush=True)


def _train(run: _Run, epoch: int, step: int, history: list[dict[str, Any]],
           in_progress: dict[str, Any] | None) -> list[dict[str, Any]]:
    config, context, files, trainer = run.config, run.context, run.files, run.trainer
    model, best = trainer.model, _best(history, config.train.best_by)
    train_model = wrap_ddp(model, context)
    last_eval, out_of_time = None, False
    deadline = None if config.train.max_minutes is None else time.monotonic() + 60 * config.train.max_minutes
    while epoch < config.train.epochs and (config.train.max_steps is None or step < config.train.max_steps) \
            and not out_of_time:
        epoch += 1
        part, in_progress = (in_progress if in_progress and in_progress["epoch"] == epoch else None), None
        run.train_loader.batch_sampler.set_epoch(epoch, part["batches"] if part else 0)
        save_mid_epoch = _mid_epoch_saver(trainer, files, config, context, epoch, step, history, run.image_size)
        result = train_one_epoch(train_model, run.train_loader, trainer.optimizer, trainer.scheduler, trainer.scaler,
                                 context=context, num_classes=config.model.num_classes,
                                 accumulate=config.train.accumulate, amp_dtype=run.amp_dtype, step=step,
                                 max_steps=config.train.max_steps, deadline=deadline, epoch=epoch,
                                 progress=config.train.progress, resume=part, on_step=save_mid_epoch,
                                 class_weights=loss_weights(run.train_set, config) if config.data.balance == "loss" else None)
        step, out_of_time = step + result.steps, result.out_of_time
        if run.val_loader is not None:
            last_eval = evaluate(model, run.val_loader, context=context, num_classes=config.model.num_classes,
                                 amp_dtype=run.amp_dtype, progress=config.train.progress, desc=f"validate {epoch}",
                                 per_image=True)
        val_metrics = validation_metrics(last_eval, context, config.model.num_classes, labels_are_grades(config)) \
            if last_eval is not None else {}
        row = _epoch_row(epoch, step, result, trainer.scheduler.get_last_lr()[0], last_eval, val_metrics)
        history.append(row)
        rng = gather_objects(rng_state(), context)
        if context.is_main:
            state = trainer.state(rng, epoch, step, history, config, run.image_size)
            save_checkpoint(files.last, state)
            if _is_better(row, best, config.train.best_by):
                best = row
                save_checkpoint(files.best, state)
            write_metrics(files.metrics, history)
            if config.train.progress:
                print(json.dumps({k: row[k] for k in ("epoch", "step", "train_loss", "val_accuracy", "val_auc",
                                                      "val_balanced_accuracy", "val_kappa", "seconds") if k in row}),
                      flush=True)
        context.barrier()
    if context.is_main and history:
        plot_loss_curve(history, files.out / "loss_curve.png", title=f"{config.model.trunk} {config.model.mode}")
        if last_eval is not None:
            plot_confusion_matrix(last_eval.confusion, files.out / "confusion_matrix.png",
                                  title=f"validation, epoch {epoch}", class_names=config.data.classes)
    return history
