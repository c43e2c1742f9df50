"""Benchmark: one training step of a ResNet-18 from 1024^2 to 16384^2 px under one budget.

    python benchmarks/bench_scale.py                          # 1024 .. 16384 px, budget 3GB
    python benchmarks/bench_scale.py --sizes 1024 2048 --rounds 3
    python benchmarks/bench_scale.py --quick                  # 256/512 px, nothing written

Each image is a single-channel uint8 tiled pyramidal BigTIFF written with the project's
writer (:func:`streamcnn.data.ultramnist.write_pyramid_tiff`) into ``--data-dir`` and read
lazily (:func:`streamcnn.io.open_image`: only the windows a tile needs are decoded). The
planner (:func:`streamcnn.planning.search.plan`, CPU, ``lazy_input=True``) chooses the plan under
``--budget`` in this process; each step then runs in a fresh subprocess: a warm-up step on
a small in-memory image, then ONE training step (trunk + pool head, cross-entropy, AdamW:
:func:`streamcnn.engine.step.training_step`, the trainer's step) on the TIFF, under ``--amp``
(``auto``: what ``tools/train.py`` would use here: bf16 autocast on a CPU with native bf16,
fp32 elsewhere; ``off``: fp32; the channels-last layout on every CPU, :mod:`streamcnn.utils.cpu`). Recorded: peak RSS (``ru_maxrss``), its growth over the RSS before the
step, the allocator peak of the step's tensors (a second, profiled step; only up to
``--profile-max`` px, as it doubles the time), seconds, megapixels per second, and the cost
model's predicted time: the plan's relative cost x the step's conventional FLOPs x seconds
per conventional FLOP, measured on the smallest conventional row (1024^2: the size of the
windows plans compute at; a whole-image step can run at a lower FLOP rate: 4096^2 at 1.29x
the 1024^2 rate's time on a 2-core CPU, see docs/benchmarks.md). Conventional steps (the
whole image read into memory) run beside the streamed ones up to ``--conventional-max`` px.
Writes ``benchmarks/results/scale_cpu.json`` and ``scale_cpu.png`` (memory and time against
pixels, with the feature map + its gradient for reference).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import RESULTS, environment, finish_figure, markdown_table, run_worker, write_json  # noqa: E402

from streamcnn.utils.files import pyplot  # noqa: E402
from streamcnn.utils.rss import current_rss_bytes, peak_rss_bytes  # noqa: E402

MODEL, HEAD, CLASSES = "resnet18", "pool", 2


def write_image(path: Path, size: int) -> None:
    """A smooth single-channel pattern (content does not change the compute)."""
    import numpy as np

    from streamcnn.data.ultramnist import write_pyramid_tiff

    if path.exists():
        return
    ramp = (np.arange(size, dtype=np.uint32) * 7 // 13).astype(np.uint8)
    image = np.add.outer(ramp, ramp[::-1])
    write_pyramid_tiff(image, path, compression="deflate")


def amp_dtype(amp: str):
    import torch

    from streamcnn.training.loop import resolve_amp
    return resolve_amp(amp, torch.device("cpu"))


def measure(path: str, size: int, tile, forward_tile, checkpoint: bool, head_checkpoint: bool,
            profile: bool, amp: str = "off") -> dict:
    """One step in this (fresh) process."""
    import torch

    from streamcnn.utils.allocator import allocator_state
    from streamcnn.utils.cpu import preferred_memory_format
    from streamcnn.io import open_image
    from streamcnn.planning.measurement import cpu_allocator_peak
    from streamcnn.models.classifier import build_model
    from streamcnn.engine.step import make_optimizer, training_step

    torch.manual_seed(0)
    model = build_model(MODEL, head=HEAD, num_classes=CLASSES, in_channels=1, tile_size=tile,
                        checkpoint=checkpoint, head_checkpoint=head_checkpoint)
    model.trunk.forward_tile_size = forward_tile
    dtype = amp_dtype(amp)
    model.use_memory_format(preferred_memory_format(torch.device("cpu")))
    opt = make_optimizer("adamw", model, lr=1e-4, foreach=False)
    labels = torch.zeros(1, dtype=torch.long)

    def step(x) -> float:
        t0 = time.perf_counter()
        training_step(model, x, labels, opt, device_type="cpu", amp_dtype=dtype)
        return time.perf_counter() - t0

    saved = model.trunk.tile_size, model.trunk.forward_tile_size
    model.trunk.tile_size = model.trunk.forward_tile_size = None
    step(torch.rand(1, 1, 256, 256))           # kernels, optimizer state: not part of the step
    model.trunk.tile_size, model.trunk.forward_tile_size = saved
    source = open_image(path)
    x = source if tile is not None else torch.from_numpy(source.read_region(0, 0, size, size)[None]).float() / 255
    base = current_rss_bytes()
    seconds = step(x)
    peak = peak_rss_bytes()
    row = {"seconds": seconds, "peak_rss_bytes": peak, "rss_growth_bytes": peak - base, "base_rss_bytes": base,
           "allocator": allocator_state()}
    if profile:
        row["allocator_peak_bytes"] = cpu_allocator_peak(lambda: step(x))
    return row


def run_isolated(spec: dict) -> dict:
    return run_worker(__file__, spec)


def choose(size: int, budget: str, amp: str) -> dict:
    """The planner's fastest streamed plan under the budget, for this size."""
    from streamcnn.planning.search import plan

    report = plan(MODEL, size, budget, in_channels=1, num_classes=CLASSES, head=HEAD, device="cpu",
                  lazy_input=True, modes=["stream", "stream+checkpoint"], dtype=amp_dtype(amp))
    c = report.chosen
    return {"tile": c.tile_size, "forward_tile": c.forward_tile_size, "checkpoint": c.checkpoint,
            "head_checkpoint": c.head_checkpoint, "relative_cost": c.relative_cost, "plan": c.label,
            "predicted_rss_bytes": c.predicted_device_bytes, "predicted_peak_bytes": c.predicted_peak_bytes,
            "max_window": list(c.max_window) if c.max_window else None,
            "conventional_flops": report.flops.conventional, "planning_seconds": report.planning_seconds}


def feature_bytes(size: int, element: int) -> int:
    """The feature map and its gradient (512 channels, stride 32, ``element`` bytes each: 4 fp32, 2 bf16)."""
    return 2 * element * 512 * (size // 32) ** 2


def plot(rows: list[dict], path: Path, budget: int, dtype_name: str) -> None:
    fig, (ax_m, ax_t) = pyplot().subplots(1, 2, figsize=(12, 4.5))
    for mode, color in (("streamed", "tab:blue"), ("conventional", "tab:red")):
        pts = sorted((r["megapixels"], r) for r in rows if r["mode"] == mode and "seconds" in r)
        if not pts:
            continue
        mp = [p for p, _ in pts]
        ax_m.plot(mp, [r["peak_rss_bytes"] / 1e9 for _, r in pts], "o-", color=color, label=f"{mode}: peak RSS")
        ax_m.plot(mp, [r["rss_growth_bytes"] / 1e9 for _, r in pts], "s--", color=color,
                  label=f"{mode}: RSS growth in the step")
        ax_t.plot(mp, [r["seconds"] for _, r in pts], "o-", color=color, label=f"{mode}: measured")
        if mode == "streamed":
            ax_t.plot(mp, [r.get("predicted_seconds") or float("nan") for _, r in pts], "k:", marker="x",
                      label="cost model")
    sizes = sorted({r["image"] for r in rows})
    ax_m.plot([s * s / 1e6 for s in sizes], [r["feature_and_gradient_bytes"] / 1e9 for r in sorted(
        {r["image"]: r for r in rows}.values(), key=lambda r: r["image"])], color="gray", ls=":",
              label=f"feature map + gradient ({dtype_name})")
    ax_m.axhline(budget / 1e9, color="black", lw=1.5, label="budget")
    ax_m.set(xscale="log", yscale="log", xlabel="megapixels", ylabel="GB", title="memory, one training step")
    ax_t.set(xscale="log", yscale="log", xlabel="megapixels", ylabel="seconds", title="time, one training step")
    finish_figure(fig, (ax_m, ax_t), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--budget", default="3GB")
    parser.add_argument("--rounds", type=int, default=1, help="fresh subprocesses per setting, interleaved")
    parser.add_argument("--conventional-max", type=int, default=2048)
    parser.add_argument("--profile-max", type=int, default=4096)
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16"],
                        help="autocast as train.amp (auto: bf16 + channels-last on CPUs with native bf16)")
    parser.add_argument("--data-dir", default=os.environ.get("TMPDIR", "/tmp") + "/streamcnn-bench-scale")
    parser.add_argument("--name", default="scale_cpu")
    parser.add_argument("--quick", action="store_true", help="256 and 512 px; writes nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return
    from streamcnn.utils.units import format_size

    sizes = [256, 512] if args.quick else args.sizes
    env = environment("cpu")
    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    settings = []
    for size in sizes:
        path = data / f"scale-{size}.tif"
        t0 = time.perf_counter()
        write_image(path, size)
        plan = choose(size, args.budget, args.amp)
        print(f"{size}^2: {plan['plan']}, predicted RSS {format_size(plan['predicted_rss_bytes'])} "
              f"(image written in {time.perf_counter() - t0:.0f} s)", flush=True)
        common = {"path": str(path), "size": size, "profile": size <= args.profile_max, "amp": args.amp}
        settings.append(({"mode": "streamed", **plan}, {**common, **{k: plan[k] for k in (
            "tile", "forward_tile", "checkpoint", "head_checkpoint")}}))
        if size <= args.conventional_max:
            settings.append(({"mode": "conventional", "relative_cost": 1.0, "plan": "conventional",
                              "conventional_flops": plan["conventional_flops"]},
                             {**common, "tile": None, "forward_tile": None, "checkpoint": False,
                              "head_checkpoint": False}))
    rows = []
    for i in range(args.rounds):
        for meta, spec in settings:
            print(f"round {i + 1}: {spec['size']}^2 {meta['mode']} ...", flush=True)
            rows.append({"image": spec["size"], "round": i, **meta, **run_isolated(spec),
                         "load_average": os.getloadavg()})
            report(args, env, rows)   # after every step, so that a cut-off run keeps what it measured


def report(args: argparse.Namespace, env: dict, rows: list[dict]) -> None:
    """Median over rounds, the cost model's prediction, table, JSON and PNG."""
    from streamcnn.utils.units import parse_size

    # median over rounds
    merged = []
    for key in dict.fromkeys((r["image"], r["mode"]) for r in rows):
        group = [r for r in rows if (r["image"], r["mode"]) == key and "seconds" in r] or \
                [r for r in rows if (r["image"], r["mode"]) == key]
        row = dict(group[len(group) // 2])
        for k in ("seconds", "peak_rss_bytes", "rss_growth_bytes", "allocator_peak_bytes"):
            values = sorted(r[k] for r in group if k in r)
            if values:
                row[k] = values[len(values) // 2]
        row["rounds"] = len(group)
        row.pop("round", None)
        merged.append(row)
    conventional = [r for r in merged if r["mode"] == "conventional" and "seconds" in r]
    ref = min(conventional, key=lambda c: c["image"]) if conventional else None
    dtype = amp_dtype(args.amp)
    dtype_name = "fp32" if dtype is None else "bf16"
    for r in merged:
        r["megapixels"] = r["image"] ** 2 / 1e6
        r["feature_and_gradient_bytes"] = feature_bytes(r["image"], 4 if dtype is None else 2)
        if "seconds" in r:
            r["megapixels_per_second"] = r["megapixels"] / r["seconds"]
        if ref is not None:
            per_flop = ref["seconds"] / ref["conventional_flops"]
            r["calibrated_on"] = ref["image"]
            r["predicted_seconds"] = per_flop * r["conventional_flops"] * r["relative_cost"]
            if "seconds" in r:
                r["time_vs_predicted"] = r["seconds"] / r["predicted_seconds"]
        for k in ("peak_rss_bytes", "rss_growth_bytes", "allocator_peak_bytes", "predicted_rss_bytes"):
            if k in r:
                r[k.replace("_bytes", "_gb")] = r[k] / 1e9
    columns = [("image", "image px"), ("mode", "mode"), ("plan", "plan"), ("peak_rss_gb", "peak RSS GB"),
               ("predicted_rss_gb", "predicted RSS GB"), ("rss_growth_gb", "RSS growth GB"),
               ("allocator_peak_gb", "allocator peak GB"), ("seconds", "s/step"),
               ("megapixels_per_second", "Mpx/s"), ("predicted_seconds", "predicted s"),
               ("time_vs_predicted", "measured / predicted"), ("error", "error")]
    print(f"\n{env['device']}, budget {args.budget}, {MODEL} + {HEAD} head, "
          f"{'fp32' if dtype is None else 'bf16 autocast, channels-last'}, AdamW, batch 1\n")
    print(markdown_table(merged, columns))
    if args.quick:
        return
    env = {**env, "load_average_after": os.getloadavg()}
    path = write_json(f"{args.name}.json", {"environment": env, "budget": args.budget, "model": MODEL, "head": HEAD,
                                             "amp": args.amp, "autocast": str(dtype),
                                             "rows": merged, "per_round": rows})
    plot(merged, RESULTS / f"{args.name}.png", parse_size(args.budget), dtype_name)
    print(f"\nwrote {path} and {args.name}.png")


if __name__ == "__main__":
    main()
