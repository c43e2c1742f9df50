"""Benchmark: peak memory and time of one training step of a trunk, conventional vs streamed.

    python benchmarks/bench_streaming.py                   # CPU matrix (ResNet-18 2048^2), 3 rounds
    python benchmarks/bench_streaming.py --device cuda     # GPU matrix (up to 16384^2)
    python benchmarks/bench_streaming.py --quick           # a small smoke run, no results written

Each setting runs in a fresh subprocess, the settings interleaved, ``--rounds`` times; a row
is the median over rounds (the machine is shared: ratios are taken within a round): one
forward + backward of the trunk (``features.sum().backward()``) on a random (1, 3, S, S)
image, float32 (``--dtype bf16`` uses autocast). A row names its backward tile, the
no-grad forward's tile (``fwd``; "whole" = one window), and whether glibc's allocator was
left untamed (``STREAMCNN_TAME_MALLOC=0``, see streamcnn/allocator.py). ``predicted s`` is
the cost model's time: conventional's measured time in the same round times the plan's
relative cost (:func:`streamcnn.planning.search.relative_cost` on the trunk's FLOPs). Memory: on CPU the process's peak RSS (``ru_maxrss``) and its growth over
the RSS just before the step; on CUDA ``torch.cuda.max_memory_allocated`` and
``max_memory_reserved`` for the step. Time: wall clock (CPU) or CUDA events, median of
``--repeats`` after one warm-up step. Prints a markdown table, writes
``benchmarks/results/streaming_<device>.json`` and a PNG of time and memory against tile size.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

from common import RESULTS, environment, finish_figure, markdown_table, run_worker, write_json  # noqa: E402

from streamcnn.utils.files import pyplot  # noqa: E402
from streamcnn.utils.rss import current_rss_bytes, peak_rss_bytes  # noqa: E402

# (model, image size, tile (None = conventional), forward tile (None = the tile's), checkpoint, tame malloc)
CPU_MATRIX = [
    ("resnet18", 2048, None, None, False, True),
    ("resnet18", 2048, 512, None, False, True),
    ("resnet18", 2048, 1024, 2048, False, True),
    ("resnet18", 2048, 512, None, False, False),
]
CUDA_MATRIX = [
    ("resnet18", 4000, None, None, False, True),
    ("resnet18", 4000, 1024, 4000, False, True),
    ("resnet50", 4000, None, None, False, True),
    ("resnet50", 4000, 1024, 4000, False, True),
    ("resnet50", 8192, 2048, 8192, True, True),
    ("resnet50", 16384, 2048, 4096, True, True),
]
QUICK_MATRIX = [("resnet18", 256, None, None, False, True), ("resnet18", 256, 128, 256, False, True)]


def trunk_relative_cost(streamed, size: int) -> float | None:
    """The cost model's time of this trunk-only step relative to a conventional one."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from streamcnn.planning.flops import StepFlops
    from streamcnn.planning.search import relative_cost

    if streamed.tile_size is None:
        return 1.0
    module = copy.deepcopy(streamed.module).to("meta")
    x = torch.empty(1, 3, size, size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        out = module(x)
        tf = counter.get_total_flops()
        out.sum().backward()
    tb = counter.get_total_flops() - tf
    flops = StepFlops(tf, tb, 0, 0)
    return relative_cost(flops, overlap=streamed.plan((size, size)).overlap_factor,
                         forward_overlap=streamed.forward_plan((size, size)).overlap_factor,
                         checkpoint=streamed.checkpoint)


def measure(model: str, size: int, tile: int | None, forward_tile: int | None, checkpoint: bool, tame: bool,
            device: str, dtype: str, repeats: int, output_device: str | None, profile: bool = True) -> dict:
    """One setting, in this process."""
    import torch

    import streamcnn
    from streamcnn.utils.allocator import allocator_state
    from streamcnn.planning.measurement import cpu_allocator_peak
    from streamcnn.models.classifier import build_trunk

    torch.manual_seed(0)
    trunk, _ = build_trunk(model)
    trunk = trunk.to(device)
    streamed = streamcnn.StreamingModule(trunk, tile, forward_tile_size=forward_tile, checkpoint=checkpoint,
                                         output_device=output_device)
    cuda = device.startswith("cuda")
    amp = dtype != "fp32"

    def step(x):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16,
                            enabled=amp):
            features = streamed(x)
        features.float().sum().backward()
        for p in trunk.parameters():
            p.grad = None

    def timed(x) -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(x)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        step(x)
        return time.perf_counter() - t0

    warm = torch.randn(1, 3, 128, 128, device=device)
    timed(warm)                     # kernels and fx trace, small enough not to set the RSS peak
    del warm
    x = torch.randn(1, 3, size, size, device=device)
    row = {"model": model, "image": size, "tile": tile, "forward_tile": forward_tile, "checkpoint": checkpoint,
           "tame": tame, "dtype": dtype}
    if tile is not None:
        plan, fplan = streamed.plan((size, size)), streamed.forward_plan((size, size))
        row.update(tiles=len(plan.tiles), overlap=plan.overlap_factor, max_window=plan.max_window[0],
                   forward_tiles=len(fplan.tiles), forward_overlap=fplan.overlap_factor, plan=str(plan))
    row["relative_cost"] = trunk_relative_cost(streamed, size)
    if cuda:
        timed(x)                    # cuDNN algorithm choice for these shapes
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss_bytes()
    try:
        times = [timed(x) for _ in range(repeats)]
    except torch.cuda.OutOfMemoryError:
        return {**row, "error": "out of memory"}
    row["seconds"] = sorted(times)[len(times) // 2]
    row["allocator"] = allocator_state()
    if cuda:
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        row["step_bytes"] = row["peak_allocated_bytes"] - base
    else:
        peak = peak_rss_bytes()
        row["peak_rss_bytes"] = peak
        row["step_bytes"] = max(0, peak - base)
        # RSS includes the libraries and malloc's fragmentation; the allocator peak is
        # what the step's tensors need (one more, profiled, step).
        if profile:
            row["allocator_peak_bytes"] = cpu_allocator_peak(lambda: step(x))
    return row


def run_isolated(args: argparse.Namespace, model: str, size: int, tile, forward_tile, checkpoint: bool,
                 tame: bool, profile: bool = True) -> dict:
    spec = dict(model=model, size=size, tile=tile, forward_tile=forward_tile, checkpoint=checkpoint,
                tame=tame, device=args.device, dtype=args.dtype, repeats=args.repeats,
                output_device=args.output_device, profile=profile)
    env = {**os.environ, "STREAMCNN_TAME_MALLOC": os.environ.get("STREAMCNN_TAME_MALLOC", "trim") if tame else "0"}
    row = run_worker(__file__, spec, env=env)
    if "error" in row:
        return {"model": model, "image": size, "tile": tile, "forward_tile": forward_tile, "checkpoint": checkpoint,
                "tame": tame, **row}
    return row


def _key(r: dict) -> tuple:
    return r["model"], r["image"], r["tile"], r["forward_tile"], r["checkpoint"], r["tame"]


def add_ratios(rows: list[dict], memory_keys: list[str]) -> None:
    """Per round: time and memory of each row relative to conventional on the same model and
    size, and the cost model's predicted time (conventional's time x relative cost)."""
    for row in rows:
        ref = next((r for r in rows if r["model"] == row["model"] and r["image"] == row["image"]
                    and r["round"] == row["round"] and r["tile"] is None and not r["checkpoint"]
                    and "seconds" in r), None)
        if ref and "seconds" in row:
            row["time_vs_conventional"] = row["seconds"] / ref["seconds"]
            row["predicted_seconds"] = ref["seconds"] * row["relative_cost"]
            row["time_vs_predicted"] = row["seconds"] / row["predicted_seconds"]
            for key in memory_keys:
                if key in row and key in ref:
                    row[key.replace("_bytes", "_vs_conventional")] = row[key] / ref[key]


def medians(rows: list[dict]) -> list[dict]:
    """One row per setting: the median of each number over its rounds."""
    out = []
    for key in dict.fromkeys(_key(r) for r in rows):
        group = [r for r in rows if _key(r) == key]
        row = dict(group[0])
        row.pop("round", None)
        row["rounds"] = len(group)
        for k, v in group[0].items():
            if isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool) and k.endswith("bytes")):
                values = sorted(r[k] for r in group if k in r)
                row[k] = values[len(values) // 2]
        out.append(row)
    return out


def plot(rows: list[dict], memory_key: str, path: Path) -> None:
    """Time (with the cost model's prediction) and memory of every setting, as bars."""
    plt = pyplot()
    rows = [r for r in rows if "seconds" in r]
    labels = [f"{r['model']} {r['image']} " + ("conventional" if r["tile"] is None else
              f"tile {r['tile']} fwd {r['fwd']}" + (" ckpt" if r["checkpoint"] else "")) +
              ("" if r.get("tame", True) else " (glibc default)") for r in rows]
    y = range(len(rows))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 0.5 * len(rows) + 1.5), sharey=True)
    ax_t.barh(y, [r["seconds"] for r in rows], color="tab:blue", label="measured (median)")
    ax_t.plot([r.get("predicted_seconds", r["seconds"]) for r in rows], y, "k|", ms=14, mew=2,
              label="cost model")
    ax_m.barh(y, [r[memory_key] / 2**30 for r in rows], color="tab:green", label=memory_key.replace("_", " "))
    if "step_bytes" in rows[0]:
        ax_m.plot([r["step_bytes"] / 2**30 for r in rows], y, "r|", ms=14, mew=2, label="RSS growth")
    ax_t.set_yticks(list(y), labels, fontsize=8)
    ax_t.invert_yaxis()
    ax_t.set(xlabel="seconds per step", title="time")
    ax_m.set(xlabel="GiB", title="memory")
    finish_figure(fig, (ax_t, ax_m), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per setting (default: 1 CPU, 3 CUDA)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh subprocesses per setting, interleaved")
    parser.add_argument("--output-device", default=None, help="where the feature map lives (e.g. cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; writes nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(measure(**spec)))
        return
    cuda = args.device.startswith("cuda")
    args.repeats = args.repeats or (3 if cuda else 1)
    matrix = QUICK_MATRIX if args.quick else (CUDA_MATRIX if cuda else CPU_MATRIX)
    memory_key = "peak_allocated_bytes" if cuda else "allocator_peak_bytes"
    env = environment(args.device)
    rows = []
    from tqdm import tqdm

    jobs = [(i, setting) for i in range(args.rounds) for setting in matrix]
    for i, setting in tqdm(jobs, desc="settings", unit="run"):
        # the allocator peak (a second, profiled step) is taken in the first round only
        rows.append({**run_isolated(args, *setting, profile=i == 0), "round": i, "load_average": os.getloadavg()})
        summarise(args, env, [dict(r) for r in rows], memory_key)   # a cut-off run keeps what it measured


def summarise(args: argparse.Namespace, env: dict, rows: list[dict], memory_key: str) -> None:
    """Ratios, medians over rounds, table, JSON and PNG."""
    cuda = args.device.startswith("cuda")
    add_ratios(rows, ["peak_allocated_bytes"] if cuda else ["peak_rss_bytes", "allocator_peak_bytes", "step_bytes"])
    per_round, rows = rows, medians(rows)
    for r in rows:
        for key in ("peak_rss_bytes", "peak_allocated_bytes", "peak_reserved_bytes", "step_bytes",
                    "allocator_peak_bytes"):
            if key in r:
                r[key.replace("_bytes", "_gib")] = r[key] / 2**30
    for r in rows:
        r["fwd"] = "whole" if r.get("forward_tiles") == 1 else r.get("forward_tile") or r["tile"]
        r["malloc"] = "tamed" if r.get("tame", True) else "glibc default"
    columns = [("model", "model"), ("image", "image"), ("tile", "tile"), ("fwd", "fwd"), ("checkpoint", "ckpt"),
               ("malloc", "malloc"), ("tiles", "tiles"), ("overlap", "overlap"), ("seconds", "s/step"),
               ("time_vs_conventional", "time x"), ("predicted_seconds", "predicted s"),
               ("time_vs_predicted", "measured/predicted")]
    if cuda:
        columns += [("peak_allocated_gib", "allocated GiB"), ("peak_reserved_gib", "reserved GiB"),
                    ("peak_allocated_vs_conventional", "mem x")]
    else:
        columns += [("peak_rss_gib", "peak RSS GiB"), ("step_gib", "RSS growth GiB"),
                    ("step_vs_conventional", "RSS growth x"),
                    ("allocator_peak_gib", "tensors GiB"), ("allocator_peak_vs_conventional", "tensors x")]
    columns.append(("error", "error"))
    print(f"\n{env['device']}, {args.dtype}, batch 1\n")
    print(markdown_table(rows, columns))
    if args.quick:
        return
    name = f"streaming_{'cuda' if cuda else 'cpu'}"
    env = {**env, "load_average_after": os.getloadavg()}
    path = write_json(f"{name}.json", {"environment": env, "dtype": args.dtype, "rows": rows, "per_round": per_round,
                                        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])})
    plot(rows, memory_key, RESULTS / f"{name}.png")
    print(f"\nwrote {path} and {name}.png")


if __name__ == "__main__":
    main()
