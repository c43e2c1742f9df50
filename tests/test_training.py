"""Training loop end to end on the tiny synthetic task: learning, exact resume, errors, baseline."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_message
from streamcnn.models.classifier import build_model
from streamcnn.training import (
    DownsampledDataset,
    NonFiniteLossError,
    SyntheticTextures,
    apply_overrides,
    fit,
    load_checkpoint,
    load_config,
)
from streamcnn.training.metrics import read_metrics
from streamcnn.utils.files import TEMPORARY_GLOB
from streamcnn.training.synthetic import TEXTURES

pytestmark = pytest.mark.usefixtures("one_thread")  # deterministic, fast tiny CPU runs: see conftest.py

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "tools" / "train.py"
# Tiny task, streamed: 128 px images, tiles of 48 px (9 tiles per image).
TINY = ["data.kind=synthetic", "data.synthetic_size=128", "data.synthetic_count=96", "model.trunk=tiny-cnn",
        "model.head=pool", "model.num_classes=4", "plan.tile_size=48", "train.batch_size=4", "train.accumulate=1",
        "optim.lr=4e-3", "train.progress=false", "train.device=cpu",
        "optim.schedule=cosine", "optim.warmup_steps=0"]
# Values that depend on the machine's speed, not on the computation.
TIMING_KEYS = {"seconds", "val_seconds", "images_per_second", "megapixels_per_second", "peak_memory_bytes"}


def tiny_config(out: Path, *extra: str):
    return load_config(overrides=[*TINY, "train.epochs=3", f"out={out}", *extra])


def computed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def _load_train_tool():
    spec = importlib.util.spec_from_file_location("train_tool", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_tool = _load_train_tool()


def cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(TRAIN), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def tiny_cli_args(out: Path, epochs: int) -> list[str]:
    return ["--out", str(out), "--epochs", str(epochs), *[a for o in TINY for a in ("--set", o)]]


def test_synthetic_classes_are_identical_once_downsampled():
    data = SyntheticTextures(8, size=128)
    images = torch.stack([data[i][0] for i in range(8)])
    assert [data[i][1] for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert not torch.equal(images[1], images[2])                     # full resolution: classes differ
    for factor in (2, 4, 8):
        small = F.avg_pool2d(images, factor)
        assert torch.equal(small, torch.full_like(small, 0.5))       # downsampled: all the same grey
    baseline = DownsampledDataset(data, 32)
    assert torch.equal(baseline[1][0], baseline[2][0]) and baseline[1][0].shape == (1, 32, 32)
    assert len(TEXTURES) == data.num_classes == 4


def test_tiny_streamed_run_learns(tmp_path):
    history = fit(tiny_config(tmp_path / "run", "train.epochs=5"))
    model = build_model("tiny-cnn", "pool", num_classes=4, in_channels=1, tile_size=48)
    assert len(model.trunk.plan((128, 128)).tiles) == 9               # streaming really was on
    assert "running with: tile_size=48" in (tmp_path / "run" / "plan.txt").read_text()
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert [row["step"] for row in history] == [24, 48, 72, 96, 120]
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert history[-1]["train_accuracy"] >= 0.6 and history[-1]["val_accuracy"] >= 0.5   # chance: 0.25
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == history
    for name in ("last.pt", "best.pt", "loss_curve.png", "confusion_matrix.png", "config.yaml"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 5 and last["step"] == 120 and last["history"] == history
    assert not list((tmp_path / "run").glob(TEMPORARY_GLOB))          # no temporary files left behind


class _CrashAt(torch.utils.data.Dataset):
    """The synthetic set, raising ``error`` at the ``at``-th item read (a simulated crash)."""

    def __init__(self, data, at: int, error: BaseException):
        self.data, self.at, self.error, self.reads = data, at, error, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads == self.at:
            raise self.error
        return self.data[index]


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tmp_path):
    epochs = ["train.epochs=3", "data.synthetic_count=48"]
    reference = fit(tiny_config(tmp_path / "ref", *epochs))
    train, val = SyntheticTextures(48, 128), SyntheticTextures(12, 128, seed=1)
    # Crash in the middle of epoch 2 (item 1 is the image-size probe, then 48 per epoch).
    crashing = _CrashAt(train, at=1 + 48 + 20, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config(tmp_path / "run", *epochs), train_set=crashing, val_set=val)
    assert [row["epoch"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]
    resumed = fit(tiny_config(tmp_path / "run", *epochs), resume=True, train_set=train, val_set=val)
    assert computed(resumed) == computed(reference)                  # bitwise: same losses, same epochs once
    assert computed(read_metrics(tmp_path / "run" / "metrics.jsonl")) == computed(reference)


def test_kill_9_mid_training_then_resume(tmp_path):
    """A real ``kill -9`` of the CLI during epoch 2, then ``--resume``: same metrics as uninterrupted."""
    victim = cli(*tiny_cli_args(tmp_path / "run", 4))
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert victim.poll() is None, victim.communicate()
        assert time.monotonic() < deadline, "no epoch finished within 120 s"
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert len(read_metrics(metrics)) < 4
    resumed = cli(*tiny_cli_args(tmp_path / "run", 4), "--resume")
    reference = fit(tiny_config(tmp_path / "ref", "train.epochs=4"))
    _, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert [row["epoch"] for row in read_metrics(metrics)] == [1, 2, 3, 4]
    assert computed(read_metrics(metrics)) == computed(reference)


class _PoisonAfter(_CrashAt):
    """The synthetic set, whose images become NaN from the ``at``-th read on."""

    def __getitem__(self, index):
        self.reads += 1
        image, label = self.data[index]
        return (torch.full_like(image, float("nan")) if self.reads >= self.at else image), label


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    train = _PoisonAfter(SyntheticTextures(16, 128), at=1 + 16 + 5, error=None)
    with pytest.raises(NonFiniteLossError) as error:
        fit(tiny_config(tmp_path / "run", "train.epochs=3"), train_set=train, val_set=None)
    assert_message(error, "nan", "epoch 2", "step 6", "before the update", "last good checkpoint")
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 1 and last["step"] == 4
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert [row["epoch"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]


def test_label_outside_the_classes(tmp_path):
    data = [(SyntheticTextures(4, 128)[0][0], label) for label in (0, 1, 7, 2)]
    with pytest.raises(ValueError) as error:
        fit(tiny_config(tmp_path / "run", "train.epochs=1", "train.batch_size=2"), train_set=data)
    assert_message(error, "label 7", "0..3", "model.num_classes")


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    def error_of(*args: str) -> str:
        assert train_tool.main(list(args)) == 1
        return capsys.readouterr().err.strip()

    def cli_message(err: str, *parts: str) -> None:
        assert err.startswith("train.py: error: "), err
        assert_message(err, *parts)

    cli_message(error_of("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a")),
                str(tmp_path / "nowhere"), "does not exist", "--data", "manifest.csv")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.csv").write_text("file,class\nx.tif,1\n")
    cli_message(error_of("--data", str(tmp_path / "bad"), "--out", str(tmp_path / "b")),
                str(tmp_path / "bad" / "manifest.csv"), "missing", "'path (or slide_id)'", "'label'", "'file'", "'class'")
    cli_message(error_of("--set", "train.epoch=3"), "override", "unknown", "'train.epoch'", "accumulate", "amp")
    cli_message(error_of("--resume"), "--resume", "--out DIR", "last.pt")


def test_budget_makes_the_planner_stream(tmp_path):
    """A budget below the conventional step's predicted peak: the run streams, as the planner chose."""
    from streamcnn.planning.search import plan
    from streamcnn.training import build_training_model
    from streamcnn.training.loop import resolve_amp

    config = tiny_config(tmp_path / "run", "train.epochs=1", "data.synthetic_count=16", "plan.tile_size=auto", "model.in_channels=1")
    amp = resolve_amp(config.train.amp, torch.device("cpu"))     # bf16 on CPUs with native bf16
    table = plan(build_training_model(config), (128, 128), "1GB", batch=4, device="cpu", exhaustive=True, dtype=amp)
    peaks = {c.name: c.predicted_device_bytes for c in table.candidates if c.tile_size in (None, 64)}
    assert peaks["stream"] < peaks["checkpoint"] <= peaks["conventional"]
    budget = (peaks["stream"] + peaks["checkpoint"]) // 2
    history = fit(apply_overrides(config, [("plan.budget", str(budget))]))
    chosen = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert (chosen["mode"], chosen["budget_bytes"]) == ("stream", budget)
    assert f"running with: tile_size={chosen['tile_size']}, checkpoint=False" in (tmp_path / "run" / "plan.txt").read_text()
    assert len(history) == 1 and history[0]["step"] == 4


def test_budget_nothing_fits_exits_with_the_planners_message(tmp_path, capsys):
    args = ["--budget", "1kB", "--out", str(tmp_path / "run"), *[a for o in TINY for a in ("--set", o)],
            "--set", "plan.tile_size=auto"]
    assert train_tool.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: "), err
    assert_message(err, "no plan fits", "1.00 kB", "cpu", "StreamingClassifier", "budget of at least")
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("limit, steps", [("train.max_steps=5", [5]), ("train.max_minutes=1e-5", [1])])
def test_step_and_time_limits_end_the_run_with_an_evaluated_epoch(tmp_path, limit, steps):
    history = fit(tiny_config(tmp_path / "run", "train.epochs=3", limit))
    assert [row["step"] for row in history] == steps and [row["epoch"] for row in history] == [1]
    assert history[0]["images"] == 4 * steps[0] and history[0]["val_accuracy"] is not None
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == steps[0]


def test_schedules_per_optimizer_step():
    from streamcnn.training.config import OptimConfig
    from streamcnn.training.optim import build_optimizer, build_scheduler

    def lrs(config: OptimConfig, total: int, per_epoch: int) -> list[float]:
        optimizer = build_optimizer(torch.nn.Linear(2, 2), config)
        scheduler = build_scheduler(optimizer, config, total, per_epoch)
        values = []
        for _ in range(total):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return values

    cosine = lrs(OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", decay_fraction=1.0), total=6, per_epoch=3)
    assert cosine == pytest.approx([0.5, 1.0, 1.0, 0.5 * (1 + 0.5 ** 0.5), 0.5, 0.5 * (1 - 0.5 ** 0.5)])
    late = lrs(OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", decay_fraction=0.5), total=6, per_epoch=3)
    assert late == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 0.5])    # constant, then the last half decays
    paper = lrs(OptimConfig(name="adam", lr=1.0, schedule="exponential", gamma=0.5, warmup_steps=0), total=6, per_epoch=2)
    assert paper == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    groups = build_optimizer(torch.nn.Linear(2, 2), OptimConfig(weight_decay=0.1)).param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 0.1), (1, 0.0)]   # no decay on the bias


def test_bf16_autocast_trains_on_cpu_and_fp16_is_refused(tmp_path):
    history = fit(tiny_config(tmp_path / "bf16", "train.epochs=1", "data.synthetic_count=16", "train.amp=bf16"))
    assert history[0]["step"] == 4 and math.isfinite(history[0]["train_loss"])
    with pytest.raises(ValueError) as error:
        fit(tiny_config(tmp_path / "fp16", "train.epochs=1", "train.amp=fp16"))
    assert_message(error, "train.amp=fp16", "CUDA", "bf16", "off")
