"""Benchmark: peak memory and time of one training step of a trunk, conventional vs streamed.

    python benchmarks/bench_streaming.py                   # CPU matrix (ResNet-18/34/50)
    python benchmarks/bench_streaming.py --device cuda     # GPU matrix (up to 16384^2)
    python benchmarks/bench_streaming.py --quick           # a small smoke run, no results written

Each setting runs in a fresh subprocess: one forward + backward of the trunk
(``features.sum().backward()``) on a random (1, 3, S, S) image, float32 (``--dtype bf16``
uses autocast). Memory: on CPU the process's peak RSS (``ru_maxrss``) and its growth over
the RSS just before the step; on CUDA ``torch.cuda.max_memory_allocated`` and
``max_memory_reserved`` for the step. Time: wall clock (CPU) or CUDA events, median of
``--repeats`` after one warm-up step. Prints a markdown table, writes
``benchmarks/results/streaming_<device>.json`` and a PNG of time and memory against tile size.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, environment, markdown_table, write_json  # noqa: E402

from streamcnn.files import save_figure  # noqa: E402

CPU_MATRIX = [
    # (model, image size, [None = conventional, tile sizes...], checkpoint)
    ("resnet18", 2048, [None, 1024, 512, 256], False),
    ("resnet18", 2048, [1024], True),
    ("resnet18", 1024, [None, 512, 256], False),
    ("resnet34", 1024, [None, 512], False),
    ("resnet50", 1024, [None, 512], False),
    ("resnet50", 1024, [512], True),
]
CUDA_MATRIX = [
    ("resnet18", 4000, [None, 2048, 1024], False),
    ("resnet50", 2048, [None, 1024, 512], False),
    ("resnet50", 4000, [None, 2048, 1024], False),
    ("resnet50", 4000, [2048], True),
    ("resnet50", 8192, [2048], True),
    ("resnet50", 16384, [4096, 2048], True),
]
QUICK_MATRIX = [("resnet18", 256, [None, 128], False)]


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(model: str, size: int, tile: int | None, checkpoint: bool, device: str, dtype: str,
            repeats: int, output_device: str | None) -> dict:
    """One setting, in this process."""
    import torch

    import streamcnn
    from streamcnn.measurement import cpu_allocator_peak
    from streamcnn.models import build_trunk

    torch.manual_seed(0)
    trunk, _ = build_trunk(model)
    trunk = trunk.to(device)
    streamed = streamcnn.StreamingModule(trunk, tile, checkpoint=checkpoint, output_device=output_device)
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
    row = {"model": model, "image": size, "tile": tile, "checkpoint": checkpoint, "dtype": dtype}
    if tile is not None:
        plan = streamed.plan((size, size))
        row.update(tiles=len(plan.tiles), overlap=plan.overlap_factor, max_window=plan.max_window[0])
    if cuda:
        timed(x)                    # cuDNN algorithm choice for these shapes
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    try:
        times = [timed(x) for _ in range(repeats)]
    except torch.cuda.OutOfMemoryError:
        return {**row, "error": "out of memory"}
    row["seconds"] = sorted(times)[len(times) // 2]
    if cuda:
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        row["step_bytes"] = row["peak_allocated_bytes"] - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        row["peak_rss_bytes"] = peak
        row["step_bytes"] = max(0, peak - base)
        # RSS includes the libraries and malloc's fragmentation; the allocator peak is
        # what the step's tensors need (one more, profiled, step).
        row["allocator_peak_bytes"] = cpu_allocator_peak(lambda: step(x))
    return row


def run_isolated(args: argparse.Namespace, model: str, size: int, tile, checkpoint: bool) -> dict:
    spec = json.dumps(dict(model=model, size=size, tile=tile, checkpoint=checkpoint, device=args.device,
                           dtype=args.dtype, repeats=args.repeats, output_device=args.output_device))
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"model": model, "image": size, "tile": tile, "checkpoint": checkpoint, "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_ratios(rows: list[dict], memory_keys: list[str]) -> None:
    """Time and memory of each streamed row relative to conventional on the same model and size."""
    for row in rows:
        ref = next((r for r in rows if r["model"] == row["model"] and r["image"] == row["image"]
                    and r["tile"] is None and not r["checkpoint"] and "seconds" in r), None)
        if ref and "seconds" in row:
            row["time_vs_conventional"] = row["seconds"] / ref["seconds"]
            for key in memory_keys:
                row[key.replace("_bytes", "_vs_conventional")] = row[key] / ref[key]


def plot(rows: list[dict], memory_key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    groups = sorted({(r["model"], r["image"]) for r in rows})
    for model, image in groups:
        pts = sorted((r["tile"], r) for r in rows if (r["model"], r["image"]) == (model, image)
                     and r["tile"] and not r["checkpoint"] and "seconds" in r)
        ref = next((r for r in rows if (r["model"], r["image"]) == (model, image) and r["tile"] is None
                    and "seconds" in r), None)
        if not pts:
            continue
        label = f"{model} {image}px"
        line, = ax_t.plot([t for t, _ in pts], [r["seconds"] for _, r in pts], "o-", label=label)
        ax_m.plot([t for t, _ in pts], [r[memory_key] / 2**30 for _, r in pts], "o-", color=line.get_color(), label=label)
        if ref:
            ax_t.axhline(ref["seconds"], color=line.get_color(), ls=":")
            ax_m.axhline(ref[memory_key] / 2**30, color=line.get_color(), ls=":")
    ax_t.set(xscale="log", xlabel="tile size (px)", ylabel="seconds per step", title="time (dotted: conventional)")
    ax_m.set(xscale="log", xlabel="tile size (px)", ylabel="GiB", title=f"{memory_key} (dotted: conventional)")
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per setting (default: 1 CPU, 3 CUDA)")
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

    jobs = [(m, s, t, c) for m, s, tiles, c in matrix for t in tiles]
    for model, size, tile, checkpoint in tqdm(jobs, desc="settings", unit="run"):
        rows.append(run_isolated(args, model, size, tile, checkpoint))
    add_ratios(rows, ["peak_allocated_bytes"] if cuda else ["peak_rss_bytes", "allocator_peak_bytes"])
    for r in rows:
        for key in ("peak_rss_bytes", "peak_allocated_bytes", "peak_reserved_bytes", "step_bytes",
                    "allocator_peak_bytes"):
            if key in r:
                r[key.replace("_bytes", "_gib")] = r[key] / 2**30
    columns = [("model", "model"), ("image", "image"), ("tile", "tile"), ("checkpoint", "ckpt"),
               ("tiles", "tiles"), ("overlap", "overlap"), ("seconds", "s/step"),
               ("time_vs_conventional", "time x")]
    if cuda:
        columns += [("peak_allocated_gib", "allocated GiB"), ("peak_reserved_gib", "reserved GiB"),
                    ("peak_allocated_vs_conventional", "mem x")]
    else:
        columns += [("peak_rss_gib", "peak RSS GiB"), ("peak_rss_vs_conventional", "RSS x"),
                    ("allocator_peak_gib", "tensors GiB"), ("allocator_peak_vs_conventional", "tensors x")]
    columns.append(("error", "error"))
    print(f"\n{env['device']}, {args.dtype}, batch 1\n")
    print(markdown_table(rows, columns))
    if args.quick:
        return
    name = f"streaming_{'cuda' if cuda else 'cpu'}"
    path = write_json(f"{name}.json", {"environment": env, "dtype": args.dtype, "rows": rows,
                                        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])})
    plot(rows, memory_key, RESULTS / f"{name}.png")
    print(f"\nwrote {path} and {name}.png")


if __name__ == "__main__":
    main()
