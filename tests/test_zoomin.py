"""streamcnn.models.zoomin: two-stage attention sampling, its gradient estimator, and its training."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from streamcnn.engine.step import Strategy, make_optimizer, micro_step, optimizer_step
from streamcnn.models.classifier import build_trunk
from streamcnn.models.zoomin import ZoomInClassifier, _crops

pytestmark = pytest.mark.usefixtures("one_thread")


def zoomin(tile=32, subtile=16, samples=4, seed=0, entropy=0.0, **options) -> ZoomInClassifier:
    torch.manual_seed(seed)
    backbone, channels = build_trunk("tiny-cnn", in_channels=1, width=4)
    return ZoomInClassifier(backbone, channels, 3, 1, tile=tile, subtile=subtile, samples=samples, entropy=entropy,
                            **options)


def test_crops_are_the_cells_the_indices_name():
    image = torch.arange(4 * 6, dtype=torch.float64).reshape(1, 1, 4, 6)     # 2 x 3 cells of 2 px
    crops = _crops(image, torch.tensor([[4, 0]]), 2, cols=3)
    assert torch.equal(crops[0, 0], image[0, 0, 2:4, 2:4]) and torch.equal(crops[1, 0], image[0, 0, 0:2, 0:2])


def test_one_step_trains_both_attention_networks_the_extractor_and_the_classifier():
    model = zoomin()
    assert isinstance(model, Strategy)
    micro_step(model, torch.rand(2, 1, 64, 64), torch.tensor([0, 2]), device_type="cpu")
    for part in (model.attention1, model.attention2, model.backbone, model.classifier):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), part


def test_the_estimators_gradient_is_that_of_the_expectation_over_the_attention():
    """With the Stage I attention the only random choice (one sub-tile per tile), the mean over many
    samples of ``(q / sg(q)) f`` has the gradient of ``sum_i a1_i f_i`` (all tiles, exactly)."""
    model = zoomin(tile=16, subtile=16, samples=20000).double()
    x = torch.rand(1, 1, 32, 32, dtype=torch.float64) * 0.2
    x[..., :16, 16:] += 0.8                  # tiles that differ (similar ones give the exact gradient ~0)
    x[..., 16:, :16] += 0.4
    torch.manual_seed(1)
    model.attend(x)[0].sum().backward()
    sampled = [p.grad.clone() for p in model.attention1.parameters()]
    model.zero_grad()
    low = nn.functional.interpolate(x, scale_factor=0.25, mode="area")
    a1 = model._attention(model.attention1, low, (2, 2))[0]
    with torch.no_grad():
        maps = model.backbone(_crops(x, torch.arange(4)[None], 16, 2))
        f = torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)
    model.classifier((a1.to(f.dtype)[:, None] * f).sum(0, keepdim=True)).sum().backward()
    exact = [p.grad for p in model.attention1.parameters()]
    # over all parameters at once (the last bias shifts every logit alike: its exact gradient is 0)
    sampled, exact = torch.cat([g.flatten() for g in sampled]), torch.cat([g.flatten() for g in exact])
    error = float((sampled - exact).norm() / exact.norm())
    assert error < 0.1, error
    assert float((sampled + exact).norm() / exact.norm()) > 1.5     # the sign and size, not noise


def test_evaluation_is_repeatable_and_training_draws_anew():
    model = zoomin(samples=2)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        assert not all(torch.equal(model(x), model(x)) for _ in range(3))


def test_it_fits_a_few_images():
    model = zoomin(samples=8, entropy=0.01)
    torch.manual_seed(3)
    images = torch.zeros(6, 1, 64, 64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for i, label in enumerate(labels):        # a bright 12 px square in a random place, its brightness the class
        t, l = torch.randint(0, 52, (2,)).tolist()
        images[i, 0, t:t + 12, l:l + 12] = 0.3 + 0.35 * label
    optimizer = make_optimizer("adamw", model, lr=1e-2)
    losses = []
    for _ in range(60):
        loss, _ = micro_step(model, images, labels, device_type="cpu")
        optimizer_step(optimizer)
        losses.append(float(loss))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


def test_bad_sizes_name_the_fix():
    with pytest.raises(ValueError, match="multiple of the sub-tile"):
        zoomin(tile=32, subtile=12)
    with pytest.raises(ValueError, match="choose a tile size dividing both sides"):
        zoomin(tile=24, subtile=12).attend(torch.rand(1, 1, 64, 64))


ZOOMIN_RUN = ["data.kind=synthetic", "data.synthetic_size=128", "data.synthetic_count=16", "model.mode=zoomin",
              "model.strategy_kwargs={tile: 32, subtile: 16, samples: 4}", "model.trunk=tiny-cnn",
              "model.num_classes=4", "train.batch_size=4", "train.accumulate=1", "train.progress=false",
              "train.device=cpu", "train.epochs=1", "optim.schedule=cosine", "optim.warmup_steps=0"]


def test_zoomin_mode_trains_through_the_runner_inside_its_budget(tmp_path):
    from streamcnn.training import fit, load_config

    history = fit(load_config(overrides=[*ZOOMIN_RUN, "plan.budget=1GB", f"out={tmp_path / 'run'}"]))
    report = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert report["method"] == "ZoomInClassifier" and report["description"].startswith("Zoom-In step: 4 of 4 x 4")
    assert 0 < report["predicted_bytes"] < report["budget_bytes"] == 10**9
    assert len(history) == 1 and history[0]["val_accuracy"] is not None
