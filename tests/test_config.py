"""Training configs: defaults, YAML files, dotted overrides, and errors that name the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import assert_message
from streamcnn.training.config import ConfigError, TrainConfig, apply_overrides, load_config, parse_override

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_are_the_quick_cpu_run():
    config = load_config()
    assert config == TrainConfig()
    assert (config.data.kind, config.data.generate_variant, config.model.trunk, config.model.head) == (
        "ultramnist", "smallest", "resnet18-sws-w16-s2", "pool")
    assert config.model.in_channels is None and config.model.num_classes is None   # read from the data
    assert config.plan.tile_size == "auto" and config.out is None


def test_yaml_then_overrides_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.01\n  schedule: exponential\nmodel:\n  trunk: resnet50\n")
    config = load_config(path, ["optim.lr=3e-4", "plan.tile_size=1024", "plan.checkpoint=true",
                                "model.head_kwargs={width: 128, depth: 3}", ("train.epochs", 7)])
    assert config.optim.lr == 3e-4                       # override beats the file
    assert config.optim.schedule == "exponential"        # file beats the default
    assert config.model.trunk == "resnet50"
    assert config.plan.tile_size == 1024 and config.plan.checkpoint is True
    assert config.model.head_kwargs == {"width": 128, "depth": 3}
    assert config.train.epochs == 7
    assert config.data == TrainConfig().data             # untouched sections keep defaults


def test_override_values_are_parsed_as_yaml():
    assert parse_override("optim.lr=1e-3") == (["optim", "lr"], 1e-3)
    assert parse_override("plan.budget=11GB") == (["plan", "budget"], "11GB")
    assert parse_override("train.max_steps=null") == (["train", "max_steps"], None)
    assert parse_override("out=runs/2024-01-01") == (["out"], "runs/2024-01-01")


@pytest.mark.parametrize("override, parts", [
    ("optim.lrr=1", ("unknown", "'optim.lrr'", "decay_fraction", "gamma", "lr", "min_lr_ratio", "name", "schedule",
                     "warmup_steps", "weight_decay")),
    ("bogus=1", ("unknown", "'bogus'", "data", "model", "optim", "out", "plan", "train")),
    ("model.trunk.depth=3", ("unknown", "'model.trunk.depth'", "'trunk'", "not a section")),
    ("optim.schedule=cos", ("optim.schedule", "'cosine'", "'exponential'", "'constant'", "'cos'")),
    ("train.epochs=0", ("train.epochs", "1", "(got 0)")),
    ("train.amp=fp8", ("train.amp", "'auto'", "'bf16'", "'fp16'", "'off'", "'fp8'")),
    ("optim.lr", ("'optim.lr'", "section.key=value")),
])
def test_bad_overrides_name_the_key(override, parts):
    with pytest.raises(ConfigError) as error:
        apply_overrides(TrainConfig(), [override])
    assert_message(error, *parts)


def test_amp_off_unquoted_in_yaml_and_on_the_command_line(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  amp: off\n")      # YAML 1.1 reads it as False
    assert load_config(tmp_path / "c.yaml").train.amp == "off"
    assert load_config(overrides=["train.amp=off"]).train.amp == "off"
    with pytest.raises(ConfigError) as error:
        load_config(overrides=["train.amp=on"])
    assert_message(error, "train.amp", "'auto'", "'bf16'", "'fp16'", "'off'")


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "missing.yaml")
    assert_message(error, str(tmp_path / "missing.yaml"), "does not exist", "configs/")
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(typo)
    assert_message(error, "typo.yaml", "unknown", "'train.epoch'", "accumulate", "amp")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_name_real_models(path):
    from streamcnn.models.classifier import HEADS, trunk_factory

    config = load_config(path)
    assert callable(trunk_factory(config.model.trunk)) and config.model.head in HEADS
    assert path.read_text().strip(), "empty config"


def test_quick_cpu_config_spells_out_the_embedded_default():
    shipped = load_config(Path(__file__).resolve().parents[1] / "configs" / "quick-cpu.yaml")
    assert shipped == load_config(overrides=["plan.budget=11GB"])


def test_full_resolution_and_baseline_configs_differ_only_in_resolution():
    root = Path(__file__).resolve().parents[1] / "configs"
    stream = load_config(root / "ultramnist-4000-resnet50-11gb.yaml")
    for size in (512, 1024):
        baseline = load_config(root / f"ultramnist-downsample{size}-resnet50-11gb.yaml")
        assert (baseline.model.mode, baseline.model.input_size, baseline.plan.budget) == ("downsample", size, "11GB")
        assert baseline.data == stream.data and baseline.optim == stream.optim
        assert (baseline.model.trunk, baseline.model.head) == (stream.model.trunk, stream.model.head)
