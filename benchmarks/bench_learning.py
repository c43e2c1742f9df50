#!/usr/bin/env python
"""Which method reaches the best test accuracy within the same memory budget and CPU time?

The budget-aware UltraMNIST miniature (docs/learning.md): a ``--canvas`` px canvas (default 256)
under ``11 GB x (canvas / 4000)^2`` of tensors (activations scale with the pixels; 45 MB at 256
px), four arms, each a config ``configs/learning-<arm>.yaml`` run through ``tools/train.py``:

- ``stream``: full resolution, as the planner plans it (the benchmark checks the plan streams);
- ``down``: the image downsampled to the largest input that trains conventionally within the budget;
- ``patchgd``: PatchGD with its global patch, patches of half the side, the largest sampling that fits;
- ``zoomin``: Zoom-In, the most samples that fit.

    python benchmarks/bench_learning.py                          # 4 arms x seeds 0 1 2, 45 CPU-minutes each
    python benchmarks/bench_learning.py --variant sum --seeds 0  # the benchmark's own label, one seed

Each arm first tunes its learning rate (``--tune``: 0.5x, 1x, 2x of the config's, ``--tune-minutes``
CPU-minutes each, seed 0, scored on a validation split cut from the training images, never the test
split), then trains each seed. Time is the process's CPU time (user + system, the trainer and its
children), read from /proc while it runs: a run is stopped at ``--cpu-minutes``, and each epoch's
test accuracy is recorded against the CPU seconds at which it appeared. Resumable: every finished
run (tuning ones too) writes ``result.json`` in its folder and is reused while its settings are
the same; a run cut off midway starts over. Writes ``benchmarks/results/learning-<suite>.json`` after every run, its ``.png`` and
a contact sheet ``learning-<suite>-detail.png`` (the deciding digit at full resolution and at the
``down`` arm's input size).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("stream", "down", "patchgd", "zoomin")
REFERENCE = (4000, 11e9)          # the benchmark's canvas (px) and budget (bytes)
TICK = os.sysconf("SC_CLK_TCK")


def scaled_budget(canvas: int) -> int:
    """The paper's 11 GB at 4000 x 4000 px scaled by the pixel count: activations grow with it."""
    return int(REFERENCE[1] * (canvas / REFERENCE[0]) ** 2)


# -- data ------------------------------------------------------------------------------------------
def prepare_data(root: Path, canvas: int, train: int, test: int, variant: str, val_fraction: float) -> dict:
    """Generate the splits (reused when present), the variant's manifests, and a tuning split of train."""
    from streamcnn.data import generate_ultramnist
    from streamcnn.data.variants import write_variant_manifest
    from streamcnn.utils.files import atomic_write_text

    counts = {}
    for split, count in (("train", train), ("test", test)):
        generate_ultramnist(root / split, count, size=canvas, seed=0, split=split, workers=2, progress=False)
        _, counts[split] = write_variant_manifest(root / split, variant)
    with open(root / "train" / f"manifest-{variant}.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    held = set()                     # the last ``val_fraction`` of each class: a balanced validation split
    for label in {r["label"] for r in rows}:
        paths = [r["path"] for r in rows if r["label"] == label]
        held.update(paths[len(paths) - max(1, round(val_fraction * len(paths))):])
    parts = ([r for r in rows if r["path"] not in held], [r for r in rows if r["path"] in held])
    for name, part in zip(("tune-train", "tune-val"), parts):
        lines = ["path,label"] + [f"{r['path']},{r['label']}" for r in part]
        atomic_write_text(root / "train" / f"manifest-{variant}-{name}.csv", "\n".join(lines) + "\n")
    return counts


# -- what each arm spends its budget on ------------------------------------------------------------
_FIT = """
import json, sys, torch
from streamcnn.training.config import load_config
from streamcnn.training.runner import build_training_model
from streamcnn.planning.memory import predict_step_memory, budgeted_bytes
from streamcnn.training.loop import resolve_amp
config_path, arm, canvas, budget, counts = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
def need(overrides, size):   # the step as the trainer will run it (amp dtype, accumulation, optimizer)
    c = load_config(config_path, overrides)
    e = predict_step_memory(build_training_model(c), size, batch=c.train.batch_size, device="cpu",
                            dtype=resolve_amp(c.train.amp, torch.device("cpu")), accumulate=c.train.accumulate,
                            optimizer=c.optim.name, weight_decay=c.optim.weight_decay)
    return budgeted_bytes(e, counts)
def largest(options, overrides, size):
    best = None
    for option in options:          # ascending: memory grows with each
        if need(overrides(option), size if size else option) > budget:
            break
        best = option
    return best
if arm == "down":     # the largest input, multiple of 8, that trains conventionally (plan: no tiles, no checkpoint)
    fixed = lambda s: [["model.input_size", s], ["plan.tile_size", None], ["plan.checkpoint", False]]
    sizes = list(range(32, canvas, 8))
    lo, hi = 0, len(sizes) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(fixed(sizes[mid]), sizes[mid]) <= budget else (lo, mid - 1)
    out = {"model.input_size": sizes[lo]}
elif arm in ("patchgd", "zoomin"):   # the most patches / samples that fit, at the largest batch where any does
    base = load_config(config_path)
    if arm == "patchgd":
        grid = (canvas // base.model.patch_size) ** 2
        options, key, value = range(1, grid + 1), "model.patch_sampling", lambda k: k / grid
    else:
        options, key = [4, 8, 12, 16, 24, 32, 48, 64], "model.strategy_kwargs"
        value = lambda s: {**base.model.strategy_kwargs, "samples": s}
    out = None
    for batch in (base.train.batch_size, base.train.batch_size // 2, base.train.batch_size // 4):
        best = largest(options, lambda o: [[key, value(o)], ["train.batch_size", batch]], canvas)
        if best is not None:
            out = {key: value(best), "train.batch_size": batch}
            break
    if out is None:
        raise SystemExit(f"no {arm} setting fits {budget} bytes at batch {batch} or more")
else:
    out = {}
print(json.dumps(out))
"""


def arm_settings(arm: str, canvas: int, budget: int, counts: str, threads: int | None) -> dict:
    """The overrides that spend ``budget`` the arm's way (found with the planner's prediction)."""
    result = subprocess.run([sys.executable, "-c", _FIT, str(ROOT / "configs" / f"learning-{arm}.yaml"), arm,
                             str(canvas), str(budget), counts], capture_output=True, text=True, cwd=ROOT,
                            env=_env(threads))
    if result.returncode:
        raise RuntimeError(f"sizing arm {arm} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _override(key: str, value) -> str:
    return f"{key}={json.dumps(value) if isinstance(value, (dict, list)) else value}"


# -- one run, stopped at its CPU time ----------------------------------------------------------------
def _env(threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid``, its reaped children and its live descendants."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = sum(int(x) for x in fields[11:15]) / TICK      # utime stime cutime cstime
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_seconds(int(child))
    except (FileNotFoundError, ProcessLookupError, IndexError):
        pass
    return total


def train_run(arm: str, overrides: list[str], data: Path, manifests: tuple[str, str], val_root: Path,
              budget: int, counts: str, cpu_limit: float, seed: int, out: Path, threads: int | None) -> dict:
    """Train one arm and seed until ``cpu_limit`` CPU seconds; its curve against CPU seconds."""
    done = out / "result.json"
    if done.exists() and json.loads(done.read_text()).get("overrides") == overrides:
        return json.loads(done.read_text())      # finished with these settings: reused
    for stale in ("metrics.jsonl", "last.pt"):        # a run cut off midway starts over
        (out / stale).unlink(missing_ok=True)
    command = [sys.executable, str(ROOT / "tools/train.py"), "--config", str(ROOT / "configs" / f"learning-{arm}.yaml"),
               "--data", str(data / "train"), "--budget", str(budget), "--seed", str(seed), "--out", str(out),
               "--set", f"data.val_root={val_root}", "--set", f"plan.budget_counts={counts}",
               "--set", f"data.manifest={manifests[0]}", "--set", f"data.val_manifest={manifests[1]}"]
    for override in overrides:
        command += ["--set", override]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train.log", "w")
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env(threads))
    seen, stamps, used, planned = 0, [], 0.0, None
    while child.poll() is None:
        time.sleep(1.0)
        used = max(used, cpu_seconds(child.pid))
        if planned is None and (out / "plan.json").exists():
            planned = used
        metrics = out / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        stamps += [used] * (len(lines) - seen)
        seen = len(lines)
        if used >= cpu_limit:
            child.send_signal(signal.SIGTERM)
            child.wait()
    log.close()
    if child.returncode not in (0, -signal.SIGTERM):
        raise RuntimeError(f"{' '.join(command)} failed:\n{(out / 'train.log').read_text()[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    stamps += [used] * (len(rows) - len(stamps))
    curve, images = [], 0
    for row, cpu in zip(rows, stamps):
        images += row["images"]
        curve.append({"epoch": row["epoch"], "cpu_seconds": cpu, "steps": row["step"], "images": images,
                      "test_accuracy": row["val_accuracy"], "train_loss": row["train_loss"],
                      "train_accuracy": row["train_accuracy"]})
    result = {"seed": seed, "cpu_seconds": used, "cpu_seconds_planning": planned, "curve": curve,
              "overrides": overrides, "stopped_at_cpu_limit": used >= cpu_limit}
    common.write_json(done, result)
    return result


# -- the arm's plan and measured step ----------------------------------------------------------------
_MEASURE = """
import json, sys, torch
from streamcnn.engine.step import Strategy
from streamcnn.planning.measurement import measure_step_memory
from streamcnn.training.config import load_config
from streamcnn.training.loop import resolve_amp
from streamcnn.training.runner import planned_model
config = load_config(sys.argv[1], json.loads(sys.argv[2]))
size = config.model.input_size if config.model.mode == "downsample" else int(sys.argv[3])
model, _, report = planned_model(config, (size, size), torch.device("cpu"))   # as the trainer runs it
dtype = resolve_amp(config.train.amp, torch.device("cpu"))
peak = measure_step_memory(model, size, batch=config.train.batch_size, device="cpu", optimizer=config.optim.name,
                           dtype=dtype)
if isinstance(model, Strategy):
    plan = {"mode": config.model.mode, "tile_size": None, "n_tiles": None, "description": model.describe((size, size),
            config.train.batch_size)}
else:
    tile = model.trunk.tile_size
    plan = {"mode": report["mode"], "tile_size": tile, "n_tiles": len(model.trunk.plan((size, size)).tiles) if tile else 1,
            "checkpoint": model.trunk.checkpoint, "reason": report["reason"]}
print(json.dumps({"peak_bytes": peak.allocated_bytes, "input_px": size, "plan": plan}))
"""


def measure(arm: str, overrides: list[str], budget: int, counts: str, canvas: int, threads: int | None) -> dict:
    """The arm's plan under ``budget`` and the CPU allocator's peak over one step of it, in a fresh process."""
    pairs = [o.split("=", 1) for o in overrides]
    pairs = [[k, json.loads(v) if v[:1] in "{[" else v] for k, v in pairs]
    pairs += [["plan.budget", str(budget)], ["plan.budget_counts", counts], ["train.progress", False]]
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(ROOT / "configs" / f"learning-{arm}.yaml"),
                             json.dumps(pairs), str(canvas)], capture_output=True, text=True, cwd=ROOT, env=_env(threads))
    if result.returncode:
        raise RuntimeError(f"measuring arm {arm} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- outputs --------------------------------------------------------------------------------------------
def write_results(payload: dict) -> None:
    """Write the suite's JSON, keeping the arms another command of the same suite wrote (``--arms``)."""
    path = common.RESULTS / f"learning-{payload['suite']}.json"
    if path.exists():
        old = json.loads(path.read_text())
        if (old.get("canvas_px"), old.get("budget_bytes")) == (payload["canvas_px"], payload["budget_bytes"]):
            payload["arms"] = {**{a: e for a, e in old.get("arms", {}).items() if a not in payload["arms"]},
                               **payload["arms"]}
    payload["arms"] = {a: payload["arms"][a] for a in ARMS if a in payload["arms"]}
    common.write_json(path, payload)


def summary(runs: list[dict]) -> dict:
    finals = [r["curve"][-1]["test_accuracy"] for r in runs if r["curve"]]
    return {"test_accuracy_mean": statistics.mean(finals) if finals else None,
            "test_accuracy_spread": statistics.stdev(finals) if len(finals) > 1 else None, "seeds": len(finals),
            "cpu_seconds_mean": statistics.mean(r["cpu_seconds"] for r in runs) if runs else None}


def plot(payload: dict, path: Path) -> None:
    from streamcnn.training.metrics import _pyplot
    from streamcnn.utils.files import save_figure

    plt = _pyplot()
    colors = dict(zip(ARMS, ("tab:red", "tab:blue", "tab:green", "tab:purple")))
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for arm, entry in payload["arms"].items():
        for i, run in enumerate(entry["runs"]):
            xs = [p["cpu_seconds"] / 60 for p in run["curve"]]
            axes.plot(xs, [p["test_accuracy"] for p in run["curve"]], marker="o", ms=3, color=colors.get(arm),
                      alpha=0.8, label=f"{arm} ({entry['plan']['mode']})" if i == 0 else None)
    axes.axhline(payload["chance"], color="grey", linestyle=":", label="chance")
    axes.set_xlabel("CPU minutes (user + system) of the run")
    axes.set_ylabel("test accuracy")
    axes.set_title(f"{payload['variant']} at {payload['canvas_px']} px, {payload['budget_bytes'] / 1e6:.0f} MB of tensors")
    axes.legend(fontsize=8)
    save_figure(figure, path)


def contact_sheet(test_root: Path, down_px: int, path: Path, count: int = 4) -> None:
    """Test images: whole, the smallest digit's box at full resolution, and the same at ``down_px``."""
    import numpy as np
    import tifffile
    import torch

    from streamcnn.training.metrics import _pyplot
    from streamcnn.utils.downsample import area_resize
    from streamcnn.utils.files import save_figure

    with open(test_root / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[:count]
    plt = _pyplot()
    figure, axes = plt.subplots(count, 3, figsize=(7.5, 2.5 * count))
    for row, ax in zip(rows, axes):
        image = tifffile.imread(test_root / row["path"], key=0).astype(np.float32)
        boxes = json.loads(row["boxes"])
        x, y, w, h = min(boxes, key=lambda b: b[2] * b[3])
        small = area_resize(torch.from_numpy(image), (down_px, down_px)).numpy()
        scale = down_px / image.shape[-1]
        pad = max(w, h) // 2
        t, l = max(0, y - pad), max(0, x - pad)
        ax[0].imshow(image, cmap="gray")
        ax[0].add_patch(plt.Rectangle((x, y), w, h, fill=False, color="red"))
        ax[0].set_title(f"{image.shape[-1]} px, digits {row['digits']}", fontsize=8)
        ax[1].imshow(image[t:y + h + pad, l:x + w + pad], cmap="gray")
        ax[1].set_title(f"smallest digit, full resolution ({w} px)", fontsize=8)
        st, sl = int(t * scale), int(l * scale)
        ax[2].imshow(small[st:max(st + 1, int((y + h + pad) * scale)), sl:max(sl + 1, int((x + w + pad) * scale))],
                     cmap="gray", interpolation="nearest")
        ax[2].set_title(f"the same at {down_px} px ({w * scale:.1f} px)", fontsize=8)
        for a in ax:
            a.axis("off")
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--canvas", type=int, default=256, help="canvas px of the generated images")
    parser.add_argument("--budget", type=int, help="bytes of tensors (default: 11 GB x (canvas / 4000)^2)")
    parser.add_argument("--cpu-minutes", type=float, default=45.0, help="CPU time of each arm and seed")
    parser.add_argument("--tune", type=float, nargs="*", default=[0.5, 1.0, 2.0],
                        help="learning-rate multipliers each arm tries on the validation split (none: no tuning)")
    parser.add_argument("--tune-minutes", type=float, default=10.0, help="CPU minutes of each tuning run")
    parser.add_argument("--train-count", type=int, default=12000, help="training images generated")
    parser.add_argument("--test-count", type=int, default=1400, help="test images generated")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="training images held out for tuning")
    parser.add_argument("--variant", default="smallest", help="label variant (streamcnn.data.variants)")
    parser.add_argument("--data", type=Path, default=ROOT / "runs/learning-data", help="generated data folder")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs/learning", help="run folders")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs")
    parser.add_argument("--tag", help="appended to the suite's name (keeps another setting's results)")
    args = parser.parse_args(argv)

    from streamcnn.data.variants import VARIANTS
    from streamcnn.training.config import load_config

    budget, counts = args.budget or scaled_budget(args.canvas), "tensors"
    suite = f"{args.variant}-{args.canvas}px" + (f"-{args.tag}" if args.tag else "")
    data = args.data / f"{args.canvas}px"
    payload = common.environment("cpu")
    payload.update(suite=suite, canvas_px=args.canvas, budget_bytes=budget, budget_counts=counts,
                   budget_rule="11 GB x (canvas / 4000)^2", variant=args.variant, chance=1 / VARIANTS[args.variant][1],
                   cpu_minutes=args.cpu_minutes, seeds=args.seeds, tune=args.tune, tune_minutes=args.tune_minutes,
                   threads=args.threads, arms={})
    payload["images_per_class"] = prepare_data(data, args.canvas, args.train_count, args.test_count, args.variant,
                                               args.val_fraction)
    classes = [f"model.num_classes={VARIANTS[args.variant][1]}"]
    runs = args.runs / f"{suite}-{budget}B-{args.cpu_minutes:g}cpumin"
    for arm in args.arms:      # arm by arm, seed by seed: an interrupted suite keeps every finished run
        settings = arm_settings(arm, args.canvas, budget, counts, args.threads)
        overrides = classes + [_override(k, v) for k, v in settings.items()]
        lr = load_config(ROOT / "configs" / f"learning-{arm}.yaml").optim.lr
        tuning = []
        for factor in args.tune:
            run = train_run(arm, overrides + [f"optim.lr={lr * factor:g}"], data,
                            (f"manifest-{args.variant}-tune-train.csv", f"manifest-{args.variant}-tune-val.csv"),
                            data / "train", budget, counts, 60 * args.tune_minutes, 0, runs / f"tune-{arm}-lr{factor:g}",
                            args.threads)
            best = max((p["test_accuracy"] for p in run["curve"]), default=0.0)
            tuning.append({"lr": lr * factor, "val_accuracy_best": best,
                           "train_loss_last": run["curve"][-1]["train_loss"] if run["curve"] else None})
        chosen = max(tuning, key=lambda t: (t["val_accuracy_best"], -(t["train_loss_last"] or 0)))["lr"] if tuning else lr
        step = measure(arm, overrides, budget, counts, args.canvas, args.threads)
        entry = payload["arms"].setdefault(arm, {})
        entry.update(settings=settings, lr=chosen, tuning=tuning, plan=step["plan"], input_px=step["input_px"], runs=[])
        for seed in args.seeds:
            run = train_run(arm, overrides + [f"optim.lr={chosen:g}"], data,
                            (f"manifest-{args.variant}.csv", f"manifest-{args.variant}.csv"), data / "test", budget,
                            counts, 60 * args.cpu_minutes, seed, runs / f"{arm}-seed{seed}", args.threads)
            entry["runs"].append({**run, "plan": step["plan"], "peak_bytes": step["peak_bytes"]})
            entry["summary"] = summary(entry["runs"])
            write_results(payload)
            print(f"{arm} seed {seed}: test accuracy {run['curve'][-1]['test_accuracy'] if run['curve'] else None}, "
                  f"{run['cpu_seconds'] / 60:.1f} CPU-minutes, plan {step['plan']}", flush=True)
    plot(payload, common.RESULTS / f"learning-{suite}.png")
    if "down" in payload["arms"]:
        contact_sheet(data / "test", payload["arms"]["down"]["input_px"], common.RESULTS / f"learning-{suite}-detail.png")
    rows = [{"arm": a, "mode": e["plan"]["mode"], "tile": e["plan"]["tile_size"], "tiles": e["plan"]["n_tiles"],
             "input px": e["input_px"], "lr": e["lr"], "peak MB": e["runs"][0]["peak_bytes"] / 1e6,
             **e["summary"]} for a, e in payload["arms"].items()]
    print(common.markdown_table(rows, [(k, k) for k in ("arm", "mode", "tile", "tiles", "input px", "lr", "peak MB",
                                                        "test_accuracy_mean", "test_accuracy_spread", "seeds")]))
    print(f"budget {budget / 1e6:.2f} MB of tensors; wrote {common.RESULTS}/learning-{suite}.json and .png")


if __name__ == "__main__":
    main()
