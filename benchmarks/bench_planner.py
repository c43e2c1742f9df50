"""Benchmark: the memory planner's predicted peak against the measured peak, and its speed.

    python benchmarks/bench_planner.py                 # CPU rows (ResNet-18/34/50 at 512/1024 px)
    python benchmarks/bench_planner.py --device cuda   # CUDA rows up to 4000^2, plans under 11 GB
    python benchmarks/bench_planner.py --quick         # two rows, nothing written
    python benchmarks/bench_planner.py --rss           # CPU: predicted vs measured process RSS
    python benchmarks/bench_planner.py --rss-planned issue   # the plans chosen for CPU budgets (issue 25's cases)

Each row builds a model (conv head, 1 input channel, 28 classes, AdamW), sets a plan
(conventional, checkpoint, stream at a tile, stream+checkpoint, offload), predicts one
training step's peak with :func:`streamcnn.planning.memory.predict_step_memory` and measures it with
:func:`streamcnn.planning.measurement.measure_step_memory` (one warm-up step first). CPU: allocator peak
from torch.profiler. CUDA: ``max_memory_allocated`` and ``max_memory_reserved`` of the step,
the CUDA context from ``mem_get_info``, and the raw (un-allocated) prediction, so the CUDA
allowances in ``streamcnn/memory.py`` can be calibrated from the JSON. On CUDA it also plans
ResNet-18/34/50 at 4000^2 under 11 GB (fp32 and bf16), runs the chosen plan under
``enforce_budget`` and checks the reserved peak plus context against the budget.

Also times ``plan("resnet50", 4000, "11GB")`` (lazy and exhaustive) and draws the planner's
peak/cost-vs-tile plot for it. Writes ``benchmarks/results/planner_<device>.json``,
``planner_<device>.png`` (predicted vs measured) and ``planner_tiles.png``. Planning times
taken while other jobs run are not comparable: see ``load_average_before`` in the JSON.
"""
from __future__ import annotations

import argparse
import time

import common
import torch
from common import RESULTS

from streamcnn.utils.files import save_figure
from streamcnn.planning.measurement import measure_step_memory
from streamcnn.planning.memory import CUDA_CONTEXT_BYTES, CUDA_RESERVED_OVERHEAD, CUDA_WORKSPACE_BYTES, predict_step_memory
from streamcnn.models.classifier import build_model
from streamcnn.planning.search import BudgetError, Candidate, enforce_budget, plan
from streamcnn.utils.units import format_size

PLANS = {
    "conventional": dict(tile=None, checkpoint=False, offload=False),
    "checkpoint": dict(tile=None, checkpoint=True, offload=False),
    "stream": dict(checkpoint=False, offload=False),
    "stream+checkpoint": dict(checkpoint=True, offload=False),
    "stream+offload": dict(checkpoint=False, offload=True),
}


def rows_for(device: str, quick: bool) -> list[tuple[str, int, str, int | None, str]]:
    """(model, image size, plan, tile, dtype) rows."""
    if quick:
        return [("resnet18", 512, "conventional", None, "fp32"), ("resnet18", 512, "stream+checkpoint", 256, "fp32")]
    if device == "cpu":
        rows = [("resnet18", 512, m, t, "fp32") for m, t in
                (("conventional", None), ("checkpoint", None), ("stream", 256), ("stream+checkpoint", 256))]
        rows += [("resnet18", 1024, m, t, "fp32") for m, t in
                 (("conventional", None), ("checkpoint", None), ("stream", 512), ("stream+checkpoint", 512))]
        rows += [("resnet34", 1024, m, t, "fp32") for m, t in (("conventional", None), ("stream+checkpoint", 512))]
        rows += [("resnet50", 1024, m, t, "fp32") for m, t in
                 (("conventional", None), ("checkpoint", None), ("stream+checkpoint", 512))]
        return rows
    rows = []
    for model in ("resnet18", "resnet34", "resnet50"):
        for size in (1024, 2048, 4000):
            for mode, tile in (("conventional", None), ("checkpoint", None), ("stream", 1024),
                               ("stream+checkpoint", 1024), ("stream+offload", 512)):
                for dtype in ("fp32", "bf16"):
                    rows.append((model, size, mode, tile, dtype))
    return rows


def candidate(mode: str, tile: int | None) -> Candidate:
    spec = PLANS[mode]
    name = "stream" if mode == "stream+offload" else mode
    return Candidate(name, tile if spec.get("tile", True) is not None else None, spec["checkpoint"],
                     spec["checkpoint"], spec["offload"], 1, 1.0, None, 1.0)


def measure_row(model_name: str, size: int, mode: str, tile: int | None, dtype: str, device: str) -> dict:
    model = build_model(model_name, head="conv", num_classes=28, in_channels=1)
    candidate(mode, tile).configure(model)
    row = {"model": model_name, "image": size, "plan": mode, "tile": tile, "dtype": dtype}
    t0 = time.perf_counter()
    predicted = predict_step_memory(model, size, dtype=dtype, device=device)
    row["predict_seconds"] = time.perf_counter() - t0
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if predicted.reserved_bytes > 0.9 * free:
            row["skipped"] = f"predicted {format_size(predicted.reserved_bytes)} > 90% of free {format_size(free)}"
            return row
        torch.cuda.empty_cache()
    measured = measure_step_memory(model, size, dtype=dtype, device=device)
    row.update(
        predicted_raw_bytes=predicted.live_bytes, predicted_peak_bytes=predicted.allocated_bytes,
        predicted_reserved_bytes=predicted.reserved_bytes, predicted_device_bytes=predicted.process_bytes,
        measured_peak_bytes=measured.allocated_bytes, measured_reserved_bytes=measured.reserved_bytes,
        measured_device_bytes=measured.process_bytes,
        error=predicted.allocated_bytes / measured.allocated_bytes - 1,
        reserved_error=predicted.reserved_bytes / measured.reserved_bytes - 1,
    )
    if device == "cuda":
        row["measured_overhead_bytes"] = measured.allocated_bytes - predicted.live_bytes
        row["measured_reserved_ratio"] = measured.reserved_bytes / measured.allocated_bytes
        row["measured_context_bytes"] = measured.process_bytes - measured.reserved_bytes
    return row


def rss_specs(quick: bool) -> list[dict]:
    """CPU RSS rows: the batch-1 fp32 ImageNet layouts at 512/1024 px, and the trainer's own regime
    (the from-scratch trunk of configs/learning-*.yaml with its pool head, 128 px, batch 64 and 256,
    uint8 images, bf16 autocast where the CPU has native bf16)."""
    from streamcnn.utils.cpu import native_bf16

    base = {"head": "conv", "classes": 28, "batch": 1, "dtype": "fp32", "uint8": False}
    specs = [{**base, "model": m, "image": s, "plan": p, "tile": t} for m, s, p, t, _ in rows_for("cpu", quick)]
    if not quick:
        regime = {"head": "pool", "classes": 10, "uint8": True, "dtype": "bf16" if native_bf16() else "fp32"}
        specs += [{**regime, "model": "resnet18-ws-w16-s2", "image": 128, "plan": p, "tile": None, "batch": b}
                  for b in (64, 256) for p in ("conventional", "checkpoint")]
    return specs


def _rss_model(spec: dict):
    model = build_model(spec["model"], head=spec["head"], num_classes=spec["classes"], in_channels=1)
    if "knobs" in spec:   # a plan the planner chose (forward tile and head checkpointing included)
        model.configure_plan(**spec["knobs"])
    else:
        candidate(spec["plan"], spec["tile"]).configure(model)
    return model


#: (model, image side, CPU budget): the plans a user gets for a CPU budget. "issue": the sizes
#: where the RSS prediction must hold (a ResNet-50 4000^2 step takes about 15 minutes on 2 cores).
PLANNED = {"small": [("resnet18", 1024, "1.5GB"), ("resnet18", 2048, "2GB")],
           "resnet50-4000": [("resnet50", 4000, "3GB")], "resnet18-16384": [("resnet18", 16384, "8GB")]}
PLANNED["issue"] = PLANNED["resnet50-4000"] + PLANNED["resnet18-16384"]


def planned_specs(cases: str) -> list[dict]:
    """RSS rows for the plans ``plan(..., device="cpu")`` chooses for :data:`PLANNED`'s budgets."""
    specs = []
    for model_name, size, budget in PLANNED[cases]:
        base = {"model": model_name, "image": size, "head": "conv", "classes": 28, "batch": 1, "dtype": "fp32",
                "uint8": False, "budget": budget}
        report = plan(_rss_model({**base, "plan": "conventional", "tile": None}), size, budget, device="cpu")
        c = report.chosen
        specs.append({**base, "plan": c.label, "tile": c.tile_size, "knobs": dict(
            tile_size=c.tile_size, checkpoint=c.checkpoint, head_checkpoint=c.head_checkpoint,
            output_device=None, forward_tile_size=c.forward_tile_size)})
    return specs


def rss_worker(spec: dict) -> dict:
    """In a fresh process: three training steps of the row's plan; the process's peak RSS."""
    import resource

    from streamcnn.engine.step import allocate_optimizer_state, make_optimizer, training_step
    from streamcnn.utils.units import resolve_dtype

    from streamcnn.utils.cpu import preferred_memory_format

    model = _rss_model(spec)
    model.use_memory_format(preferred_memory_format(torch.device("cpu")))
    opt = allocate_optimizer_state(make_optimizer("adamw", model, foreach=False))
    shape = (spec["batch"], 1, spec["image"], spec["image"])
    images = torch.randint(0, 256, shape, dtype=torch.uint8) if spec["uint8"] else torch.rand(shape)
    labels = torch.zeros(spec["batch"], dtype=torch.long)
    for _ in range(3 if spec["batch"] > 1 else 1):
        training_step(model, images, labels, opt, device_type="cpu", amp_dtype=resolve_dtype(spec["dtype"]))
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def rss_rows(quick: bool, specs: list[dict] | None = None) -> list[dict]:
    """CPU: predicted process RSS (``predicted_device_bytes``) against the peak RSS of a fresh
    process that runs the plan's training steps (the runtime included, as a user sees it)."""
    import json
    import subprocess
    import sys

    rows = []
    for spec in specs if specs is not None else rss_specs(quick):
        predicted = predict_step_memory(_rss_model(spec), spec["image"], batch=spec["batch"], device="cpu",
                                        dtype=None if spec["dtype"] == "fp32" else spec["dtype"])
        proc = subprocess.run([sys.executable, __file__, "--rss-worker", json.dumps(spec)], capture_output=True,
                              text=True)
        row = {**spec, "predicted_rss_bytes": predicted.process_bytes,
               "predicted_peak_bytes": predicted.allocated_bytes, "predicted_live_bytes": predicted.live_bytes,
               "safe": None}
        if proc.returncode != 0:
            row["error"] = ((proc.stderr or proc.stdout).strip().splitlines() or ["?"])[-1]
        else:
            row["measured_rss_bytes"] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
            row["rss_error"] = row["predicted_rss_bytes"] / row["measured_rss_bytes"] - 1
            row["safe"] = row["predicted_rss_bytes"] >= row["measured_rss_bytes"]
        print(f"{spec['model']} {spec['image']} px batch {spec['batch']} {spec['dtype']} {spec['plan']} "
              f"{spec['tile']}: predicted RSS {format_size(row['predicted_rss_bytes'])}, measured "
              f"{format_size(row.get('measured_rss_bytes', 0))} ({100 * row.get('rss_error', 0):+.1f}%)", flush=True)
        rows.append(row)
    return rows


def budget_rows(device: str) -> list[dict]:
    """Plan at 4000^2 under 11 GB, run the chosen plan under the enforced budget."""
    rows = []
    for model_name in ("resnet18", "resnet34", "resnet50"):
        for dtype in ("fp32", "bf16"):
            row = {"model": model_name, "image": 4000, "budget": "11GB", "dtype": dtype}
            try:
                report = plan(model_name, 4000, "11GB", in_channels=1, num_classes=28, dtype=dtype, device=device)
            except BudgetError as e:
                rows.append({**row, "error": str(e)})
                continue
            row.update(chosen=report.chosen.name, tile=report.chosen.tile_size,
                       predicted_peak_bytes=report.chosen.predicted_peak_bytes,
                       predicted_device_bytes=report.chosen.predicted_device_bytes,
                       planning_seconds=report.planning_seconds)
            model = report.apply(build_model(model_name, head="conv", num_classes=28, in_channels=1))
            torch.cuda.empty_cache()
            enforcement = enforce_budget("11GB", device)
            try:
                measured = measure_step_memory(model, 4000, dtype=dtype, device=device)
                row.update(measured_peak_bytes=measured.allocated_bytes, measured_reserved_bytes=measured.reserved_bytes,
                           measured_device_bytes=measured.process_bytes,
                           error=report.chosen.predicted_peak_bytes / measured.allocated_bytes - 1,
                           reserved_under_budget=measured.reserved_bytes <= enforcement["allocator_cap_bytes"],
                           device_under_budget=measured.process_bytes <= 11 * 10**9)
            except torch.OutOfMemoryError as e:
                row["error"] = f"out of memory under the enforced budget: {str(e).splitlines()[0]}"
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0)
            rows.append(row)
    return rows


def planning_speed() -> dict:
    out = {}
    for name, kwargs in (("resnet50_4000_11GB_fp32", {}), ("resnet50_4000_11GB_bf16", {"dtype": "bf16"}),
                         ("resnet50_4000_4GB_fp32", {"budget": "4GB"}),
                         ("resnet50_4000_11GB_fp32_exhaustive", {"exhaustive": True})):
        kwargs = {"budget": "11GB", **kwargs}
        t0 = time.perf_counter()
        report = plan("resnet50", 4000, kwargs.pop("budget"), in_channels=1, num_classes=28, device="cuda", **kwargs)
        out[name] = {"seconds": time.perf_counter() - t0, "chosen": report.chosen.name,
                     "tile": report.chosen.tile_size, "simulated": sum(c.fits is not None for c in report.candidates)}
        if kwargs.get("exhaustive"):
            report.plot(RESULTS / "planner_tiles.png")
    return out


def plot(rows: list[dict], device: str, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "measured_peak_bytes" in r]
    fig, ax = plt.subplots(figsize=(6, 5))
    colors = {"resnet18": "tab:blue", "resnet34": "tab:orange", "resnet50": "tab:green"}
    for r in done:
        ax.plot(r["measured_peak_bytes"] / 1e9, r["predicted_peak_bytes"] / 1e9, "o", color=colors[r["model"]],
                alpha=0.8)
    lo = min(min(r["measured_peak_bytes"], r["predicted_peak_bytes"]) for r in done) / 1e9 * 0.8
    hi = max(max(r["measured_peak_bytes"], r["predicted_peak_bytes"]) for r in done) / 1e9 * 1.2
    ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="predicted = measured")
    ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="gray", alpha=0.2, label="+-10%")
    for model, color in colors.items():
        ax.plot([], [], "o", color=color, label=model)
    what = "max_memory_allocated" if device == "cuda" else "CPU allocator peak (torch.profiler)"
    ax.set(xscale="log", yscale="log", xlabel=f"measured peak (GB, {what})", ylabel="predicted peak (GB)",
           title=f"planner: one training step, {device}")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="two rows, nothing written")
    parser.add_argument("--rss", action="store_true",
                        help="CPU: predicted vs measured process RSS only (planner_rss_cpu.json)")
    parser.add_argument("--rss-planned", choices=sorted(PLANNED),
                        help="CPU: predicted vs measured RSS of the plans chosen for CPU budgets "
                             "(planner_rss_planned_<cases>_cpu.json)")
    parser.add_argument("--rss-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_worker:
        import json
        print(json.dumps(rss_worker(json.loads(args.rss_worker))))
        return
    env = common.environment(args.device)
    if args.rss_planned:
        import os
        rows = rss_rows(False, planned_specs(args.rss_planned))
        columns = [("model", "model"), ("image", "image"), ("budget", "budget"), ("plan", "plan"),
                   ("predicted_rss_bytes", "predicted RSS"), ("measured_rss_bytes", "measured RSS"),
                   ("rss_error", "error"), ("safe", "predicted >= measured")]
        print(common.markdown_table(rows, columns))
        env["load_average_after"] = os.getloadavg()
        common.write_json(f"planner_rss_planned_{args.rss_planned}_cpu.json", {**env, "rows": rows})
        return
    if args.rss:
        rows = rss_rows(args.quick)
        errors = [abs(r["rss_error"]) for r in rows if "rss_error" in r]
        print(f"largest RSS prediction error: {100 * max(errors):.1f}%")
        if not args.quick:
            import os
            env["load_average_after"] = os.getloadavg()
            common.write_json("planner_rss_cpu.json", {**env, "rows": rows, "max_abs_rss_error": max(errors)})
        return
    rows = []
    for spec in rows_for(args.device, args.quick):
        row = measure_row(*spec, device=args.device)
        rows.append(row)
        print(f"{row['model']} {row['image']} {row['plan']} {row['tile']} {row['dtype']}: "
              + (row.get("skipped") or f"predicted {format_size(row['predicted_peak_bytes'])}, measured "
                 f"{format_size(row['measured_peak_bytes'])} ({100 * row['error']:+.1f}%)"), flush=True)
    columns = [("model", "model"), ("image", "image"), ("plan", "plan"), ("tile", "tile"), ("dtype", "dtype"),
               ("predicted_gb", "predicted GB"), ("measured_gb", "measured GB"), ("error_pct", "error %")]
    if args.device == "cuda":
        columns += [("reserved_gb", "reserved GB"), ("context_gb", "context GB")]
    for r in rows:
        if "measured_peak_bytes" in r:
            r.update(predicted_gb=r["predicted_peak_bytes"] / 1e9, measured_gb=r["measured_peak_bytes"] / 1e9,
                     error_pct=100 * r["error"], reserved_gb=r["measured_reserved_bytes"] / 1e9,
                     context_gb=r.get("measured_context_bytes", 0) / 1e9)
    print(common.markdown_table(rows, columns))
    if args.quick:
        return
    payload = {**env, "device_kind": args.device, "rows": rows,
               "constants": {"CUDA_WORKSPACE_BYTES": CUDA_WORKSPACE_BYTES,
                             "CUDA_RESERVED_OVERHEAD": CUDA_RESERVED_OVERHEAD,
                             "CUDA_CONTEXT_BYTES": CUDA_CONTEXT_BYTES}}
    errors = [abs(r["error"]) for r in rows if "error" in r and isinstance(r["error"], float)]
    payload["max_abs_error"] = max(errors) if errors else None
    if args.device == "cuda":
        measured = [r for r in rows if "measured_overhead_bytes" in r]
        payload["calibration"] = {
            "max_overhead_bytes": max(r["measured_overhead_bytes"] for r in measured),
            "max_reserved_ratio": max(r["measured_reserved_ratio"] for r in measured),
            "max_context_bytes": max(r["measured_context_bytes"] for r in measured),
        }
        payload["budget_rows"] = budget_rows(args.device)
        for r in payload["budget_rows"]:
            print(r)
    payload["planning_speed"] = planning_speed()
    print(payload["planning_speed"])
    plot(rows, args.device, RESULTS / f"planner_{args.device}.png")
    path = common.write_json(f"planner_{args.device}.json", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
