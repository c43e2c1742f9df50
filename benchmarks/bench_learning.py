#!/usr/bin/env python
"""Which method reaches the best test accuracy within the same memory budget and minutes?

The miniature budget-aware UltraMNIST benchmark (docs/learning.md). Every arm is a config
``configs/learning-<arm>.yaml`` run through ``tools/train.py`` with the same ``--budget`` and
``--max-minutes``, one subprocess per arm and seed (``--jobs`` at a time); the test split is
evaluated after every epoch, which gives test accuracy against minutes. Each arm's training
step is then measured in its own fresh subprocess: the CPU allocator's peak
(:mod:`streamcnn.planning.measurement`) and the process's peak RSS, the figure a CPU budget limits;
each run's own peak RSS (which adds the images held in memory) is in its metrics.

    python benchmarks/bench_learning.py --jobs 2 --threads 1      # the headline: 3 seeds, 8 min
    python benchmarks/bench_learning.py --seeds 0 --minutes 4 --pilot
    python benchmarks/bench_learning.py --suite trunks --seeds 0 --minutes 4 --pilot

Suites: ``arms`` (full resolution streamed, downsampled 256/512/1024 of 4000 scaled, PatchGD)
and ``trunks`` (the from-scratch trunk candidates of :mod:`streamcnn.models.scratch`). ``--threads 1``
when other work shares the cores: two OpenMP threads on a busy 2-core machine wait at every
op's barrier (a 131 px step: 10.8 s with 2 threads vs 0.1 s with 1, measured under load). Writes
``benchmarks/results/learning-<suite>-<variant>[-pilot].json`` and ``.png`` and prints the table.
Data: UltraMNIST at ``--size`` px from the project's generator, relabelled as ``--variant``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent
ARMS = {  # arm -> (config, extra overrides)
    "stream": ("learning-stream", []),
    "down256": ("learning-down256", []),
    "down512": ("learning-down512", []),
    "down1024": ("learning-down1024", []),
    "patchgd": ("learning-patchgd", []),
}
# The trunk candidates on the full-resolution arm (the downsampled ones learn nothing to compare):
# streaming computes the same function as conventional training, so trainability does not depend on the plan.
TRUNKS = {kind: ("learning-stream", [f"model.trunk=resnet18-{kind}-w16-s2"]) for kind in ("affine", "fixup", "ws", "ln")}
SUITES = {"arms": ARMS, "trunks": TRUNKS}


def prepare_data(root: Path, size: int, train: int, test: int, variant: str) -> dict:
    """Generate the splits (reused when present) and write the variant's manifests."""
    from streamcnn.data import generate_ultramnist
    from streamcnn.data.variants import write_variant_manifest

    counts = {}
    for split, count in (("train", train), ("test", test)):
        generate_ultramnist(root / split, count, size=size, seed=0, split=split, workers=2, progress=False)
        _, counts[split] = write_variant_manifest(root / split, variant)
    return counts


def _env(threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _train(config: str, overrides: list[str], data: Path, variant: str, budget: str, counts: str, minutes: float,
           seed: int, out: Path, threads: int | None) -> float:
    command = [sys.executable, str(ROOT / "tools/train.py"), "--config", str(ROOT / "configs" / f"{config}.yaml"),
               "--data", str(data / "train"), "--budget", budget, "--max-minutes", str(minutes), "--seed", str(seed),
               "--out", str(out), "--set", f"data.val_root={data / 'test'}", "--set", f"plan.budget_counts={counts}",
               "--set", f"data.manifest=manifest-{variant}.csv", "--set", f"data.val_manifest=manifest-{variant}.csv"]
    for override in overrides:
        command += ["--set", override]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=_env(threads))
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


_MEASURE = """
import json, resource, sys, torch
from streamcnn.planning.measurement import measure_step_memory
from streamcnn.engine.step import allocate_optimizer_state, make_optimizer, training_step
from streamcnn.training.config import load_config
from streamcnn.training.loop import resolve_amp
from streamcnn.training.runner import planned_model
config = load_config(sys.argv[1], json.loads(sys.argv[2]))
size = config.model.input_size if config.model.mode == "downsample" else json.loads(sys.argv[3])
model, _, _ = planned_model(config, (size, size), torch.device("cpu"))   # as the trainer runs it
dtype, batch = resolve_amp(config.train.amp, torch.device("cpu")), config.train.batch_size
# RSS first, without the profiler (its event buffers are not the step's): three steps on uint8 images,
# as the trainer takes them, from a process that has loaded nothing else
optimizer = allocate_optimizer_state(make_optimizer(config.optim.name, model, lr=config.optim.lr,
                                                    weight_decay=config.optim.weight_decay))
images = torch.randint(0, 256, (batch, config.model.in_channels or 1, size, size), dtype=torch.uint8)
labels = torch.zeros(batch, dtype=torch.long)
for _ in range(3):
    training_step(model, images, labels, optimizer, device_type="cpu", amp_dtype=dtype)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
peak = measure_step_memory(model, size, batch=batch, device="cpu", optimizer=config.optim.name, dtype=dtype)
print(json.dumps({"measured_peak_bytes": peak.allocated_bytes, "input_px": size, "dtype": str(dtype),
                  "measured_rss_bytes": rss, "plan": {k: getattr(getattr(model, "trunk", None), k, None)
                                                      for k in ("tile_size", "checkpoint")}}))
"""


def measure_peak(config: str, overrides: list[str], budget: str, counts: str, size: int, threads: int | None) -> dict:
    """One training step of the arm as planned under ``budget``, measured in a fresh process."""
    pairs = [o.split("=", 1) for o in overrides] + [["plan.budget", budget], ["plan.budget_counts", counts],
                                                    ["train.progress", False]]
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(ROOT / "configs" / f"{config}.yaml"),
                             json.dumps(pairs), json.dumps(size)], capture_output=True, text=True, cwd=ROOT,
                            env=_env(threads))
    if result.returncode:
        raise RuntimeError(f"measuring {config} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def read_run(out: Path) -> dict:
    """The run's curve (test accuracy after each epoch against minutes) and its plan."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    minutes, curve = 0.0, []
    for row in rows:
        minutes += (row["seconds"] + row.get("val_seconds", 0.0)) / 60
        curve.append({"epoch": row["epoch"], "minutes": minutes, "test_accuracy": row["val_accuracy"],
                      "train_loss": row["train_loss"], "rss_peak_bytes": row["peak_memory_bytes"]})
    plan = json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else None
    return {"curve": curve, "plan_chosen": plan.get("chosen") if isinstance(plan, dict) else None,
            "plan_text": (out / "plan.txt").read_text().strip().splitlines()[-1]}


def summarise(arm: str, runs: list[dict], peak: dict, budget_bytes: int, counts: str) -> dict:
    finals = [r["curve"][-1]["test_accuracy"] for r in runs if r["curve"]]
    budgeted = peak["measured_peak_bytes"] if counts == "tensors" else peak["measured_rss_bytes"]
    return {"arm": arm, "input_px": peak["input_px"], "measured_peak_MB": peak["measured_peak_bytes"] / 1e6,
            "measured_rss_MB": peak["measured_rss_bytes"] / 1e6, "within_budget": budgeted <= budget_bytes,
            "step_plan": peak["plan"],
            "run_rss_MB": max(r["curve"][-1]["rss_peak_bytes"] for r in runs if r["curve"]) / 1e6,
            "minutes": statistics.mean(r["curve"][-1]["minutes"] for r in runs if r["curve"]),
            "epochs": statistics.mean(r["curve"][-1]["epoch"] for r in runs if r["curve"]),
            "test_accuracy_mean": statistics.mean(finals),
            "test_accuracy_spread": statistics.stdev(finals) if len(finals) > 1 else None, "seeds": len(finals)}


def plot(results: dict, path: Path, title: str) -> None:
    from streamcnn.utils.files import save_figure
    from streamcnn.training.metrics import _pyplot

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for arm, entry in results.items():
        for i, run in enumerate(entry["runs"]):
            xs = [p["minutes"] for p in run["curve"]]
            ys = [p["test_accuracy"] for p in run["curve"]]
            axes.plot(xs, ys, marker="o", color=entry["color"], alpha=0.8, label=arm if i == 0 else None)
    axes.axhline(results[next(iter(results))]["chance"], color="grey", linestyle=":", label="chance")
    axes.set_xlabel("minutes (training + test evaluation)")
    axes.set_ylabel("test accuracy")
    axes.set_title(title)
    axes.legend()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="arms")
    parser.add_argument("--arms", nargs="*", help="a subset of the suite's arms")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=25.0, help="--max-minutes of every run")
    parser.add_argument("--budget", default="80MB", help="--budget of every run")
    parser.add_argument("--budget-counts", default="tensors", choices=["tensors", "process"],
                        help="what the budget limits (plan.budget_counts): the tensor peak, or the process's RSS")
    parser.add_argument("--size", type=int, default=128, help="canvas px of the generated images")
    parser.add_argument("--train-count", type=int, default=40000,
                        help="images generated for training (a variant keeps its class-balanced subset)")
    parser.add_argument("--test-count", type=int, default=1400, help="images generated for the test split")
    parser.add_argument("--variant", default="smallest", help="label variant (streamcnn.data.variants)")
    parser.add_argument("--data", type=Path, default=ROOT / "runs/learning-data", help="generated data folder")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs/learning", help="run folders")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (give each --threads cores / jobs)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the runs (default: torch's)")
    parser.add_argument("--pilot", action="store_true", help="label the results a pilot (too short or too few seeds)")
    parser.add_argument("--tag", help="appended to the results' file name (keeps another setting's results)")
    args = parser.parse_args(argv)

    from streamcnn.data.variants import VARIANTS
    from streamcnn.planning.memory import budget_counts_suffix
    from streamcnn.utils.units import parse_size

    suite = SUITES[args.suite]
    arms = args.arms or list(suite)
    payload = common.environment("cpu")
    payload.update(suite=args.suite, pilot=args.pilot, budget=args.budget, budget_counts=args.budget_counts,
                   max_minutes=args.minutes,
                   seeds=args.seeds, size=args.size, variant=args.variant, threads=args.threads)
    data = args.data / f"{args.size}px"
    payload["images_per_class"] = prepare_data(data, args.size, args.train_count, args.test_count, args.variant)
    chance = 1 / VARIANTS[args.variant][1]
    classes = [f"model.num_classes={VARIANTS[args.variant][1]}"]   # the configs say 10 (the smallest variant)
    colors = ["tab:red", "tab:blue", "tab:cyan", "tab:green", "tab:purple", "tab:orange"]
    name = f"learning-{args.suite}-{args.variant}" + (f"-{args.tag}" if args.tag else "") + ("-pilot" if args.pilot else "")
    results: dict = {arm: {"runs": [], "color": colors[i % len(colors)], "chance": chance} for i, arm in enumerate(arms)}
    # seeds outermost: an interrupted benchmark has every arm's first seed; a finished run is reused
    setting = f"{name}-{args.budget}-{args.budget_counts}-{args.minutes:g}min"   # a finished run is reused only as such
    todo = [(seed, arm, args.runs / setting / f"{arm}-seed{seed}") for seed in args.seeds for arm in arms]

    def run(job: tuple[int, str, Path]) -> float | None:
        seed, arm, out = job
        if (out / "metrics.jsonl").exists() and (out / "last.pt").exists():
            return None
        config, overrides = suite[arm]
        return _train(config, overrides + classes, data, args.variant, args.budget, args.budget_counts, args.minutes,
                      seed, out, args.threads)

    with ThreadPoolExecutor(args.jobs) as pool:      # each run is its own process
        for (seed, arm, out), wall in zip(todo, pool.map(run, todo)):
            results[arm]["runs"].append({"seed": seed, "wall_seconds": wall, **read_run(out)})
            print(f"{arm} seed {seed}: test accuracy {results[arm]['runs'][-1]['curve'][-1]['test_accuracy']:.3f}",
                  flush=True)
    for arm in arms:
        config, overrides = suite[arm]
        peak = measure_peak(config, overrides + classes, args.budget, args.budget_counts, args.size, args.threads)
        results[arm]["summary"] = summarise(arm, results[arm]["runs"], peak, parse_size(args.budget), args.budget_counts)
    payload["load_average_after"] = list(os.getloadavg())
    payload["chance"] = chance
    payload["arms"] = {arm: {k: v for k, v in entry.items() if k != "color"} for arm, entry in results.items()}
    common.write_json(f"{name}.json", payload)
    of = budget_counts_suffix(args.budget_counts)
    plot(results, common.RESULTS / f"{name}.png",
         f"{args.variant} at {args.size} px, budget {args.budget}{of}, {args.minutes:g} min" + (" (pilot)" if args.pilot else ""))
    print(common.markdown_table([results[arm]["summary"] for arm in arms], [
        ("arm", "arm"), ("input_px", "input px"), ("measured_peak_MB", "step: tensor peak (MB)"),
        ("measured_rss_MB", "step: peak RSS (MB)"), ("within_budget", "within budget"), ("run_rss_MB", "run: peak RSS (MB)"),
        ("minutes", "minutes"), ("epochs", "epochs"), ("test_accuracy_mean", "test accuracy (mean)"),
        ("test_accuracy_spread", "spread (std)"), ("seeds", "seeds")]))
    print(f"budget {args.budget}{of}; chance {chance:.3f}; wrote {common.RESULTS / name}.json and .png")


if __name__ == "__main__":
    main()
