"""benchmarks/bench_learning.py: the budget rule, CPU-time reading and resumption (no training)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_learning  # noqa: E402


def test_the_budget_scales_with_the_pixels_from_11_gb_at_4000_px():
    assert bench_learning.scaled_budget(4000) == 11 * 10**9
    assert bench_learning.scaled_budget(256) == 45_056_000      # 11 GB x (256 / 4000)^2
    assert bench_learning.scaled_budget(512) == 4 * bench_learning.scaled_budget(256)


def test_cpu_seconds_counts_the_process_user_and_system_time():
    before = bench_learning.cpu_seconds(os.getpid())
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    assert bench_learning.cpu_seconds(os.getpid()) - before >= 0.2


def test_a_finished_run_with_the_same_settings_is_reused_without_training(tmp_path):
    out = tmp_path / "stream-seed0"
    out.mkdir()
    finished = {"seed": 0, "cpu_seconds": 1.0, "curve": [], "overrides": ["optim.lr=0.002"]}
    (out / "result.json").write_text(json.dumps(finished))
    args = ("stream", ["optim.lr=0.002"], tmp_path, ("a.csv", "a.csv"), tmp_path, 10**6, "tensors", 1.0, 0, out, 1)
    assert bench_learning.train_run(*args) == finished          # no process started: the folder has no train.log
    assert not (out / "train.log").exists()
