"""A user's own slides end to end: train from a slide table, predict, heatmaps, bad files."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from helpers import relative_error
from slide_data import TOOLS, sets, tool, CLASSES, make_slide_folder
from streamcnn.data import ManifestDataset
from streamcnn.training.heatmaps import explain
from streamcnn.io import open_image
from streamcnn.models.classifier import build_model
from streamcnn.training import load_checkpoint

SIZES = [(96, 128), (160, 112), (128, 192), (80, 80), (144, 160), (112, 144)]
pytestmark = pytest.mark.usefixtures("one_thread")  # deterministic, fast tiny CPU runs: see conftest.py
TINY = ["model.trunk=tiny-cnn", "model.head=pool", "train.epochs=1", "train.batch_size=1", "train.accumulate=2",
        "plan.tile_size=64", "train.progress=false", "data.manifest=slides.csv", "optim.lr=3e-3",
        "optim.schedule=cosine", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    return make_slide_folder(tmp_path_factory.mktemp("slides"), SIZES)


@pytest.fixture(scope="module")
def run(slides, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    assert tool("train").main(["--data", str(slides), "--out", str(out), *sets(*TINY)]) == 0
    return out


def test_training_takes_channels_classes_and_plan_size_from_the_data(run, slides):
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["model"]["in_channels"], config["model"]["num_classes"]) == (3, 2)
    assert config["data"]["classes"] == CLASSES
    assert load_checkpoint(run / "best.pt")["config"]["data"]["classes"] == CLASSES
    largest = SIZES.index(max(SIZES, key=lambda s: s[0] * s[1]))
    assert (run / "plan.txt").read_text().startswith(
        f"planned for {slides / f'S{largest}.tiff'} ({SIZES[largest][0]} x {SIZES[largest][1]} px at level 0), "
        f"the largest of {len(SIZES)}\n")


def test_predict_with_and_without_labels_writes_class_names_and_aligned_heatmaps(run, slides, tmp_path):
    out = tmp_path / "labelled"
    assert tool("predict").main(["--checkpoint", str(run / "best.pt"), "--data", str(slides / "slides.csv"),
                                  "--out", str(out), "--quiet", "--heatmaps"]) == 0
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [Path(r["path"]).name for r in rows] == [f"S{i}.tiff" for i in range(len(SIZES))]
    assert list(rows[0]) == ["path", "predicted", "p_normal", "p_tumor", "label", "correct"]
    assert {r["predicted"] for r in rows} <= set(CLASSES) and [r["label"] for r in rows] == \
        [CLASSES[i % 2] for i in range(len(SIZES))]
    assert all(abs(float(r["p_normal"]) + float(r["p_tumor"]) - 1) < 1e-5 for r in rows)
    for i in (0, 2):
        slide = open_image(slides / f"S{i}.tiff")
        for kind in ("cam", "saliency"):
            heatmap = open_image(out / "heatmaps" / f"S{i}_{kind}.tiff")
            # the slide's pyramid, level for level, and its mpp
            assert [s[1:] for s in heatmap.level_shapes] == [s[1:] for s in slide.level_shapes]
            assert heatmap.mpp == pytest.approx(slide.mpp)
            assert heatmap.read_level(0).max() > 0 or kind == "cam"     # Grad-CAM may be all zero (ReLU)
            assert (out / "heatmaps" / f"S{i}_{kind}.png").stat().st_size > 1000
    unlabelled = tmp_path / "unlabelled"
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in (1, 3):
        (folder / f"S{i}.tiff").write_bytes((slides / f"S{i}.tiff").read_bytes())
    assert tool("predict").main(["--checkpoint", str(run / "best.pt"), "--data", str(folder), "--out",
                                  str(unlabelled), "--quiet"]) == 0
    plain = list(csv.DictReader(open(unlabelled / "predictions.csv")))
    assert list(plain[0]) == ["path", "predicted", "p_normal", "p_tumor"] and len(plain) == 2
    assert [r["p_tumor"] for r in plain] == [rows[1]["p_tumor"], rows[3]["p_tumor"]]
    assert tool("evaluate").main(["--checkpoint", str(run / "best.pt"), "--data", str(slides), "--manifest",
                                   "slides.csv", "--out", str(tmp_path / "eval")]) == 0
    evaluated = list(csv.DictReader(open(tmp_path / "eval" / "predictions.csv")))
    assert [(r["predicted"], r["label"]) for r in evaluated] == [(r["predicted"], r["label"]) for r in rows]


def test_streamed_saliency_equals_full_image_autograd(slides):
    torch.manual_seed(0)
    model = build_model("tiny-cnn", "pool", num_classes=2, in_channels=3, tile_size=40).double().eval()
    view, _ = ManifestDataset(slides, "slides.csv", level=1, tissue="otsu")[4]
    streamed = explain(model, view, target=1)
    pixels = torch.from_numpy(view.read_region(0, 0, *view.shape[1:]).astype(np.float64) / 255)[None]
    pixels.requires_grad_(True)
    model.trunk.tile_size = None
    logits = model(pixels)[0]
    logits[1].backward()
    assert streamed.input_gradient.shape == tuple(pixels.shape[1:])
    assert relative_error(torch.from_numpy(streamed.input_gradient), pixels.grad[0]) <= 1e-10
    assert torch.allclose(streamed.logits.double(), logits.detach(), atol=1e-6)


def test_resume_of_a_folder_without_a_run_is_refused(tmp_path, capsys):
    assert tool("train").main(["--out", str(tmp_path / "none"), "--resume"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"train.py: error: {tmp_path / 'none' / 'config.yaml'} does not exist: there is no run to resume in "
        f"{tmp_path / 'none'} (start it without --resume, or pass --config/--data)")


def test_a_truncated_slide_is_named_before_training_and_skipped_on_request(slides, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("S0.tiff", "S1.tiff", "S3.tiff", "slides.csv"):
        (folder / name).write_bytes((slides / name).read_bytes())
    (folder / "slides.csv").write_text("slide_id,label\nS0,normal\nS1,tumor\nS3,tumor\n")
    data = (folder / "S1.tiff").read_bytes()
    needed = len(data)
    (folder / "S1.tiff").write_bytes(data[:needed // 2])
    train = tool("train")
    args = ["--data", str(folder), *sets(*TINY, "train.accumulate=1")]
    assert train.main([*args, "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"train.py: error: 1 bad image file(s): {folder / 'S1.tiff'}: truncated: expected ")
    assert err.count("\n") == 0 and not (tmp_path / "a" / "last.pt").exists()
    assert train.main([*args, "--out", str(tmp_path / "b"), "--set", "data.on_error=skip"]) == 0
    assert (tmp_path / "b" / "skipped.txt").read_text().startswith(f"{folder / 'S1.tiff'}: truncated: expected ")
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 2


def test_resume_with_only_out_after_a_kill_mid_epoch_reproduces_the_uninterrupted_run(slides, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    settings = sets(*TINY, "train.epochs=2", "train.accumulate=1", "train.checkpoint_minutes=1e-9",
                     "model.head_kwargs={dropout: 0.3}")
    train = tool("train")
    assert train.main(["--data", str(slides), "--out", str(tmp_path / "ref"), *settings]) == 0
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    victim = subprocess.Popen([sys.executable, str(TOOLS / "train.py"), "--data", str(slides), "--out", str(run),
                               *settings], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    seen = None
    while True:       # kill at the first mid-epoch checkpoint of epoch 2
        assert victim.poll() is None, victim.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "epoch 2 never started"
        if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") == 1:
            mtime = (run / "last.pt").stat().st_mtime_ns
            seen = mtime if seen is None else seen
            if mtime != seen:
                break
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed = load_checkpoint(run / "last.pt")
    assert killed["in_progress"]["epoch"] == 2 and 0 < killed["in_progress"]["batches"] < len(SIZES)
    assert train.main(["--out", str(run), "--resume"]) == 0        # nothing but --out: the run's config.yaml
    ref, resumed = load_checkpoint(tmp_path / "ref" / "last.pt"), load_checkpoint(run / "last.pt")
    timing = {"seconds", "val_seconds", "images_per_second", "megapixels_per_second", "peak_memory_bytes"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed["history"]] == \
        [{k: v for k, v in r.items() if k not in timing} for r in ref["history"]]
    assert all(torch.equal(ref["model"][k], resumed["model"][k]) for k in ref["model"])
