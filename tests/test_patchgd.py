"""streamcnn.models.patchgd: PatchGD with the global patch trains, and its memory is predicted."""
from __future__ import annotations

import random

import pytest
import torch

from helpers import assert_message
from streamcnn.planning.measurement import measure_step_memory
from streamcnn.planning.memory import predict_step_memory
from streamcnn.models.classifier import build_trunk
from streamcnn.models.patchgd import PatchGDClassifier
from streamcnn.engine.step import make_optimizer, training_step

pytestmark = pytest.mark.usefixtures("one_thread")


def patchgd(patch_size=64, sampling=0.25, inner_iterations=2, width=8, seed=0) -> PatchGDClassifier:
    torch.manual_seed(seed)
    random.seed(seed)  # PatchGD samples patches with Python's generator (the trainer seeds it)
    backbone, channels = build_trunk(f"resnet18-ln-w{width}-s2", in_channels=1)
    return PatchGDClassifier(backbone, channels, 5, patch_size=patch_size, sampling=sampling,
                             inner_iterations=inner_iterations, head_depth=1)


def test_one_step_fills_z_and_trains_every_part():
    model = patchgd()
    images, labels = torch.rand(2, 1, 256, 256), torch.tensor([1, 3])
    z = model.fill(images)
    # one feature map per patch (64 px at stride 8: 8 x 8), kept, not averaged
    assert z.shape == (2, 16, 16, 8, 8) and bool((z.abs().sum(dim=(2, 3, 4)) > 0).all())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss, logits = model.micro_step(images, labels, device_type="cpu")
    grads = {name: p.grad for name, p in model.named_parameters()}
    # the backbone (through the sampled patches and the global patch), the aggregator and the classifier
    # (residual branches start at zero, so only their last scale has a gradient at the first step)
    for name in ("backbone.conv1.weight", "backbone.layer2.1.bn2.weight", "aggregator.0.weight",
                 "head.2.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (grads[name] is None or not grads[name].any()), name
    assert logits.shape == (2, 5) and torch.isfinite(loss)
    first = float(loss)
    for _ in range(15):
        optimizer.zero_grad()
        loss, _ = model.micro_step(images, labels, device_type="cpu")
        optimizer.step()
    assert float(loss) < 0.6 * first  # it fits two images


def test_inner_iterations_sample_disjoint_patches_and_keep_their_features_in_z():
    model = patchgd(sampling=0.25, inner_iterations=4).eval()  # 4 x 4 of 16 patches: each patch once
    images, labels = torch.rand(1, 1, 256, 256), torch.tensor([2])
    seen = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    model.micro_step(images, labels, device_type="cpu")
    # fill: 4 chunks of 4 patches; then 4 iterations of (4 sampled patches, 1 global patch)
    assert seen == [4, 4, 4, 4] + [4, 1] * 4
    assert model.grid((256, 256)) == (4, 4) and model.patches_per_iteration((256, 256)) == 4


def test_eval_forward_equals_classify_of_the_filled_block():
    model = patchgd().eval()
    images = torch.rand(2, 1, 128, 192)
    with torch.no_grad():
        expected = model.classify(model.fill(images), model.backbone(model._global(images)), (2, 3))
        assert torch.allclose(model(images), expected)


def test_a_training_forward_with_gradients_is_refused():
    with pytest.raises(RuntimeError) as error:
        patchgd().train()(torch.rand(1, 1, 128, 128))
    assert_message(error, "PatchGD", "micro_step")


def test_bad_patch_size_names_the_fix():
    with pytest.raises(ValueError) as error:
        patchgd(patch_size=96).fill(torch.rand(1, 1, 256, 256))
    assert_message(error, "96", "model.patch_size", "dividing")


def test_prediction_matches_the_cpu_allocator_peak_of_a_patchgd_step():
    model = patchgd(patch_size=64, sampling=0.25, width=16)
    predicted = predict_step_memory(model, 256, device="cpu", batch=2)
    measured = measure_step_memory(model, 256, device="cpu", batch=2, warmup=False)
    assert abs(predicted.allocated_bytes / measured.allocated_bytes - 1) < 0.10, (predicted, measured)


def test_prediction_grows_with_the_sampled_patches_not_with_the_image():
    def activations(size, sampling):
        e = predict_step_memory(patchgd(patch_size=64, sampling=sampling, width=8), size, device="cpu")
        return e.live_bytes - e.base_bytes  # the image itself is in the base (host = device on CPU)

    four, eight, twelve = (activations(256, s) for s in (0.25, 0.5, 0.75))
    assert eight - four == twelve - eight > 0  # every 4 more sampled patches cost the same
    # 4 sampled patches of a 384 px image (36 patches) need what 4 of a 256 px image need, plus tensors of
    # Z's size (the block, the fused block and f2 over it: a handful), not the trunk's activations of more patches
    channels, stride = 16, 8                                      # resnet18-ln-w8-s2
    z_growth = (384 ** 2 - 256 ** 2) // stride ** 2 * channels * 4
    assert 0 < activations(384, 4 / 36) - four < 10 * z_growth < eight - four


def test_training_step_runs_the_models_own_micro_step():
    model = patchgd()
    optimizer = make_optimizer("adamw", model)
    before = model.head[2].weight.detach().clone()
    training_step(model, torch.rand(1, 1, 128, 128), torch.tensor([0]), optimizer, device_type="cpu")
    assert not torch.equal(before, model.head[2].weight)


PATCHGD_RUN = ["data.kind=synthetic", "data.synthetic_size=128", "data.synthetic_count=16", "model.mode=patchgd",
               "model.patch_size=32", "model.patch_sampling=0.125", "model.inner_iterations=2",
               "model.trunk=tiny-cnn", "model.num_classes=4", "train.batch_size=4", "train.accumulate=1",
               "train.progress=false", "train.device=cpu", "train.epochs=1", "optim.schedule=cosine",
               "optim.warmup_steps=0"]


def test_patchgd_mode_trains_through_the_runner_inside_its_budget(tmp_path):
    import json

    from streamcnn.training import fit, load_config

    history = fit(load_config(overrides=[*PATCHGD_RUN, "plan.budget=1GB", f"out={tmp_path / 'run'}"]))
    report = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert report["method"] == "PatchGDClassifier"
    assert_message(report["description"], "PatchGD", "4 x 4 patches", "32 px", "2 updated")
    assert 0 < report["predicted_bytes"] < report["budget_bytes"] == 10**9
    assert len(history) == 1 and history[0]["step"] == 4 and history[0]["val_accuracy"] is not None


def test_patchgd_over_budget_is_one_line_naming_the_knobs(tmp_path, capsys):
    from importlib.util import module_from_spec, spec_from_file_location
    from pathlib import Path

    spec = spec_from_file_location("train_tool", Path(__file__).resolve().parents[1] / "tools" / "train.py")
    tool = module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = ["--budget", "100kB", "--out", str(tmp_path / "run"), *[a for o in PATCHGD_RUN for a in ("--set", o)]]
    assert tool.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: "), err
    assert_message(err, "PatchGD", "4 x 4 patches", "32 px", "2 updated", "100.00 kB", "model.patch_sampling")


def test_patchgd_budget_of_tensors_checks_the_tensor_peak():
    from streamcnn.models.strategy import check_budget
    from streamcnn.planning.search import BudgetError

    model = patchgd()
    estimate = predict_step_memory(model, (256, 256), batch=2, device="cpu")
    budget = (estimate.allocated_bytes + estimate.process_bytes) // 2   # above its tensors, below its RSS
    text, report = check_budget(model, (256, 256), budget, batch=2, counts="tensors")
    assert report["predicted_bytes"] == estimate.allocated_bytes and report["budget_counts"] == "tensors"
    assert "of tensors fits the budget" in text
    with pytest.raises(BudgetError, match=r"needs [\d.]+ MB, over the budget of"):
        check_budget(model, (256, 256), budget, batch=2)


def test_the_global_patch_is_fused_with_z_before_the_aggregator():
    """The paper: Z + f1(global patch) goes through f2; the global view has no path around f2."""
    model = patchgd(patch_size=64).eval()
    images = torch.rand(2, 1, 128, 128)
    seen = {}
    model.aggregator.register_forward_pre_hook(lambda module, args: seen.setdefault("f2_input", args[0]))
    model.head.register_forward_pre_hook(lambda module, args: seen.setdefault("head_input", args[0]))
    with torch.no_grad():
        model(images)
        z = PatchGDClassifier.tile(model.fill(images), (2, 2))             # (2, M, 16, 16): 2 x 2 maps of 8 x 8
        g = model.backbone(model._global(images))                          # (2, M, 8, 8)
        expected = z + g.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        assert torch.allclose(seen["f2_input"], expected)
        assert torch.allclose(seen["head_input"], model.aggregator(expected))


def test_a_strategy_inside_distributed_data_parallel_is_refused_with_one_line(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from streamcnn.engine.step import micro_step

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(patchgd())
        with pytest.raises(ValueError) as error:
            micro_step(wrapped, torch.rand(1, 1, 128, 128), torch.tensor([0]), device_type="cpu")
        assert_message(error, "PatchGDClassifier", "own step", "train.processes: 1")
    finally:
        dist.destroy_process_group()
