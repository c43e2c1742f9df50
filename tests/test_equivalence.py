"""Streamed training follows conventional training step by step (benchmarks/bench_equivalence.py, short)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_equivalence  # noqa: E402

from streamcnn.engine.step import loss_of  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("trunk", bench_equivalence.TRUNKS)
def test_float64_streamed_training_has_the_conventional_trajectory(trunk):
    run = bench_equivalence.compare(trunk, torch.float64, steps=8)
    assert run["n_tiles"] >= 4
    losses = run["loss_conventional"]   # 4 steps are one pass over the 32 images: the second pass fits them better
    assert sum(losses[4:]) < sum(losses[:4])
    assert run["max_rel_loss_diff"] <= 1e-9 and run["max_rel_param_diff"] <= 1e-9


def test_a_different_model_is_told_apart():
    """The comparison can fail: a streamed run from other initial parameters differs far beyond 1e-9."""
    torch.manual_seed(0)
    a = bench_equivalence.build("norm-free", torch.float64, seed=0)
    b = bench_equivalence.build("norm-free", torch.float64, seed=1)
    b.trunk.tile_size = 48
    images, labels = bench_equivalence.data(8, 96)
    images = images.double() / 255
    la = bench_equivalence.train(a, images, labels, 2, batch=4, accumulate=1, lr=1e-3)
    lb = bench_equivalence.train(b, images, labels, 2, batch=4, accumulate=1, lr=1e-3)
    assert max(abs(x - y) / abs(x) for x, y in zip(la, lb)) > 1e-6


def test_the_loss_keeps_float64_and_widens_half_precision():
    logits = torch.randn(3, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    assert loss_of(logits, labels).dtype == torch.float64
    assert loss_of(logits.bfloat16(), labels).dtype == torch.float32
