"""Check the CUDA path on the real device: exactness, offload, planner vs measured peak, resume, amp, torchrun, speed.

    python benchmarks/gpu_check.py                              # one GPU, under 5 minutes
    python benchmarks/gpu_check.py --device cpu --quick         # what applies on a CPU, under 3 minutes

Sections (each ``pass``, ``fail`` or ``skipped`` with a ``reason`` and its figures):

- ``exactness``: streamed vs conventional features, input and parameter gradients, float64 and
  float32 (TF32 off), ResNet-18/50 trunks with frozen BatchNorm and a norm-free trunk.
- ``offload``: the streamed feature map kept in host memory gives the same gradients (CUDA).
- ``planner``: predicted vs ``torch.cuda.max_memory_allocated`` peak for every plan kind, and a
  16384 x 16384 ResNet-18 step under ``--budget`` with the budget enforced (CUDA).
- ``resume``: a run stopped after one epoch and resumed ends with the same parameters as an
  uninterrupted one (bitwise; deterministic algorithms on).
- ``amp``: one bf16 and one fp16 + GradScaler training step with a finite loss.
- ``torchrun``: a one-process ``torchrun`` training run (NCCL on CUDA) that reaches its metrics.
- ``throughput``: streamed vs conventional megapixels per second, ResNet-50 at 4000 x 4000 (CUDA).

Writes ``benchmarks/results/gpu_check-<device>.json`` (``--out PATH``) after every section, so a
run that is cut off keeps what it did, and prints a table at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")    # deterministic cuBLAS; before CUDA starts

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from common import RESULTS, environment, markdown_table, write_json  # noqa: E402

from streamcnn.engine.step import micro_step, optimizer_step, training_step  # noqa: E402
from streamcnn.engine.streaming import StreamingModule  # noqa: E402
from streamcnn.models.classifier import build_model  # noqa: E402
from streamcnn.planning.measurement import measure_step_memory  # noqa: E402
from streamcnn.planning.report import MODES  # noqa: E402
from streamcnn.planning.search import enforce_budget, plan  # noqa: E402
from streamcnn.training.checkpointing import load_checkpoint  # noqa: E402
from streamcnn.training.config import load_config  # noqa: E402
from streamcnn.training.runner import fit  # noqa: E402
from streamcnn.utils.precision import needs_grad_scaler, set_tf32  # noqa: E402
from streamcnn.utils.units import parse_size  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers import forward_backward, relative_error, resnet_trunk  # noqa: E402

#: largest relative error (max |a - b| / max |a|) accepted per dtype
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4}
TINY_RUN = ["data.kind=synthetic", "data.synthetic_size=96", "data.synthetic_count=24", "model.trunk=tiny-cnn",
            "model.head=pool", "model.num_classes=4", "plan.tile_size=48", "train.batch_size=4", "train.amp=off",
            "train.progress=false", "optim.schedule=constant", "optim.warmup_steps=0", "train.tf32=false"]


class Skip(Exception):
    """The section does not apply on this device; the message says why."""


def _cuda_only(ctx: dict, what: str) -> None:
    if ctx["device"].type != "cuda":
        raise Skip(f"CUDA only: {what}")


def _norm_free_trunk(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18-sws-w16-s2", "pool", num_classes=2).trunk.module.to(dtype)


def exactness(ctx: dict) -> dict:
    set_tf32(False)
    device, quick = ctx["device"], ctx["quick"]
    size, tile = ((96, 160), 64) if quick else ((640, 896), 256)
    rows = []
    for dtype in (torch.float64, torch.float32):
        for name in ("resnet18", "resnet50", "norm-free resnet18-sws"):
            body = (_norm_free_trunk(dtype) if name.startswith("norm-free") else resnet_trunk(name, dtype=dtype)).to(device)
            params = [p for p in body.parameters() if p.requires_grad]
            x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
            f0, g0, x0 = forward_backward(body, params, x)
            f1, g1, x1 = forward_backward(StreamingModule(body, tile), params, x)
            error = max([relative_error(f0, f1), relative_error(x0, x1)] + [relative_error(a, b) for a, b in zip(g0, g1)])
            rows.append({"trunk": name, "dtype": str(dtype).replace("torch.", ""), "max_relative_error": error,
                         "tolerance": TOLERANCE[dtype], "ok": error <= TOLERANCE[dtype]})
    bad = [r for r in rows if not r["ok"]]
    return {"status": "fail" if bad else "pass", "image": list(size), "tile": tile, "tf32": False, "rows": rows,
            "reason": f"{len(bad)} of {len(rows)} over tolerance" if bad else "every trunk within tolerance"}


def offload(ctx: dict) -> dict:
    _cuda_only(ctx, "on a CPU the feature map is in host memory already")
    set_tf32(False)
    device = ctx["device"]
    body = resnet_trunk("resnet18", dtype=torch.float32).to(device)
    params = [p for p in body.parameters() if p.requires_grad]
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    on = forward_backward(StreamingModule(body, 512, output_device="cpu"), params, x)
    off = forward_backward(StreamingModule(body, 512), params, x)
    same = torch.equal(on[0].cpu(), off[0].cpu()) and all(torch.equal(a, b) for a, b in zip(on[1], off[1]))
    error = max(relative_error(a.cpu().float(), b.cpu().float()) for a, b in zip([on[0], *on[1]], [off[0], *off[1]]))
    return {"status": "pass" if error <= TOLERANCE[torch.float32] else "fail", "bitwise_equal": same,
            "max_relative_error": error, "reason": "offload on and off agree" if same else "within float32 tolerance"}


def planner(ctx: dict) -> dict:
    _cuda_only(ctx, "the prediction is of the CUDA caching allocator (CPU: benchmarks/bench_planner.py)")
    device, budget = ctx["device"], ctx["budget"]
    side = 1024 if ctx["quick"] else 2048
    rows = []
    for mode in MODES:
        model = build_model("resnet18", "conv", num_classes=10)
        report = plan(model, side, "70GB", dtype="bf16", device="cuda", modes=[mode], counts="tensors")
        report.apply(model)
        measured = measure_step_memory(model, side, dtype="bf16", device=device)
        predicted = report.chosen.predicted_peak_bytes
        rows.append({"mode": mode, "image": side, "tile": report.chosen.tile_size, "predicted_bytes": predicted,
                     "measured_bytes": measured.allocated_bytes, "error": measured.allocated_bytes / predicted - 1})
    torch.cuda.empty_cache()
    enforcement = enforce_budget(budget, device)
    try:
        model = build_model("resnet18", "conv", num_classes=10)
        big = 4096 if ctx["quick"] else 16384
        report = plan(model, big, budget, dtype="bf16", device="cuda")
        report.apply(model)
        measured = measure_step_memory(model, big, dtype="bf16", device=device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)     # the later sections run uncapped
        torch.cuda.empty_cache()
    under = measured.reserved_bytes + (enforcement.get("context_allowance_bytes") or 0) <= parse_size(budget)
    worst = max(abs(r["error"]) for r in rows)
    return {"status": "pass" if under else "fail", "rows": rows, "worst_relative_error": worst,
            "budget_step": {"image": big, "plan": report.chosen.label, "budget": budget,
                            "predicted_device_bytes": report.chosen.predicted_device_bytes,
                            "measured_reserved_bytes": measured.reserved_bytes, "enforcement": enforcement},
            "reason": f"{big} px ResNet-18 step {'within' if under else 'OVER'} {budget}; worst per-mode miss "
                      f"{worst:.1%}"}


def resume(ctx: dict) -> dict:
    set_tf32(False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = str(ctx["device"])
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        common = [*TINY_RUN, f"train.device={device}"]
        fit(load_config(overrides=[*common, "train.epochs=2", f"out={runs / 'whole'}"]))
        fit(load_config(overrides=[*common, "train.epochs=1", f"out={runs / 'cut'}"]))
        fit(load_config(overrides=[*common, "train.epochs=2", f"out={runs / 'cut'}"]), resume=True)
        whole, cut = (load_checkpoint(runs / name / "last.pt")["model"] for name in ("whole", "cut"))
    differing = [k for k in whole if not torch.equal(whole[k], cut[k])]
    torch.use_deterministic_algorithms(False)
    return {"status": "fail" if differing else "pass", "parameters": len(whole), "differing": differing[:5],
            "reason": "bitwise equal to the uninterrupted run" if not differing else
                      f"{len(differing)} tensors differ from the uninterrupted run"}


def amp(ctx: dict) -> dict:
    device, rows = ctx["device"], []
    # a CPU has no fast fp16 convolutions: a small trunk there, the same code path
    trunk, side = ("resnet18", 256) if device.type == "cuda" else ("tiny-cnn", 64)
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        model = build_model(trunk, "pool", num_classes=4, tile_size=side // 2).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(dtype))
        images, labels = torch.rand(2, 3, side, side), torch.tensor([0, 3])
        loss, _ = micro_step(model, images, labels, device_type=device.type, amp_dtype=dtype, scaler=scaler)
        optimizer_step(optimizer, scaler)
        rows.append({"dtype": str(dtype).replace("torch.", ""), "trunk": trunk, "image": side,
                     "grad_scaler": scaler.is_enabled(),
                     "loss": float(loss), "finite": bool(torch.isfinite(loss))})
    ok = all(r["finite"] for r in rows)
    return {"status": "pass" if ok else "fail", "rows": rows,
            "reason": "finite losses" if ok else "a non-finite loss"}


def torchrun(ctx: dict) -> dict:
    _cuda_only(ctx, "NCCL needs a GPU (CPU runs use gloo, tested by tests/test_training_ddp.py)")
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   str(REPO / "tools" / "train.py"), "--out", str(Path(tmp) / "run"), "--device", "cuda",
                   *[f"--set={o}" for o in TINY_RUN if o != "train.progress=false"], "--set=train.epochs=1"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)
        metrics = Path(tmp) / "run" / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    ok = done.returncode == 0 and bool(rows) and rows[-1].get("val_accuracy") is not None
    tail = (done.stderr.strip().splitlines() or [""])[-1]
    return {"status": "pass" if ok else "fail", "returncode": done.returncode, "epochs": len(rows),
            "reason": "reached its final metrics (one process: NCCL reductions are trivial at world size 1)"
                      if ok else f"exit {done.returncode}: {tail[:200]}"}


def throughput(ctx: dict) -> dict:
    _cuda_only(ctx, "a ResNet-50 step at 4000 x 4000 takes about 15 minutes on a 2-core CPU")
    device, side, rows = ctx["device"], 2000 if ctx["quick"] else 4000, []
    images, labels = torch.randint(0, 256, (1, 1, side, side), dtype=torch.uint8), torch.tensor([3])
    for name, tile in (("conventional", None), ("streamed", 1024)):
        model = build_model("resnet50", "conv", num_classes=28, in_channels=1, tile_size=tile).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        try:
            seconds = []
            for _ in range(3):          # the first is warm-up
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                training_step(model, images, labels, optimizer, device_type="cuda", amp_dtype=torch.bfloat16)
                torch.cuda.synchronize(device)
                seconds.append(time.perf_counter() - start)
            rows.append({"plan": name, "tile": tile, "seconds_per_step": min(seconds[1:]),
                         "megapixels_per_second": side * side / 1e6 / min(seconds[1:])})
        except torch.OutOfMemoryError:
            rows.append({"plan": name, "tile": tile, "seconds_per_step": None, "megapixels_per_second": None,
                         "note": "out of memory"})
        del model, optimizer
        torch.cuda.empty_cache()
    return {"status": "pass", "image": side, "dtype": "bf16", "rows": rows, "reason": "measured"}


SECTIONS: list[tuple[str, Callable[[dict], dict]]] = [
    ("exactness", exactness), ("offload", offload), ("planner", planner), ("resume", resume), ("amp", amp),
    ("torchrun", torchrun), ("throughput", throughput)]


def run_sections(ctx: dict, out: Path, only: list[str] | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {"environment": environment(str(ctx["device"])), "device": str(ctx["device"]),
                              "quick": ctx["quick"], "budget": ctx["budget"], "sections": {}}
    for name, section in SECTIONS:
        if only and name not in only:
            continue
        start = time.perf_counter()
        try:
            entry = section(ctx)
        except Skip as why:
            entry = {"status": "skipped", "reason": str(why)}
        except (Exception, torch.OutOfMemoryError) as error:  # noqa: BLE001 - a failed section is a result
            entry = {"status": "fail", "reason": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                     if str(error) else type(error).__name__}
        entry["seconds"] = round(time.perf_counter() - start, 2)
        result["sections"][name] = entry
        write_json(out, result)        # after every section: a cut-off run keeps what it did
        print(f"{name}: {entry['status']} ({entry['seconds']:.0f} s) - {entry['reason']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller images (what a CPU runs in minutes)")
    parser.add_argument("--budget", default="11GB", help="the planner section's budget (default 11GB)")
    parser.add_argument("--only", nargs="+", choices=[name for name, _ in SECTIONS], help="run only these sections")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/gpu_check-<device>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py: error: --device cuda but no GPU is visible; use --device cpu", file=sys.stderr)
        return 1
    try:
        parse_size(args.budget)
    except ValueError as error:
        print(f"gpu_check.py: error: {error}", file=sys.stderr)
        return 1
    out = args.out or RESULTS / f"gpu_check-{device.type}.json"
    result = run_sections({"device": device, "quick": args.quick, "budget": args.budget}, out, args.only)
    rows = [{"section": k, **{f: v.get(f) for f in ("status", "seconds", "reason")}} for k, v in result["sections"].items()]
    print("\n" + markdown_table(rows, [("section", "section"), ("status", "status"), ("seconds", "s"),
                                       ("reason", "reason")]))
    print(f"\nwrote {out}")
    return 1 if any(v["status"] == "fail" for v in result["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
