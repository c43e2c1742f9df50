"""Presets: YAML files under configs/, one function choosing them, and the first line of the main command."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamcnn.training.config import PRESETS, ConfigError, TrainConfig, choose_preset, load_config, preset_path
from streamcnn.training.spec import describe_run, resolve_run

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.kind=synthetic", "data.synthetic_size=64", "data.synthetic_count=8", "model.trunk=tiny-cnn",
        "model.num_classes=4", "train.batch_size=4", "train.progress=true", "optim.warmup_steps=0"]


def _train_tool():
    spec = importlib.util.spec_from_file_location("train_tool_presets", REPO / "tools" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_function_chooses_the_preset_by_device():
    assert choose_preset(None, "cuda") == "ultramnist-4000"
    assert choose_preset(None, "cpu") == "miniature"
    assert choose_preset("ultramnist-4000", "cpu") == "ultramnist-4000"
    assert choose_preset("miniature", "cuda") == "miniature"
    with pytest.raises(ConfigError, match="ultramnist-4000"):
        choose_preset("ultramnist-400", "cpu")
    assert all(preset_path(name).parent == REPO / "configs" for name in PRESETS)


def test_the_miniature_is_the_embedded_defaults_and_4000_is_the_papers_protocol():
    assert load_config(preset_path("miniature")) == TrainConfig()          # its defaults live in config.py only
    paper = load_config(preset_path("ultramnist-4000"))
    d, m = paper.data, paper.model
    assert (d.kind, d.generate_size, d.generate_variant) == ("ultramnist", 4000, None)     # the sum of the digits
    assert (d.generate_count, d.generate_val_count) == (28000, 28000)
    assert d.lazy is True and m.num_classes == 28 and m.in_channels == 1 and m.mode == "stream"
    assert paper.plan.budget == "11GB"


@pytest.mark.parametrize("device, preset", [("cpu", "miniature"), ("cuda", "ultramnist-4000"),
                                            ("cuda:1", "ultramnist-4000")])
def test_the_main_command_scales_with_the_device(device, preset):
    tool = _train_tool()
    args = tool.parse_args(["--budget", "11GB", "--device", device])
    assert tool.config_file_of(args) == (preset_path(preset), preset)
    expected = load_config(preset_path(preset), [("plan.budget", "11GB"), ("train.device", device)])
    assert tool.config_from_args(args).to_dict() == expected.to_dict()
    explicit = tool.parse_args(["--preset", "ultramnist-4000", "--device", "cpu"])
    assert tool.config_file_of(explicit)[1] == "ultramnist-4000"


def test_preset_and_config_together_is_one_line(capsys, tmp_path):
    tool = _train_tool()
    assert tool.main(["--preset", "miniature", "--config", str(REPO / "configs" / "quick-cpu.yaml"),
                      "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--preset" in err and "--config" in err


def test_first_line_on_a_cpu_names_the_miniature_and_the_4000_preset():
    line = describe_run(load_config(preset_path("miniature"), ["train.device=cpu", "plan.budget=11GB"]), "miniature")
    assert "\n" not in line and line.startswith("will run: preset miniature")
    assert "--preset ultramnist-4000" in line and "estimate: about" in line and "cpu" in line


def test_first_line_on_a_gpu_says_its_estimate_is_assumed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    line = describe_run(load_config(preset_path("ultramnist-4000"), ["model.trunk=resnet18"]), "ultramnist-4000")
    assert "\n" not in line and "4000 x 4000" in line and "28 classes" in line and "cuda:0" in line
    assert "bfloat16" in line and "ASSUMED" in line and "--preset miniature" in line


def test_train_and_evaluate_resolve_the_run_the_same_way():
    config = load_config(overrides=[*TINY, "train.device=cpu", "train.amp=off", "train.tf32=false"])
    spec = resolve_run(config)
    assert spec.device == torch.device("cpu") and spec.amp_dtype is None and spec.tf32 is False
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_train_prints_what_will_run_first(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "--preset", "miniature", "--device", "cpu",
                             "--max-steps", "1", "--epochs", "1", "--out", str(tmp_path / "run"),
                             *[f"--set={o}" for o in TINY]], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("will run: preset miniature") and "estimate" in first and "tiny-cnn" in first


def test_the_4000_preset_trains_as_the_manifest_config_of_the_same_protocol():
    preset = load_config(preset_path("ultramnist-4000"))
    manifest = load_config(REPO / "configs" / "ultramnist-4000-resnet50-11gb.yaml")
    assert (preset.model, preset.optim, preset.plan, preset.train) == \
        (manifest.model, manifest.optim, manifest.plan, manifest.train)
