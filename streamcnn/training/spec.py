"""The resolved run specification: a config, the device and process group it runs on, its arithmetic.

Every entry point that runs a model from a config (train, evaluate, benchmarks) builds one
:class:`RunSpec` with :func:`resolve_run`, so the device, the autocast dtype and TF32 are chosen
the same way everywhere and only here: ``train.device`` (``auto``: the GPU of this process,
else the CPU), ``train.amp`` (:func:`streamcnn.utils.precision.autocast_dtype`) and
``train.tf32`` (set explicitly, never torch's default).

:func:`describe_run` is the first line ``tools/train.py`` prints: what will run, an estimate of
how long it takes and how to change it. The estimate is FLOPs (counted on fake tensors, no
memory) over a sustained rate: on a CPU the rate measured for a streamed 4000 x 4000 step
(:data:`CPU_FLOPS_PER_CORE`); on a GPU an assumed rate (:data:`GPU_ASSUMED_FLOPS`), said so,
because no GPU has yet measured one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from streamcnn.planning.flops import step_flops
from streamcnn.training.config import TrainConfig, apply_overrides
from streamcnn.training.distributed import DistributedContext, init_distributed, resolve_device
from streamcnn.training.loop import resolve_amp
from streamcnn.training.planned import build_training_model
from streamcnn.utils.cpu import usable_cores
from streamcnn.utils.precision import set_tf32
from streamcnn.utils.units import format_size, parse_size

__all__ = ["RunSpec", "resolve_run", "describe_run", "estimate_seconds", "CPU_FLOPS_PER_CORE", "GPU_ASSUMED_FLOPS",
           "STREAM_OVERHEAD"]

#: sustained FLOP/s of one CPU core in a training step: a streamed ResNet-18 step at 4000 x 4000
#: (4.66 TFLOP conventional, x 1.55 for its plan's 4 tiles) took 91 s on 2 cores with native bf16
#: (the ultramnist-4000 preset with model.trunk=resnet18 under 3GB; docs/gpu.md); the miniature's
#: steps run at a similar rate. CPUs without native bf16 are several times slower.
CPU_FLOPS_PER_CORE = 40e9
#: an ASSUMED sustained rate of one GPU in a bf16 training step (no GPU has measured this code yet)
GPU_ASSUMED_FLOPS = 100e12
#: a streamed step recomputes tile overlaps: about 1.2-1.6x a conventional step's FLOPs (plan reports)
STREAM_OVERHEAD = 1.4


@dataclass(frozen=True)
class RunSpec:
    """A config resolved for this process: the process group and device, the autocast dtype, TF32."""

    config: TrainConfig
    context: DistributedContext
    amp_dtype: torch.dtype | None
    tf32: bool

    @property
    def device(self) -> torch.device:
        return self.context.device


def resolve_run(config: TrainConfig, *, shares: int = 1) -> RunSpec:
    """The :class:`RunSpec` of ``config`` in this process (joining torchrun's or the local process
    group when its environment says so); sets TF32 as ``train.tf32`` says."""
    context = init_distributed(config.train.device, shares)
    set_tf32(config.train.tf32)
    return RunSpec(config, context, resolve_amp(config.train.amp, context.device), config.train.tf32)


def _data_shape(config: TrainConfig) -> tuple[str, int | None, int | None, int | None, int | None]:
    """(what the data is, train images, val images, image side, classes) as far as the config says."""
    d = config.data
    if d.kind == "ultramnist":
        from streamcnn.data.ultramnist import NUM_CLASSES
        from streamcnn.data.variants import VARIANTS
        classes = VARIANTS[d.generate_variant][1] if d.generate_variant in VARIANTS else NUM_CLASSES
        task = "sum of the digits" if d.generate_variant is None else f"the {d.generate_variant!r} variant"
        what = f"UltraMNIST {d.generate_size} x {d.generate_size} ({task}, {classes} classes)"
        return what, d.generate_count, d.generate_val_count, d.generate_size, classes
    if d.kind == "synthetic":
        return (f"the synthetic textures task ({d.synthetic_size} px)", d.synthetic_count,
                max(d.synthetic_count // 4, 4), d.synthetic_size, 4)
    manifest = Path(d.root or ".") / d.manifest
    count = None
    if manifest.is_file():
        count = max(sum(1 for line in manifest.open() if line.strip()) - 1, 0)
    return f"the images of {manifest}", count, None, None, None


def estimate_seconds(config: TrainConfig, device_type: str) -> tuple[float | None, str]:
    """(seconds, basis) of the run's training and validation compute; None when the config does not
    say the image size (a manifest: the first line then gives the per-image basis only)."""
    _, train_count, val_count, side, classes = _data_shape(config)
    m = config.model
    size = m.input_size if m.mode == "downsample" else side
    if size is None or train_count is None:
        return None, "the image size is read from the data"
    filled = apply_overrides(config, [("model.in_channels", m.in_channels or (1 if config.data.kind == "ultramnist" else 3)),
                                      ("model.num_classes", m.num_classes or classes or 2)])
    model = build_training_model(filled)
    probe = min(size, 512)      # a convolution's FLOPs grow with the area: count small, scale up
    per_image = step_flops(model, probe).conventional * (size / probe) ** 2
    per_image *= STREAM_OVERHEAD if m.mode == "stream" else 1.0
    t = config.train
    steps = t.epochs * (train_count // (t.batch_size * t.accumulate))
    if t.max_steps is not None:
        steps = min(steps, t.max_steps)
    epochs = min(t.epochs, max(1, -(-steps * t.batch_size * t.accumulate // max(train_count, 1))))
    flops = per_image * (steps * t.batch_size * t.accumulate + epochs * (val_count or 0) / 3)  # eval: forward only
    if device_type == "cuda":
        rate, basis = GPU_ASSUMED_FLOPS, f"an ASSUMED {GPU_ASSUMED_FLOPS / 1e12:.0f} TFLOP/s: no GPU has measured one"
    else:
        cores = usable_cores()
        rate, basis = CPU_FLOPS_PER_CORE * cores, f"{CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s per core, measured, x {cores} cores"
    return flops / rate, f"{per_image / 1e9:,.1f} GFLOP per image at {basis}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _generation_seconds(config: TrainConfig) -> float:
    if config.data.kind != "ultramnist":
        return 0.0
    from streamcnn.data.ultramnist import generation_seconds
    count = config.data.generate_count + config.data.generate_val_count
    return generation_seconds(config.data.generate_size) * count / max(1, usable_cores())


def describe_run(config: TrainConfig, preset: str | None = None) -> str:
    """One line: what will run (preset, data, model, budget, device, length), for how long, how to change it."""
    device = resolve_device(config.train.device)
    what, train_count, _, _, _ = _data_shape(config)
    t, m = config.train, config.model
    budget = f"under {format_size(parse_size(config.plan.budget))}" if config.plan.budget else "with no budget"
    length = f"{t.epochs} epochs" + (f" of {train_count} images" if train_count is not None else "")
    if t.max_steps is not None:
        length += f", at most {t.max_steps} steps"
    amp = resolve_amp(t.amp, device)
    name = f"preset {preset}" + (" (the CPU default)" if preset == "miniature" and device.type != "cuda" else "") \
        if preset else "your config"
    seconds, basis = estimate_seconds(config, device.type)
    generate = _generation_seconds(config)
    if seconds is None:
        estimate = f"estimate: unknown until {basis}"
    else:
        estimate = f"estimate: about {_duration(seconds)} of training ({basis})"
        if generate > 60:
            estimate += f", plus about {_duration(generate)} generating the images once (then cached)"
    other = "ultramnist-4000" if preset != "ultramnist-4000" else "miniature"
    change = (f"change it: --preset {other}, --set train.epochs=N, --set model.trunk=NAME, --budget SIZE, "
              "--device cpu|cuda")
    return (f"will run: {name}: {what}, {m.trunk} ({m.mode}) {budget} on {device} "
            f"({'float32' if amp is None else str(amp).replace('torch.', '')}), {length}; {estimate}; {change}")
