"""DDP: two gloo processes on CPU (torchrun) train exactly like one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_message
from streamcnn.training import fit, load_checkpoint, load_config
from streamcnn.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # deterministic, fast tiny CPU runs: see conftest.py

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.kind=synthetic", "data.synthetic_size=128", "data.synthetic_count=32", "model.trunk=tiny-cnn",
        "model.head=pool", "model.num_classes=4", "plan.tile_size=48", "train.accumulate=2", "train.epochs=2",
        "optim.lr=4e-3", "train.progress=false", "train.device=cpu", "train.batch_size=1", "optim.schedule=cosine",
        "optim.warmup_steps=0",
        "train.amp=off"]   # fp32: bf16 (the default on CPUs with native bf16) rounds batch 2 and 2 x 1 differently


def test_two_gloo_processes_match_one_process(tmp_path):
    single = fit(load_config(overrides=[*TINY, "train.batch_size=2", f"out={tmp_path / 'single'}"]))

    overrides = [a for o in [*TINY, "train.batch_size=1"] for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "tools" / "train.py"), "--out", str(tmp_path / "ddp"), *overrides],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = read_metrics(tmp_path / "ddp" / "metrics.jsonl")

    assert [(r["epoch"], r["step"], r["images"]) for r in ddp] == [(r["epoch"], r["step"], r["images"]) for r in single]
    assert [r["step"] for r in ddp] == [8, 16]                        # 32 images / (2 x 2 accumulated) per epoch
    for a, b in zip(ddp, single):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5, abs=1e-6)
        assert a["val_accuracy"] == b["val_accuracy"]
    weights_ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")["model"]
    weights_single = load_checkpoint(tmp_path / "single" / "last.pt")["model"]
    assert weights_ddp.keys() == weights_single.keys()
    for name in weights_single:
        torch.testing.assert_close(weights_ddp[name], weights_single[name], rtol=1e-4, atol=1e-5, msg=name)
    assert len(load_checkpoint(tmp_path / "ddp" / "last.pt")["rng"]) == 2   # each rank's random state


def test_evaluate_under_two_gloo_processes_writes_every_prediction_in_manifest_order(tmp_path):
    import csv

    from streamcnn.data import generate_ultramnist
    from streamcnn.training.evaluation import evaluate_checkpoint

    generate_ultramnist(tmp_path / "train", 4, size=128, split="train", progress=False)
    generate_ultramnist(tmp_path / "test", 5, size=128, split="test", progress=False)   # shards of 3 and 2
    fit(load_config(overrides=["data.kind=manifest", f"data.root={tmp_path / 'train'}", "data.val_fraction=0.25",
                               "model.trunk=tiny-cnn", "model.head=pool", "train.epochs=1", "train.batch_size=1",
                               "train.progress=false", "train.device=cpu", "train.amp=off",
                               f"out={tmp_path / 'run'}"]))
    single = evaluate_checkpoint(tmp_path / "run" / "last.pt", tmp_path / "test", device="cpu",
                                 out=tmp_path / "single", progress=False)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "tools" / "evaluate.py"), "--checkpoint", str(tmp_path / "run" / "last.pt"),
                          "--data", str(tmp_path / "test"), "--device", "cpu", "--out", str(tmp_path / "ddp")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    def rows(folder):
        with open(folder / "predictions.csv", newline="") as f:
            return list(csv.DictReader(f))

    one, two = rows(tmp_path / "single"), rows(tmp_path / "ddp")
    images = sorted((tmp_path / "test" / "images").iterdir())
    assert [r["path"] for r in two] == [r["path"] for r in one] == [str(p) for p in images]
    for a, b in zip(one, two):
        assert a["predicted"] == b["predicted"] and a["label"] == b["label"]
        probabilities = [k for k in a if k.startswith("p_")]
        assert [float(b[k]) for k in probabilities] == pytest.approx([float(a[k]) for k in probabilities], abs=1e-5)
    ddp_report = json.loads((tmp_path / "ddp" / "evaluation.json").read_text())
    assert ddp_report["images"] == single["images"] == 5
    assert ddp_report["confusion_matrix"] == single["confusion_matrix"]


def test_local_processes_split_each_batch_and_train_like_one_process(tmp_path):
    single = fit(load_config(overrides=[*TINY, "train.batch_size=2", "train.processes=1", f"out={tmp_path / 'one'}"]))
    split = fit(load_config(overrides=[*TINY, "train.batch_size=2", "train.processes=2", f"out={tmp_path / 'two'}"]))
    assert [(r["epoch"], r["step"], r["images"]) for r in split] == [(r["epoch"], r["step"], r["images"]) for r in single]
    for a, b in zip(split, single):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5, abs=1e-6)
    # the run's files record the config as given (a whole batch), so --resume splits it the same way
    assert load_config(tmp_path / "two" / "config.yaml").train.batch_size == 2


def test_a_failure_in_a_local_process_is_raised_here(tmp_path):
    config = load_config(overrides=[*TINY, "train.batch_size=2", "train.processes=2", "train.amp=fp16",
                                    f"out={tmp_path / 'bad'}"])
    with pytest.raises(ValueError, match="train.amp=fp16 needs a CUDA device"):
        fit(config)


def test_auto_takes_one_process_per_core_for_long_runs_within_each_share_of_the_budget(monkeypatch):
    from streamcnn.training.datasets import build_datasets
    from streamcnn.training.distributed import init_distributed
    from streamcnn.training.runner import LOCAL_PROCESS_MIN_STEPS, local_processes

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    epochs = f"train.epochs={LOCAL_PROCESS_MIN_STEPS // 8 + 1}"       # 8 steps an epoch
    base = [*TINY, "train.batch_size=4", "train.accumulate=1"]
    data, _ = build_datasets(load_config(overrides=base), init_distributed("cpu"))
    assert local_processes(load_config(overrides=[*base, "plan.budget=8GB"]), data) == 1   # 16 steps: not worth it
    assert local_processes(load_config(overrides=[*base, epochs, "plan.budget=8GB"]), data) == 4   # 4 cores
    # each process is planned for its share, the waiting parent counting as one more: 3 GB holds three
    # processes' runtime (two training), not five (3 does not divide the batch of 4); 2 GB not three
    assert local_processes(load_config(overrides=[*base, epochs, "plan.budget=3GB"]), data) == 2
    assert local_processes(load_config(overrides=[*base, epochs, "plan.budget=2GB"]), data) == 1
    assert local_processes(load_config(overrides=[*base, "train.processes=2"]), data) == 2     # as told
    with pytest.raises(ValueError) as error:
        local_processes(load_config(overrides=[*base, "train.processes=3"]), data)
    assert_message(error, "train.batch_size=4", "train.processes=3", "evenly", "fewer processes")


def test_auto_plans_each_share_then_forks_and_trains_like_one_process(tmp_path, monkeypatch):
    import streamcnn.training.runner as runner

    monkeypatch.setattr(runner, "LOCAL_PROCESS_MIN_STEPS", 1)       # the tiny run counts as long
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    base = [*TINY, "train.batch_size=2", "plan.budget=8GB"]
    single = fit(load_config(overrides=[*base, "train.processes=1", f"out={tmp_path / 'one'}"]))
    auto = fit(load_config(overrides=[*base, f"out={tmp_path / 'auto'}"]))     # the planner ran before the fork
    processes = [line for line in (tmp_path / "auto" / "plan.txt").read_text().splitlines() if "local processes" in line]
    assert len(processes) == 1, processes          # one line: how many, the setting, each one's share of the batch
    assert_message(processes[0], "2 local processes", "train.processes", "one thread", "1 images", "batch of 2")
    for a, b in zip(auto, single):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
