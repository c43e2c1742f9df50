"""Benchmark: CPU throughput options for one tile's forward + backward.

    python benchmarks/bench_cpu_options.py                 # window 512 px, 3 rounds
    python benchmarks/bench_cpu_options.py --window 736 --rounds 3
    python benchmarks/bench_cpu_options.py --workload default-run --options fp32 channels_last \
        channels_last+keep_heap channels_last+keep_heap+sws --steps 15 --tag default-run-avx2

What a streamed step repeats is one window's forward and backward through the trunk
(``--workload resnet18-window``: ResNet-18, batch 1, 3 channels). ``--workload default-run`` is
instead the step of an earlier embedded default of ``python tools/train.py`` (the learning
benchmark's full-resolution step): the from-scratch ``resnet18-ws-w16-s2`` trunk and pool head, a
batch of 64 one-channel 128 px images, the loss and an AdamW step (``--window`` is ignored); its
``+sws`` option is the trunk the default now trains. Each option runs in a fresh subprocess, the options
interleaved, ``--rounds`` times; a row is the median over rounds of the median of
``--steps`` timed steps after one warm-up step (compilation happens in the warm-up and is
reported apart):

* ``fp32``: the default.
* ``channels_last``: trunk and window in ``torch.channels_last``.
* ``bf16``: ``torch.autocast("cpu", torch.bfloat16)``.
* ``bf16+channels_last``.
* ``compile``: ``torch.compile(trunk, dynamic=False)``: interior windows share one shape, so
  one compilation serves all of them (border windows add a few more).
* ``bf16+channels_last+compile``: all three.
* ``channels_last+keep_heap`` (and ``fp32+keep_heap``): with :func:`streamcnn.utils.allocator.keep_freed_memory`,
  as the trainer runs on CPU: freed blocks stay in glibc's heap for the next step. The row also
  records the step's minor page faults.
* ``channels_last+keep_heap+sws`` (``--workload default-run`` only): the same with the
  ``resnet18-sws-w16-s2`` trunk, the same function with each scale and bias folded into its
  convolution (:class:`streamcnn.models.scratch.ScaledStdConv2d`).

Writes ``benchmarks/results/cpu_options.json`` and ``cpu_options.png`` (``cpu_options-<tag>.*`` with
``--tag``). An option is worth turning on by default
only if it is faster than ``fp32`` in every round.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import RESULTS, environment, markdown_table, write_json  # noqa: E402

from streamcnn.utils.files import pyplot, save_figure  # noqa: E402

OPTIONS = ["fp32", "channels_last", "bf16", "bf16+channels_last", "compile", "bf16+channels_last+compile",
           "fp32+keep_heap", "channels_last+keep_heap", "channels_last+keep_heap+sws"]


def measure(option: str, window: int, steps: int, workload: str = "resnet18-window") -> dict:
    import resource

    import torch

    from streamcnn.utils.allocator import keep_freed_memory
    from streamcnn.models.classifier import build_model, build_trunk

    if "keep_heap" in option and not keep_freed_memory():
        raise RuntimeError("keep_freed_memory() did not apply (not glibc, or STREAMCNN_TAME_MALLOC set)")
    torch.manual_seed(0)
    if workload == "default-run":
        kind = "sws" if "sws" in option else "ws"
        trunk = build_model(f"resnet18-{kind}-w16-s2", "pool", num_classes=10, in_channels=1)
        x, labels = torch.randn(64, 1, 128, 128), torch.randint(0, 10, (64,))
    else:
        if "sws" in option:
            raise ValueError("the sws option is the default run's trunk: use --workload default-run")
        trunk, _ = build_trunk("resnet18")
        x, labels = torch.randn(1, 3, window, window), None
    if "channels_last" in option:
        trunk = trunk.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    run = torch.compile(trunk, dynamic=False) if "compile" in option else trunk
    optimizer = torch.optim.AdamW(trunk.parameters(), lr=1e-3) if labels is not None else None
    bf16 = "bf16" in option

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = run(x)
        loss = torch.nn.functional.cross_entropy(out.float(), labels) if labels is not None else out.float().sum()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        for p in trunk.parameters():
            p.grad = None
        return time.perf_counter() - t0

    first = step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = sorted(step() for _ in range(steps))
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    return {"option": option, "seconds": times[len(times) // 2], "first_step_seconds": first,
            "page_faults_per_step": faults}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--options", nargs="+", default=OPTIONS, choices=OPTIONS)
    parser.add_argument("--workload", default="resnet18-window", choices=["resnet18-window", "default-run"])
    parser.add_argument("--tag", help="appended to the results' file name (keeps another machine's results)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return
    env = environment("cpu")
    rows = []
    for i in range(args.rounds):
        for option in args.options:
            spec = json.dumps({"option": option, "window": args.window, "steps": args.steps,
                               "workload": args.workload})
            proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
                "option": option, "error": ((proc.stderr or proc.stdout).strip().splitlines() or ["?"])[-1]}
            rows.append({**row, "round": i, "load_average": os.getloadavg()})
            print(f"round {i + 1}: {option} {row.get('seconds', row.get('error'))}", flush=True)
    for row in rows:
        ref = next((r for r in rows if r["round"] == row["round"] and r["option"] == "fp32" and "seconds" in r), None)
        if ref and "seconds" in row:
            row["vs_fp32"] = row["seconds"] / ref["seconds"]
    table = []
    for option in args.options:
        group = [r for r in rows if r["option"] == option and "seconds" in r]
        if not group:
            table.append({"option": option, "error": next(r for r in rows if r["option"] == option).get("error")})
            continue
        med = {k: sorted(r[k] for r in group)[len(group) // 2]
               for k in ("seconds", "first_step_seconds", "vs_fp32", "page_faults_per_step")}
        table.append({"option": option, **med, "faster_every_round": all(r["vs_fp32"] < 1 for r in group),
                      "rounds": len(group)})
    what = (f"ResNet-18 trunk, window {args.window}^2, forward + backward" if args.workload == "resnet18-window"
            else "the default run's step (resnet18-ws-w16-s2 + pool, 64 x 1 x 128^2, AdamW)")
    name = "cpu_options" + (f"-{args.tag}" if args.tag else "")
    print(f"\n{env['device']}, {what}\n")
    print(markdown_table(table, [("option", "option"), ("seconds", "s/step"), ("vs_fp32", "vs fp32"),
                                 ("first_step_seconds", "first step s"), ("page_faults_per_step", "page faults/step"),
                                 ("faster_every_round", "faster every round"),
                                 ("error", "error")]))
    env["load_average_after"] = os.getloadavg()
    path = write_json(f"{name}.json", {"environment": env, "workload": args.workload, "window": args.window,
                                       "rows": table, "per_round": rows})
    plot(table, what, env["device"], name)
    print(f"\nwrote {path} and {name}.png")


def plot(table: list[dict], what: str, device: str, name: str) -> None:
    rows = [r for r in table if "vs_fp32" in r]
    fig, ax = pyplot().subplots(figsize=(7, 0.5 * len(rows) + 1.2))
    ax.barh([r["option"] for r in rows], [r["vs_fp32"] for r in rows],
            color=["tab:green" if r["faster_every_round"] else "tab:gray" for r in rows])
    ax.axvline(1, color="black", lw=1)
    ax.invert_yaxis()
    ax.set(xlabel="time vs fp32 (median of rounds; green: faster in every round)",
           title=f"{what}\n{device}")
    fig.tight_layout()
    save_figure(fig, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
