"""Benchmark: short training runs, side by side (e.g. full resolution vs the downsampling baseline).

    python benchmarks/bench_training.py                                   # the default command, timed
    python benchmarks/bench_training.py --name ultramnist-11gb --max-minutes 10 \\
        --config configs/ultramnist-4000-resnet50-11gb.yaml \\
        --config configs/ultramnist-downsample1024-resnet50-11gb.yaml \\
        --set data.root=data/ultramnist/train --set data.val_root=data/ultramnist/test

Each ``--config`` (default: the embedded default with ``--budget 11GB``, i.e. exactly
``python tools/train.py --budget 11GB``) is trained with the same ``--set`` overrides and
``--max-minutes`` in a fresh run folder under ``--runs``, one after the other. Wall time
includes data generation, planning, training and validation. Prints a markdown table and
writes JSON (machine, device, versions, date, load average, per-epoch metrics) to
``benchmarks/results/train-NAME.json``, and each run's loss curve to
``benchmarks/results/train-NAME-CONFIG-loss_curve.png``. Timings taken while other jobs run are not
comparable: check ``load_average_before``/``load_average_after`` in the JSON.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import common

from streamcnn.training import fit, load_config
from streamcnn.training.distributed import resolve_device


def run(config_path: str | None, overrides: list[str], runs: Path, index: int) -> dict:
    name = Path(config_path).stem if config_path else "default"
    out = runs / f"{index}-{name}"
    shutil.rmtree(out, ignore_errors=True)
    config = load_config(config_path, [*(["plan.budget=11GB"] if config_path is None else []), *overrides,
                                       f"out={out}"])
    start = time.perf_counter()
    history = fit(config)
    seconds = time.perf_counter() - start
    last = history[-1]
    return {
        "config": config_path or "(embedded default) --budget 11GB", "mode": config.model.mode,
        "trunk": config.model.trunk, "input_size": config.model.input_size if config.model.mode == "downsample" else None,
        "budget": config.plan.budget, "plan": (out / "plan.txt").read_text(), "wall_seconds": seconds,
        "epochs": len(history), "steps": last["step"],
        "train_images_per_second": sum(r["images"] for r in history) / sum(r["seconds"] for r in history),
        "train_megapixels_per_second": sum(r["megapixels_per_second"] * r["seconds"] for r in history)
        / sum(r["seconds"] for r in history),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in history),
        "final_train_loss": last["train_loss"], "final_val_accuracy": last["val_accuracy"],
        "best_val_accuracy": max((r["val_accuracy"] for r in history if r["val_accuracy"] is not None), default=None),
        "history": history, "out": str(out),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="a config to train (repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override for every run")
    parser.add_argument("--max-minutes", type=float, help="training time per run")
    parser.add_argument("--name", default="default", help="results file: benchmarks/results/train-NAME.json")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench"), help="where the run folders go")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    overrides = [*args.overrides, f"train.device={args.device}"]
    if args.max_minutes is not None:
        overrides.append(f"train.max_minutes={args.max_minutes}")
    device = str(resolve_device(args.device))
    payload = common.environment(device)
    rows = [run(path, overrides, args.runs, i) for i, path in enumerate(args.config or [None])]
    for row in rows:  # each run's loss curve next to the JSON
        figure = common.RESULTS / f"train-{args.name}-{Path(row['out']).name.split('-', 1)[1]}-loss_curve.png"
        shutil.copyfile(Path(row["out"]) / "loss_curve.png", figure)
        row["loss_curve"] = str(figure.relative_to(common.RESULTS.parent.parent))
    payload.update(load_average_after=os.getloadavg(), overrides=overrides, runs=rows)
    path = common.write_json(f"train-{args.name}.json", payload)
    print(common.markdown_table(rows, [
        ("config", "config"), ("mode", "mode"), ("input_size", "input px"), ("budget", "budget"),
        ("epochs", "epochs"), ("steps", "steps"), ("wall_seconds", "wall s"),
        ("train_images_per_second", "img/s"), ("train_megapixels_per_second", "MP/s"),
        ("peak_memory_bytes", "peak bytes"), ("final_val_accuracy", "val acc"), ("best_val_accuracy", "best val acc"),
    ]))
    print(f"device: {payload['device']}; load average before {payload['load_average_before']}, "
          f"after {payload['load_average_after']}; wrote {path}")


if __name__ == "__main__":
    main()
