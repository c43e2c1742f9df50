"""streamcnn.planning.search and tools/plan.py: choosing, reporting, refusing, enforcing."""
from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_message
from streamcnn.utils.files import TEMPORARY_GLOB
from streamcnn.planning.measurement import measure_step_memory
from streamcnn.planning.memory import predict_step_memory
from streamcnn.utils.units import parse_size
from streamcnn.models.classifier import build_model
from streamcnn.planning.search import BudgetError, Candidate, candidate_tile_sizes, enforce_budget, plan

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import plan as plan_cli  # noqa: E402

MiB = 2**20


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny real CPU steps: see conftest.py


def resnet18(**config):
    torch.manual_seed(0)
    return build_model("resnet18", head="conv", num_classes=5, in_channels=1, head_kwargs={"width": 32, "depth": 1},
                       **config)


def ranked_fitting(report):
    return sorted((c for c in report.candidates if c.fits), key=lambda c: (c.offload, c.relative_cost))


def test_tile_size_ladder_is_stride_aligned_and_below_the_image():
    assert candidate_tile_sizes(4000, 32) == [256, 384, 512, 768, 1024, 1536, 2048, 3072]
    assert candidate_tile_sizes(512, 32) == [128, 192, 256, 384]
    assert all(s % 48 == 0 for s in candidate_tile_sizes(3000, 48))


def test_conventional_is_chosen_when_everything_fits():
    report = plan(resnet18(), 512, "100GB", device="cuda", tile_sizes=[256], exhaustive=True)
    # 2 unstreamed + tile 256 x (forward on the same tiles, on the whole image) x checkpoint x offload
    assert len(report.candidates) == 2 + 2 * 2 * 2 and all(c.fits for c in report.candidates)
    assert sum(c.forward_whole for c in report.candidates) == 4
    assert report.chosen.mode == "conventional" and report.chosen.relative_cost == 1.0
    assert report.chosen is ranked_fitting(report)[0]


@pytest.fixture(scope="module")
def every_plan():
    """Every candidate for ResNet-18 at 1024 px on CUDA, simulated (the budget fits all)."""
    return plan(resnet18(), 1024, "100GB", device="cuda", tile_sizes=[256, 512], exhaustive=True)


def cheapest_within(report, budget):
    fits = [c for c in report.candidates if c.predicted_device_bytes <= budget]
    return min(fits, key=lambda c: (c.offload, round(c.relative_cost, 9), c.predicted_device_bytes))


def test_the_cheapest_fitting_plan_is_chosen(every_plan):
    conventional, checkpoint = every_plan.candidates[:2]
    streamed = sorted(c.predicted_device_bytes for c in every_plan.candidates if c.mode.startswith("stream"))
    budgets = [(conventional.predicted_device_bytes + checkpoint.predicted_device_bytes) // 2,  # checkpoint
               streamed[len(streamed) // 2] + 1,                                             # some streamed
               streamed[0]]                                                                  # only the smallest
    chosen = []
    for budget in budgets:
        report = plan(resnet18(), 1024, budget, device="cuda", tile_sizes=[256, 512])
        expected = cheapest_within(every_plan, budget)
        assert (report.chosen.mode, report.chosen.tile_size, report.chosen.offload, report.chosen.forward_tile_size) \
            == (expected.mode, expected.tile_size, expected.offload, expected.forward_tile_size)
        assert report.chosen.predicted_device_bytes == expected.predicted_device_bytes <= budget
        assert sum(c.predicted_device_bytes <= budget for c in every_plan.candidates) >= 1
        chosen.append(report.chosen)
    assert chosen[0].mode == "checkpoint"
    assert chosen[1].mode.startswith("stream") and chosen[1].relative_cost < chosen[2].relative_cost
    # the lazy search skipped only plans slower than the one it chose
    skipped = [c for c in report.candidates if c.fits is None]
    assert all((c.offload, c.relative_cost) >= (chosen[2].offload, chosen[2].relative_cost) for c in skipped)


def test_lazy_planning_simulates_only_what_it_needs(every_plan):
    report = plan(resnet18(), 1024, every_plan.candidates[1].predicted_device_bytes, device="cuda",
                  tile_sizes=[256, 512])
    assert report.chosen.mode == "checkpoint"
    assert [c.fits for c in report.candidates[:2]] == [False, True]
    assert all(c.fits is None and c.predicted_peak_bytes is None for c in report.candidates[2:])
    assert f"{len(report.candidates) - 2} slower plans not simulated" in str(report)


def test_refusal_names_the_budget_and_the_smallest_budget_that_fits():
    model = resnet18()
    with pytest.raises(BudgetError) as bound:   # below what every plan needs: refused from bounds
        plan(model, 1024, "20MB", device="cuda", tile_sizes=[256])
    assert_message(str(bound.value), "20.00 MB", "cuda", "1024x1024 px", "needs at least")
    assert isinstance(bound.value, ValueError) and bound.value.min_bytes > 20 * 10**6
    # at the bound the search runs, and its refusal names the exact minimum
    with pytest.raises(BudgetError) as err:
        plan(model, 1024, bound.value.min_bytes, device="cuda", tile_sizes=[256])
    message = str(err.value)
    assert_message(message, "stream+checkpoint", "offload", "256 px", "bf16", "smaller tiles")
    suggested = parse_size(re.search(r"budget of at least ([\d.]+ [kMGT]?B)", message).group(1).replace(" ", ""))
    assert bound.value.min_bytes <= err.value.min_bytes <= suggested < err.value.min_bytes + 10**7
    # the minimum is exact: at min_bytes a plan fits, one byte less nothing does
    fitting = plan(model, 1024, err.value.min_bytes, device="cuda", tile_sizes=[256])
    assert fitting.chosen.predicted_device_bytes == err.value.min_bytes
    with pytest.raises(BudgetError):
        plan(model, 1024, err.value.min_bytes - 1, device="cuda", tile_sizes=[256])


def test_chosen_plan_measured_on_cpu_stays_under_the_budget():
    model = resnet18()   # at 320 px the step peaks in the backward, not in the optimizer step
    conventional = predict_step_memory(model, 320, device="cpu").process_bytes
    budget = conventional - 4 * MiB
    report = plan(model, 320, budget, device="cpu")
    assert report.chosen.mode != "conventional"
    report.apply(model)
    measured = measure_step_memory(model, 320, device="cpu", warmup=False)
    assert measured.process_bytes <= budget
    assert abs(measured.allocated_bytes / report.chosen.predicted_peak_bytes - 1) < 0.01  # docs/planner.md: within 1 %


def test_apply_configures_the_model_in_place():
    model = resnet18()
    offloaded = Candidate("stream+checkpoint", 512, True, True, True, 4, 1.3, (900, 900), 2.0)
    offloaded.configure(model)
    assert (model.trunk.tile_size, model.trunk.checkpoint, model.trunk.output_device, model.head_checkpoint) == \
        (512, True, torch.device("cpu"), True)
    report = plan(model, 512, "100GB", device="cuda")
    assert report.apply(model) is model
    assert (model.trunk.tile_size, model.trunk.checkpoint, model.trunk.output_device, model.head_checkpoint) == \
        (None, False, None, False)
    with pytest.raises(TypeError) as refused:
        report.apply(torch.nn.Linear(2, 2))
    assert_message(refused, "StreamingClassifier", "streamcnn.planning.plannable.Plannable")


def test_report_json_and_table():
    report = plan("resnet18", 4000, "11GB", in_channels=1, num_classes=28, dtype="bf16", device="cuda")
    data = json.loads(json.dumps(report.to_json()))
    assert data["mode"] == report.chosen.mode and data["tile_size"] == report.chosen.tile_size
    assert data["predicted_peak_bytes"] == report.chosen.predicted_peak_bytes > 0
    assert data["dtype"] == "bf16" and data["budget_bytes"] == 11 * 10**9
    assert data["headroom_bytes"] == 11 * 10**9 - report.chosen.predicted_device_bytes >= 0
    assert {c["mode"] for c in data["candidates"]} == {"conventional", "checkpoint", "stream", "stream+checkpoint"}
    text = str(report)
    assert "budget 11.00 GB" in text and "headroom:" in text and "chosen:" in text
    chosen_row = next(line for line in text.splitlines() if line.startswith("->"))
    assert report.chosen.mode in chosen_row
    assert report.planning_seconds > 0 and f"planned in {report.planning_seconds:.1f} s" in text   # reported, not timed


def test_bf16_needs_less_than_fp32():
    fp32 = plan("resnet50", 4000, "1000GB", in_channels=1, num_classes=28, device="cuda").chosen
    bf16 = plan("resnet50", 4000, "1000GB", in_channels=1, num_classes=28, device="cuda", dtype="bf16").chosen
    assert fp32.mode == bf16.mode == "conventional"
    assert bf16.predicted_peak_bytes < 0.75 * fp32.predicted_peak_bytes


def test_plot_writes_a_png(tmp_path):
    report = plan(resnet18(), 1024, "2GB", device="cuda", tile_sizes=[256, 512], exhaustive=True)
    path = report.plot(tmp_path / "plan.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 800 and height > 300
    assert not list(tmp_path.glob(TEMPORARY_GLOB))


def test_enforce_budget_on_cpu_reports_that_nothing_is_capped():
    info = enforce_budget("11GB", "cpu")
    assert info["enforced"] is False and info["budget_bytes"] == 11 * 10**9
    assert "only enforced on CUDA" in info["reason"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_enforce_budget_caps_cuda_allocations():
    info = enforce_budget("2GB", "cuda")
    try:
        assert info["enforced"] and info["allocator_cap_bytes"] < 2 * 10**9
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(2.1e9), dtype=torch.uint8, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_cli_json_and_refusal(capsys):
    assert plan_cli.main(["--model", "resnet18", "--image-size", "512", "--budget", "11GiB", "--in-channels", "1", "--num-classes", "5",
                          "--device", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "conventional" and data["tile_size"] is None and data["predicted_peak_bytes"] > 0
    assert data["budget_bytes"] == 11 * 2**30
    assert plan_cli.main(["--model", "resnet18", "--image-size", "512", "--budget", "10MB", "--in-channels", "1", "--num-classes", "5",
                          "--device", "cpu"]) == 1
    assert_message(capsys.readouterr().err.strip(), "error:", "no plan fits", "10.00 MB", "cpu")


def test_cli_rejects_bad_sizes():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--image-size", "4000",
                             "--budget", "11 gigs", "--num-classes", "5"], capture_output=True, text=True)
    assert result.returncode == 2
    assert_message(result.stderr.strip().splitlines()[-1], "--budget", "'11 gigs'", "not a memory size")


def test_cli_checks_arguments_before_importing_torch_and_lists_families():
    probe = ("import runpy, sys\nsys.argv = ['plan.py'] + sys.argv[1:]\ntry:\n"
             "    runpy.run_path({path!r}, run_name='__main__')\n"
             "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n")
    for bad in (["--image-size", "40x", "--budget", "1GB"], ["--image-size", "400", "--budget", "1QB"],
                ["--image-size", "400", "--budget", "1GB", "--batch", "0"], ["--budget", "1GB"]):
        result = subprocess.run([sys.executable, "-c", probe.format(path=str(ROOT / "tools" / "plan.py")), *bad],
                                capture_output=True, text=True)
        assert result.stdout.strip() == "exit 2 False", (bad, result.stdout, result.stderr)
    help_text = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--help"], capture_output=True,
                               text=True).stdout
    assert "resnet18-<kind>" in help_text and "torchvision:<arch>" in help_text and "timm:<arch>" in help_text
    assert "resnet18-ws-w16-s2" not in help_text    # a family, not every generated name


def test_a_refusal_on_a_slide_names_the_level_that_fits():
    levels = [(0, (100000, 80000), 0.25), (1, (25000, 20000), 1.0), (2, (6250, 5000), 4.0)]
    assert_message(plan_cli._what_fits(levels, 32736), "level 1", "1 mpp", "25000x20000 px", "--level 1")
    assert_message(plan_cli._what_fits(levels, 1000), "no level", "100x", "25 mpp")
    assert plan_cli._what_fits(levels, None) == ""


def test_plans_with_a_tensor_over_2_31_elements_are_refused_on_cuda_only():
    # ResNet-18's stem output at 12000 px has 64 * 6000^2 = 2.3e9 elements: more than cuDNN takes
    report = plan("resnet18", 12000, "1TB", in_channels=1, num_classes=28, device="cuda")
    conventional = next(c for c in report.candidates if c.mode == "conventional")
    assert conventional.too_large_tensor and conventional.fits is False and conventional.bound  # from the geometry
    assert report.chosen.mode.startswith("stream") and report.chosen.estimate.largest_tensor_elements < 2**31
    assert "conventional makes a tensor of 2^31 or more elements, which cuDNN refuses" in report.reason
    assert plan("resnet18", 12000, "1TB", in_channels=1, num_classes=28, device="cpu").chosen.mode == "conventional"


def test_impossible_budgets_and_sizes_are_refused_from_bounds(monkeypatch):
    import streamcnn.planning.search as planning

    def no_search(*args, **kwargs):
        raise AssertionError("a budget below the lower bound must be refused before the search")

    monkeypatch.setattr(planning, "step_flops", no_search)
    monkeypatch.setattr(planning.Search, "simulate", no_search)
    with pytest.raises(BudgetError) as err:
        plan("resnet18", 4000, "1MB", in_channels=1, num_classes=28, device="cpu")
    assert_message(str(err.value), "1.00 MB", "cpu", "4000x4000 px", "needs at least", "no image size fits")
    assert err.value.min_bytes > 10**8 and err.value.largest_side is None
    # a budget that a smaller image fits names the largest side whose bound fits
    with pytest.raises(BudgetError) as err:
        plan("resnet18", 40000, "2GB", in_channels=1, device="cpu", lazy_input=True)
    side = err.value.largest_side
    assert_message(str(err.value), "40000x40000 px", f"{side} px")
    assert 1000 < side < 40000
    # on CUDA a feature map every plan holds whole over the element limit: the largest side under it
    with pytest.raises(BudgetError) as err:
        plan("resnet50", 100000, "40GB", device="cuda")
    assert_message(str(err.value), "2048x3125x3125", "2,147,483,648", "pool head", f"{err.value.largest_side} px")
    assert 2048 * (err.value.largest_side / 32) ** 2 < 2**31 <= 2048 * (err.value.largest_side / 32 + 1) ** 2


def test_forward_tiles_are_chosen_apart_and_priced():
    report = plan(resnet18(), 512, "100GB", device="cpu", tile_sizes=[128], modes=["stream"], exhaustive=True)
    same, whole = sorted((c for c in report.candidates), key=lambda c: c.forward_tile_size is not None)
    assert same.forward_tile_size is None and whole.forward_whole and whole.forward_overlap == 1.0
    assert whole.relative_cost < same.relative_cost and report.chosen is whole
    assert "128 px / fwd whole" in str(report) and "stream 128 px (forward: whole image)" in str(report)
    # the whole-image forward's activations set a higher peak than the tiles' forward
    assert whole.estimate.forward_bytes > same.estimate.forward_bytes
    model = resnet18()
    report.apply(model)
    assert model.trunk.forward_tile_size == whole.forward_tile_size


def test_lazy_input_counts_windows_not_the_image_and_cpu_budgets_are_rss():
    from streamcnn.planning.memory import CPU_HEAP_OVERHEAD, CPU_RUNTIME_BYTES

    model = resnet18(tile_size=128)
    held = predict_step_memory(model, 512, device="cpu")
    lazy = predict_step_memory(model, 512, device="cpu", lazy_input=True)
    image = 512 * 512 * 4
    assert 0 < held.live_bytes - lazy.live_bytes <= image
    assert held.process_bytes == CPU_RUNTIME_BYTES + int(held.live_bytes * (1 + CPU_HEAP_OVERHEAD))
    assert held.host_bytes == 0 and held.forward_bytes > 0
    # on CUDA the host holds the image, and with offload the feature map (then its gradient)
    on_device = predict_step_memory(model, 512, device="cuda")
    model.trunk.output_device = torch.device("cpu")
    offloaded = predict_step_memory(model, 512, device="cuda")
    assert on_device.host_bytes >= image
    assert offloaded.host_bytes >= on_device.host_bytes + 512 * 16 * 16 * 4


def test_a_budget_of_tensors_binds_on_the_tensor_peak_without_the_runtime():
    model = resnet18()
    conventional = predict_step_memory(model, 320, device="cpu")
    budget = conventional.allocated_bytes - 4 * MiB        # tens of MB: far below the CPU runtime alone
    report = plan(model, 320, budget, device="cpu", counts="tensors")
    assert report.counts == "tensors" and report.chosen.mode != "conventional"
    assert report.chosen.budgeted_bytes == report.chosen.predicted_peak_bytes <= budget
    assert report.chosen.predicted_device_bytes > budget   # its RSS is shown, not limited
    assert "of tensors" in str(report) and report.to_json()["budget_counts"] == "tensors"
    report.apply(model)
    assert measure_step_memory(model, 320, device="cpu", warmup=False).allocated_bytes <= budget
    with pytest.raises(BudgetError) as err:                 # the same bytes as a budget of the process
        plan(model, 320, budget, device="cpu")
    assert "of tensors" not in str(err.value) and err.value.min_bytes > budget


def test_a_tensor_budget_refusal_names_the_smallest_tensor_budget():
    model = resnet18()
    with pytest.raises(BudgetError) as bound:
        plan(model, 320, "1MB", device="cpu", counts="tensors", tile_sizes=[64])
    assert_message(str(bound.value), "1.00 MB", "of tensors", "cpu", "needs at least")
    with pytest.raises(BudgetError) as err:
        plan(model, 320, bound.value.min_bytes, device="cpu", counts="tensors", tile_sizes=[64])
    assert err.value.min_bytes >= bound.value.min_bytes
    assert plan(model, 320, err.value.min_bytes, device="cpu", counts="tensors",
                tile_sizes=[64]).chosen.budgeted_bytes == err.value.min_bytes
    with pytest.raises(ValueError) as refused:
        plan(model, 320, "1GB", device="cpu", counts="rss")
    assert_message(refused, "counts", "'process'", "'tensors'", "'rss'")


def test_cli_budget_of_tensors(capsys):
    assert plan_cli.main(["--model", "resnet18", "--image-size", "256", "--budget", "400MB", "--in-channels", "1",
                          "--num-classes", "5", "--device", "cpu", "--counts", "tensors", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["budget_counts"] == "tensors" and data["budgeted_bytes"] == data["predicted_peak_bytes"] <= 4e8


def test_tile_summaries_agree_with_tile_plan():
    from streamcnn.engine.geometry import tile_plan
    from streamcnn.planning.tiles import reduced_plan, summarize

    geometry = resnet18().trunk.geometry
    for image in [(1000, 1300), (517, 331)]:
        for tile in (128, 256, 384):
            full, summary = tile_plan(geometry, image, tile), summarize(geometry, image, tile)
            assert (summary.grid, summary.n_tiles, summary.max_window, summary.output_size) == \
                (full.grid, len(full.tiles), full.max_window, full.output_size)
            assert summary.overlap_factor == pytest.approx(full.overlap_factor, rel=1e-12)
            assert summary.largest in full.tiles and summary.largest.window_shape == full.max_window
            reduced = reduced_plan(summary, image, geometry.output_stride, 3)
            assert reduced.tiles == (summary.largest,) * 3 and reduced.region_size == full.region_size


def _pooling_engine() -> bool:
    import inspect

    from streamcnn.engine.streaming import StreamingModule

    return "pool" in inspect.signature(StreamingModule).parameters


@pytest.mark.skipif(not _pooling_engine(), reason="needs the engine's tile-by-tile pooling (StreamingModule(pool=...))")
def test_pool_head_past_the_element_limit_pools_tile_by_tile_with_whole_map_gradients():
    torch.manual_seed(0)
    model = build_model("tiny-cnn", head="pool", num_classes=3, in_channels=1)
    image, limit = (512, 384), 300_000
    map_elements = 2 * 64 * (512 // 8) * (384 // 8)         # batch 2: 393,216 elements, over the limit
    report = plan(model, image, "100GB", batch=2, device="cuda", max_elements=limit, tile_sizes=[32])
    chosen = report.chosen
    assert chosen.pool == "meanmax" and map_elements >= limit
    unpooled = [c for c in report.candidates if c.pool is None and c.fits is not None]
    assert unpooled and all(c.too_large_tensor and not c.fits for c in unpooled)
    # the planner counts no whole feature map for it: its largest tensor is a window's
    assert chosen.estimate.largest_tensor_elements < limit
    x = torch.rand(2, 1, *image, dtype=torch.float64) - 0.5   # a ReLU trunk: many tied zeros
    y = torch.tensor([0, 2])

    def grads(m):
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        return [p.grad.clone() for p in m.parameters()]

    whole = grads(model.double())                            # tile_size None: the whole map, then the head
    report.apply(model)
    assert model.trunk.pool == "meanmax" and model.trunk.tile_size == chosen.tile_size
    for streamed, reference in zip(grads(model), whole):
        torch.testing.assert_close(streamed, reference, rtol=1e-10, atol=1e-12)
