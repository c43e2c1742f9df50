"""streamcnn.engine.step: the one training step the trainer runs and the planner simulates; plan constraints."""
from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from streamcnn.planning.measurement import measure_step_memory
from streamcnn.planning.memory import predict_step_memory
from streamcnn.models.classifier import TRUNKS, build_model
from streamcnn.planning.search import BudgetError, plan
from streamcnn.engine.step import OPTIMIZERS, micro_step
from streamcnn.training import loop
from streamcnn.training.config import OptimConfig, TrainConfig
from streamcnn.training.runner import apply_memory_plan
from streamcnn.utils.units import pixels_to_unit
from helpers import assert_message

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny real CPU steps: see conftest.py


def resnet18(**config):
    torch.manual_seed(0)
    return build_model("resnet18", head="conv", num_classes=5, in_channels=1, head_kwargs={"width": 32, "depth": 1},
                       **config)


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("accumulate", [2, 4])
def test_predicted_peak_is_the_measured_peak_of_the_trainers_step(accumulate, checkpoint):
    """CPU, fp32, AdamW with weight decay: the planner's fake simulation (two micro-batches) against the
    CPU allocator's peak over the real step (all ``accumulate`` micro-batches, then the optimizer)."""
    model = resnet18(tile_size=96, checkpoint=checkpoint)       # 2x2 tiles at 160 px
    assert len(model.trunk.plan((160, 160)).tiles) == 4
    predicted = predict_step_memory(model, 160, device="cpu", accumulate=accumulate, weight_decay=1e-4)
    measured = measure_step_memory(model, 160, device="cpu", accumulate=accumulate, weight_decay=1e-4, warmup=False)
    assert abs(predicted.allocated_bytes / measured.allocated_bytes - 1) < 0.02, (predicted, measured)
    # the second micro-batch runs with the first's gradients live: a single-batch prediction misses it
    single = predict_step_memory(model, 160, device="cpu", accumulate=1, weight_decay=1e-4)
    assert measured.allocated_bytes > 1.1 * single.allocated_bytes


def test_the_trainer_runs_the_step_the_planner_simulates():
    assert loop.micro_step is micro_step


def test_micro_step_scales_the_backward_by_the_accumulation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    images = (torch.rand(2, 1, 8, 8) * 255).to(torch.uint8)
    labels = torch.tensor([0, 2])
    loss, logits = micro_step(model, images, labels, device_type="cpu", accumulate=4)
    reference = torch.nn.functional.cross_entropy(model(images.float() / 255), labels)
    grad, = torch.autograd.grad(reference, model[0].weight)
    torch.testing.assert_close(model[0].weight.grad, grad / 4, rtol=1e-6, atol=1e-9)
    assert loss.item() == pytest.approx(reference.item()) and logits.shape == (2, 3) and not logits.requires_grad


def test_pixels_to_unit():
    assert pixels_to_unit(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [0.0, 1.0]
    assert pixels_to_unit(torch.tensor([65535], dtype=torch.uint16), torch.float64).dtype == torch.float64
    x = torch.rand(3, dtype=torch.float64)
    assert pixels_to_unit(x) is x


def test_one_optimizer_registry_for_the_trainer_and_the_planner():
    assert set(typing.get_args(OptimConfig.model_fields["name"].annotation)) == set(OPTIMIZERS)
    with pytest.raises(ValueError) as error:
        predict_step_memory(resnet18(), 64, device="cpu", optimizer="sgd")
    assert_message(error, "'sgd'", *(f"'{name}'" for name in OPTIMIZERS))


def test_fixed_knobs_are_constraints_of_the_search():
    budget, tiles = "100GB", [128]
    fixed = plan(resnet18(), 256, budget, device="cuda", tile_sizes=tiles, exhaustive=True, checkpoint=False,
                 offload=False)
    assert {(c.checkpoint, c.offload) for c in fixed.candidates} == {(False, False)}
    # the streamed plan comes with its forward on the same tiles and on the whole image
    assert [(c.mode, c.forward_whole) for c in fixed.candidates] == \
        [("conventional", False), ("stream", False), ("stream", True)]
    no_stream = plan(resnet18(), 256, budget, device="cuda", tile_size=None, exhaustive=True)
    assert [c.mode for c in no_stream.candidates] == ["conventional", "checkpoint"]
    tile = plan(resnet18(), 256, budget, device="cuda", tile_size=128, head_checkpoint=True, offload=False,
                exhaustive=True)
    assert [(c.mode, c.tile_size, c.head_checkpoint, c.forward_whole) for c in tile.candidates] == \
        [("stream", 128, True, False), ("stream", 128, True, True),
         ("stream+checkpoint", 128, True, False), ("stream+checkpoint", 128, True, True)]
    assert tile.to_json()["fixed"] == {"tile_size": 128, "head_checkpoint": True, "offload": False}
    assert all(knob in str(tile) for knob in ("tile_size=128", "head_checkpoint=True", "offload=False"))
    smallest = min(c.predicted_device_bytes for c in fixed.candidates)
    with pytest.raises(BudgetError) as error:   # the fix names the knobs the caller fixed
        plan(resnet18(), 256, smallest - 1, device="cuda", tile_sizes=tiles, checkpoint=False, offload=False)
    assert_message(error, "checkpoint", "offload")


def test_a_config_that_fixes_checkpoint_false_is_planned_with_it():
    """The prediction is made for what runs: a fixed knob is never applied after the choice."""
    config = TrainConfig.model_validate({"model": {"num_classes": 5, "in_channels": 1},
                                         "plan": {"budget": "100GB", "checkpoint": False, "tile_size": 256},
                                         "train": {"accumulate": 2, "device": "cpu", "progress": False}})
    model = resnet18()
    _, report = apply_memory_plan(model, config, (512, 512), torch.device("cpu"))
    assert report["fixed"] == {"tile_size": 256, "checkpoint": False} and report["accumulate"] == 2
    assert all(c["checkpoint"] is False and c["tile_size"] == 256 for c in report["candidates"])
    assert (model.trunk.tile_size, model.trunk.checkpoint) == (report["tile_size"], report["checkpoint"])
    assert (report["tile_size"], report["checkpoint"]) == (256, False)
    running = predict_step_memory(model, 512, device="cpu", accumulate=2, weight_decay=config.optim.weight_decay,
                                  dtype=loop.resolve_amp(config.train.amp, torch.device("cpu")))
    assert running.allocated_bytes == report["predicted_peak_bytes"]


def test_a_config_budget_of_tensors_reaches_the_planner():
    """plan.budget_counts: tensors limits the tensor peak; the same bytes counted as the process's RSS fit nothing."""
    settings = {"model": {"num_classes": 5, "in_channels": 1}, "train": {"device": "cpu", "progress": False, "amp": "off"}}
    conventional = predict_step_memory(resnet18(), 320, device="cpu").allocated_bytes  # the peak is the backward's
    config = TrainConfig.model_validate({**settings, "plan": {"budget": str(conventional - 1), "budget_counts": "tensors"}})
    model = resnet18()
    text, report = apply_memory_plan(model, config, (320, 320), torch.device("cpu"))
    assert report["budget_counts"] == "tensors" and report["mode"] != "conventional"
    assert report["budgeted_bytes"] == report["predicted_peak_bytes"] < conventional and "of tensors" in text
    with pytest.raises(BudgetError, match="no plan fits the budget of .* on cpu"):
        apply_memory_plan(resnet18(), TrainConfig.model_validate({**settings, "plan": {"budget": str(conventional - 1)}}),
                          (320, 320), torch.device("cpu"))
    with pytest.raises(ValueError, match="budget_counts"):
        TrainConfig.model_validate({**settings, "plan": {"budget": "1GB", "budget_counts": "rss"}})


def test_no_class_count_is_assumed_except_by_the_planner():
    # planning by name defaults to 2 classes (issue 25: the head's last layer is a rounding error)
    assert plan("resnet18", 512, "11GB", device="cpu").chosen.fits
    with pytest.raises(TypeError, match="num_classes"):
        build_model("resnet18")


def test_tiny_cnn_plans_and_measures_quietly_from_the_cli():
    """tools/plan.py imports no training code (tiny-cnn used to exist only once that was imported);
    --measure on a CPU prints no profiler trace points or GPU errors."""
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--model", "tiny-cnn", "--image-size",
                             "256", "--budget", "1GB", "--num-classes", "4", "--in-channels", "1", "--device", "cpu",
                             "--json", "--measure"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "tiny-cnn" and report["measured_peak_bytes"] > 0
    assert "gpuGetDeviceCount" not in result.stderr and "profiler_start" not in result.stderr, result.stderr
    assert "tiny-cnn" in TRUNKS


def test_amp_auto_is_bf16_only_on_cpus_with_native_bf16_and_the_cpu_runs_channels_last(monkeypatch):
    from streamcnn.utils import cpu

    cpu_device = torch.device("cpu")
    monkeypatch.setattr(loop, "native_bf16", lambda: True)
    assert loop.resolve_amp("auto", cpu_device) is torch.bfloat16
    monkeypatch.setattr(loop, "native_bf16", lambda: False)
    assert loop.resolve_amp("auto", cpu_device) is None and loop.resolve_amp("off", cpu_device) is None
    assert cpu.preferred_memory_format(cpu_device) is torch.channels_last       # in bf16 and fp32 alike
    assert cpu.preferred_memory_format(torch.device("cuda")) is torch.contiguous_format
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        loop.resolve_amp("fp16", cpu_device)
