"""The CUDA path, checked on a CPU: where only a GPU reaches a line, the device is faked.

Each test names the defect of the CUDA path it guards against: RNG state loaded onto the GPU
at resume, a different number of visible GPUs at resume, reductions left on the GPU, DDP moving
whole images to the GPU, the amp choice on pre-Ampere cards, the offload's unsynchronised host
copies, TF32 left to torch's defaults, unreadable checkpoints.
"""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from streamcnn.engine import streaming
from streamcnn.engine.step import micro_step, optimizer_step
from streamcnn.training import checkpointing, distributed, runner
from streamcnn.training.checkpointing import (CheckpointError, load_checkpoint, load_newest_readable, rng_state,
                                              save_checkpoint, set_rng_state)
from streamcnn.training.config import load_config
from streamcnn.training.distributed import DistributedContext, all_reduce_sum, wrap_ddp
from streamcnn.training.loop import resolve_amp
from streamcnn.utils import precision
from streamcnn.utils.precision import DeviceCapabilities, autocast_dtype, needs_grad_scaler

REPO = Path(__file__).resolve().parents[1]
FAKE_GPU = torch.device("cuda", 0)
TINY = ["data.kind=synthetic", "data.synthetic_size=64", "data.synthetic_count=16", "model.trunk=tiny-cnn",
        "model.head=pool", "model.num_classes=4", "train.batch_size=4", "train.epochs=1", "train.progress=false",
        "train.device=cpu", "optim.warmup_steps=0"]


def _device_of(location) -> torch.device | None:
    if isinstance(location, (str, torch.device)):
        return torch.device(location)
    return None


@pytest.fixture
def load_moves_to_the_device(monkeypatch):
    """``torch.load`` as it behaves with ``map_location=<a GPU>``: every tensor leaves host memory
    (here: for the meta device, which ``torch.set_rng_state`` rejects as it rejects a CUDA tensor)."""
    real_load = torch.load

    def fake_load(f, map_location=None, **kwargs):
        state = real_load(f, map_location="cpu", **kwargs)
        device = _device_of(map_location)
        if device is not None and device.type != "cpu":
            return _to_meta(state)
        return state
    monkeypatch.setattr(torch, "load", fake_load)


def _to_meta(value):
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    return value


def _tiny_trainer() -> runner._Trainer:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return runner._Trainer(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                           torch.amp.GradScaler("cpu", enabled=False))


def test_resume_on_a_gpu_reads_the_random_state_to_the_host(tmp_path, load_moves_to_the_device):
    trainer = _tiny_trainer()
    torch.manual_seed(3)
    state = trainer.state([rng_state()], 1, 5, [], load_config(overrides=TINY), (64, 64))
    save_checkpoint(tmp_path / "last.pt", state)
    expected = torch.rand(4)
    torch.manual_seed(99)
    run = runner._Run(load_config(overrides=TINY), DistributedContext(0, 1, 0, FAKE_GPU), runner.RunFiles(tmp_path),
                      None, trainer, None, None, None, (64, 64), "", None)
    epoch, step, _, _ = runner._resume(run, resume=True)
    assert (epoch, step) == (1, 5)
    assert torch.equal(torch.rand(4), expected)          # the generator continues where it was saved


class _FakeCudaRng:
    def __init__(self, monkeypatch, visible: int):
        self.restored: list[int] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [self.set_state(s, i)
                                                                             for i, s in enumerate(states)])
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.full((8,), i, dtype=torch.uint8)
                                                                      for i in range(visible)])
        self.visible = visible

    def set_state(self, state: torch.Tensor, device: int | str = "cuda") -> None:
        index = device if isinstance(device, int) else 0
        if index >= self.visible:
            raise RuntimeError(f"invalid device ordinal {index}")
        assert state.device.type == "cpu" and state.dtype == torch.uint8
        self.restored.append(index)


@pytest.mark.parametrize("saved, visible", [(2, 1), (1, 2), (2, 2)])
def test_cuda_random_state_survives_a_different_number_of_visible_gpus(monkeypatch, saved, visible):
    cuda = _FakeCudaRng(monkeypatch, visible)
    state = {"python": random.getstate(), "numpy": __import__("numpy").random.get_state(),
             "torch": torch.get_rng_state(), "cuda": [torch.full((8,), i, dtype=torch.uint8) for i in range(saved)]}
    set_rng_state(state)
    assert cuda.restored == list(range(min(saved, visible)))
    saved_now = rng_state()["cuda"]
    assert len(saved_now) == visible and all(s.device.type == "cpu" for s in saved_now)


class _FakeGpuTensors:
    """``Tensor.to`` with a GPU target tags the result instead of moving it; a host target clears the tag."""

    def __init__(self, monkeypatch):
        real_to = torch.Tensor.to

        def fake_to(tensor, *args, **kwargs):
            device = _device_of(kwargs.get("device", args[0] if args else None))
            if device is not None and device.type == "cuda":
                out = tensor.clone()
                out.on_gpu = True
                return out
            out = real_to(tensor, *args, **kwargs)
            if device is not None and getattr(out, "on_gpu", False):
                out = out.clone()
            return out
        monkeypatch.setattr(torch.Tensor, "to", fake_to)


def test_all_reduce_on_nccl_returns_host_tensors(monkeypatch):
    _FakeGpuTensors(monkeypatch)
    reduced_on: list[bool] = []

    def fake_all_reduce(tensor):
        reduced_on.append(getattr(tensor, "on_gpu", False))
        tensor.mul_(2)          # two processes with the same values
    monkeypatch.setattr(distributed.dist, "all_reduce", fake_all_reduce)
    context = DistributedContext(0, 2, 0, FAKE_GPU)
    confusion = torch.tensor([[3, 1], [0, 2]])
    total = all_reduce_sum(confusion, context)
    assert reduced_on == [True]                           # NCCL reduces GPU tensors
    assert not getattr(total, "on_gpu", False)            # and the caller gets host memory back
    assert total.numpy().tolist() == [[6, 2], [0, 4]]


def test_ddp_does_not_move_whole_images_to_the_gpu(monkeypatch):
    made = {}

    class RecordingDDP(nn.Module):
        def __init__(self, module, **kwargs):
            super().__init__()
            made.update(kwargs, module=module)
    monkeypatch.setattr(distributed, "DistributedDataParallel", RecordingDDP)
    model = nn.Linear(2, 2)
    assert wrap_ddp(model, DistributedContext(0, 1, 0, FAKE_GPU)) is model       # one process: no DDP
    wrap_ddp(model, DistributedContext(0, 2, 0, FAKE_GPU))
    # device_ids makes DDP copy every tensor input to that device before forward
    assert made["module"] is model and made.get("device_ids") is None


@pytest.mark.parametrize("device, expected", [
    (DeviceCapabilities("cuda", (9, 0)), torch.bfloat16),
    (DeviceCapabilities("cuda", (8, 0)), torch.bfloat16),
    (DeviceCapabilities("cuda", (7, 5)), torch.float16),     # bf16 there is emulated
    (DeviceCapabilities("cuda", (6, 0)), torch.float16),
    (DeviceCapabilities("cpu", native_bf16=True), torch.bfloat16),
    (DeviceCapabilities("cpu", native_bf16=False), None),
])
def test_amp_auto_is_a_function_of_the_device_capabilities(device, expected):
    assert autocast_dtype("auto", device) is expected
    assert needs_grad_scaler(autocast_dtype("auto", device)) == (expected is torch.float16)
    assert autocast_dtype("off", device) is None
    assert autocast_dtype("bf16", device) is torch.bfloat16


def test_amp_auto_on_a_pre_ampere_card_is_fp16_even_when_torch_calls_bf16_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)        # emulated
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert resolve_amp("auto", FAKE_GPU) is torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert resolve_amp("auto", FAKE_GPU) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        autocast_dtype("fp16", DeviceCapabilities("cpu"))


def _fp16_step(scaler: torch.amp.GradScaler) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    images, labels = torch.rand(2, 1, 16, 16), torch.tensor([0, 2])
    loss, _ = micro_step(model, images, labels, device_type="cpu", amp_dtype=torch.float16, scaler=scaler)
    optimizer_step(optimizer, scaler)
    return loss, before, [p.detach() for p in model.parameters()]


def test_the_fp16_gradscaler_step_runs_and_skips_overflowing_updates():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=needs_grad_scaler(torch.float16))
    loss, before, after = _fp16_step(scaler)
    assert torch.isfinite(loss) and scaler.get_scale() == 2.0**10
    assert any(not torch.equal(b, a) for b, a in zip(before, after))              # the update happened
    overflowing = torch.amp.GradScaler("cpu", init_scale=2.0**100)               # inf once scaled
    loss, before, after = _fp16_step(overflowing)
    assert torch.isfinite(loss) and overflowing.get_scale() < 2.0**100            # the scale backs off
    assert all(torch.equal(b, a) for b, a in zip(before, after))                  # and the update is skipped


def test_offload_waits_for_its_host_copies_before_the_feature_map_is_read(monkeypatch):
    waited = []

    class Stream:
        def synchronize(self):
            waited.append(True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    streaming._wait_for_host_copies(torch.empty(2), FAKE_GPU)            # offloaded: pinned host tensor
    assert waited == [True]
    streaming._wait_for_host_copies(torch.empty(2), torch.device("cpu"))  # nothing in flight on a CPU
    assert waited == [True]


@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_is_set_by_the_run_not_left_to_torch(tmp_path, tf32):
    precision.set_tf32(not tf32)
    try:
        runner.fit(load_config(overrides=[*TINY, f"train.tf32={str(tf32).lower()}", f"out={tmp_path}"]))
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    finally:
        precision.set_tf32(False)


def _truncated_copy(source: Path, target: Path) -> None:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def test_an_unreadable_checkpoint_is_one_line_naming_the_file(tmp_path):
    save_checkpoint(tmp_path / "good.pt", {"step": 1})
    _truncated_copy(tmp_path / "good.pt", tmp_path / "last.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for bad in ("last.pt", "junk.pt"):
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(tmp_path / bad)
        message = str(error.value)
        assert "\n" not in message and str(tmp_path / bad) in message
        assert "truncated" in message or "corrupt" in message


def test_resume_falls_back_to_the_newest_checkpoint_that_reads(tmp_path):
    save_checkpoint(tmp_path / "best.pt", {"step": 4})
    save_checkpoint(tmp_path / "last.pt", {"step": 6})
    said: list[str] = []
    assert load_newest_readable(tmp_path, say=said.append) == (tmp_path / "last.pt", {"step": 6})
    assert said == []
    _truncated_copy(tmp_path / "last.pt", tmp_path / "last.pt")
    path, state = load_newest_readable(tmp_path, say=said.append)
    assert (path, state) == (tmp_path / "best.pt", {"step": 4})
    assert len(said) == 1 and str(tmp_path / "last.pt") in said[0] and str(tmp_path / "best.pt") in said[0]
    path, _ = load_newest_readable(tmp_path / "last.pt")              # a file names its run's others too
    assert path == tmp_path / "best.pt"
    _truncated_copy(tmp_path / "best.pt", tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match="truncated"):
        load_newest_readable(tmp_path)


def test_train_resume_past_a_truncated_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, str(REPO / "tools" / "train.py"), "--out", str(out), "--epochs", "2",
               *[f"--set={o}" for o in TINY if not o.startswith("train.epochs")]]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert (out / "best.pt").is_file()
    _truncated_copy(out / "last.pt", out / "last.pt")
    resumed = subprocess.run(command + ["--resume", "--epochs", "3"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    line = next(line for line in resumed.stdout.splitlines() if "truncated" in line)
    assert str(out / "last.pt") in line and str(out / "best.pt") in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is missing")
def test_plan_measure_on_a_missing_gpu_is_one_line():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "plan.py"), "--model", "tiny-cnn", "--image-size",
                             "64", "--budget", "1GB", "--num-classes", "2", "--device", "cuda", "--measure", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "cuda" in result.stderr.lower()


def test_resume_of_a_run_that_never_saved_starts_from_the_beginning(tmp_path, capsys):
    history = runner.fit(load_config(overrides=[*TINY, f"out={tmp_path / 'new'}"]), resume=True)
    assert len(history) == 1 and (tmp_path / "new" / "last.pt").is_file()
    assert "does not exist yet" in capsys.readouterr().out
