"""Training on real data files: the generated UltraMNIST cache, manifests, the downsampling
baseline reading pyramids, and tools/evaluate.py on a checkpoint."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from helpers import assert_message
from streamcnn.data import ManifestDataset, generate_ultramnist
from streamcnn.training import DownsampledDataset, fit, load_checkpoint, load_config
from streamcnn.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # deterministic, fast tiny CPU runs: see conftest.py

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.trunk=tiny-cnn", "model.head=pool", "train.batch_size=2", "train.accumulate=1", "train.epochs=1",
         "train.progress=false", "train.device=cpu", "optim.schedule=cosine", "optim.warmup_steps=0"]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ultramnist(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ultramnist")
    generate_ultramnist(root / "train", 6, size=256, split="train", progress=False)
    generate_ultramnist(root / "test", 4, size=256, split="test", progress=False)
    return root


def test_default_data_is_generated_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCNN_CACHE", str(tmp_path / "cache"))
    config = ["data.generate_count=4", "data.generate_val_count=2", "data.generate_size=128",
              "data.generate_variant=null", "plan.tile_size=64", *SMALL]
    history = fit(load_config(overrides=[*config, f"out={tmp_path / 'a'}"]))
    cached = tmp_path / "cache" / "ultramnist-128px-seed0"
    assert len(ManifestDataset(cached / "train")) == 4 and len(ManifestDataset(cached / "test")) == 2
    images = {p: p.stat().st_mtime_ns for p in (cached / "train" / "images").iterdir()}
    fit(load_config(overrides=[*config, f"out={tmp_path / 'b'}"]))
    assert {p: p.stat().st_mtime_ns for p in (cached / "train" / "images").iterdir()} == images  # reused
    assert history[0]["images"] == 4 and history[0]["val_accuracy"] is not None


def test_the_default_run_finishes_on_its_balanced_variant(tmp_path, monkeypatch):
    """`python tools/train.py --budget 11GB` with fewer images and one epoch: the same task and model."""
    monkeypatch.setenv("STREAMCNN_CACHE", str(tmp_path / "cache"))
    config = load_config(overrides=["plan.budget=11GB", "data.generate_count=400", "data.generate_val_count=80",
                                    "train.epochs=1", "train.progress=false", f"out={tmp_path / 'run'}"])
    history = fit(config)
    cached = tmp_path / "cache" / "ultramnist-128px-seed0"
    train, test = (ManifestDataset(cached / split, "manifest-smallest.csv") for split in ("train", "test"))
    for dataset, generated in ((train, 400), (test, 80)):
        counts = [dataset.labels.count(c) for c in range(10)]
        assert len(set(counts)) == 1 and 0 < len(dataset) < generated     # balanced subset of the images
    [row] = history
    assert row["images"] == len(train) // 128 * 128 > 0 and row["val_accuracy"] is not None
    saved = load_checkpoint(tmp_path / "run" / "last.pt")["config"]
    assert saved["model"]["num_classes"] == 10 and saved["model"]["trunk"] == "resnet18-sws-w16-s2"


def test_manifest_training_then_evaluate_tool(ultramnist, tmp_path, capsys):
    out = tmp_path / "run"
    train = _tool("train")
    assert train.main(["--data", str(ultramnist / "train"), "--val-data", str(ultramnist / "test"), "--out", str(out),
                       *[a for o in [*SMALL, "plan.tile_size=128"] for a in ("--set", o)]]) == 0
    assert "val accuracy" in capsys.readouterr().out
    [row] = read_metrics(out / "metrics.jsonl")
    assert row["images"] == 6 and row["megapixels_per_second"] > 0

    evaluate = _tool("evaluate")
    assert evaluate.main(["--checkpoint", str(out / "best.pt"), "--data", str(ultramnist / "test"),
                          "--device", "cpu", "--budget", "2GB"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval-test" / "evaluation.json").read_text())
    assert report["images"] == 4 and sum(map(sum, report["confusion_matrix"])) == 4
    labels = ManifestDataset(ultramnist / "test").labels
    assert [sum(r) for r in report["confusion_matrix"]] == [labels.count(c) for c in range(28)]
    assert report["accuracy"] == pytest.approx(row["val_accuracy"])       # same model, same images
    assert f"accuracy {report['accuracy']:.2%} on 4 images" in printed
    assert (out / "eval-test" / "confusion_matrix.png").stat().st_size > 0
    assert "2.00 GB" in report["plan"]

    assert evaluate.main(["--checkpoint", str(out / "nope.pt"), "--data", str(ultramnist / "test")]) == 1
    assert capsys.readouterr().err.strip() == f"evaluate.py: error: checkpoint {out / 'nope.pt'} does not exist"


def test_downsample_baseline_reads_the_pyramid(ultramnist, tmp_path):
    readers = ManifestDataset(ultramnist / "train")
    small = DownsampledDataset(readers, 64)
    image, label = small[0]
    reader, expected_label = readers[0]
    assert image.shape == (1, 64, 64) and image.dtype == torch.float32 and label == expected_label
    full = torch.from_numpy(reader.read_level(0)).float()[None] / 255
    area = torch.nn.functional.interpolate(full, size=(64, 64), mode="area")[0]
    assert (image - area).abs().max() < 0.02     # a pyramid level + area averaging ~ full-image area averaging

    history = fit(load_config(overrides=[*SMALL, "model.mode=downsample", "model.input_size=64", "plan.budget=1GB",
                                         "data.kind=manifest", f"data.root={ultramnist / 'train'}",
                                         f"data.val_root={ultramnist / 'test'}", "data.val_manifest=manifest.csv",
                                         f"out={tmp_path / 'run'}"]))
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["image_size"] == [64, 64] and plan["mode"] == "conventional"    # planned at the small size
    assert history[0]["megapixels_per_second"] == pytest.approx(6 * 64 * 64 / 1e6 / history[0]["seconds"])
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["model"]["mode"] == "downsample"


def test_long_side_batches_of_unequal_shapes_are_refused_before_training(tmp_path):
    import numpy as np
    import tifffile

    from streamcnn.training.runner import fit as run

    rows = ["path,label"]
    for i, (h, w) in enumerate([(64, 128), (128, 64), (96, 96), (64, 128)]):
        tifffile.imwrite(tmp_path / f"im{i}.tiff", np.full((h, w), 40 * i, dtype=np.uint8))
        rows.append(f"im{i}.tiff,{i % 2}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    base = [*SMALL, "data.kind=manifest", f"data.root={tmp_path}", "data.val_fraction=0.5", "model.mode=downsample",
            "model.input_size=32", "model.input_fit=long_side", f"out={tmp_path / 'run'}"]
    with pytest.raises(ValueError) as error:
        run(load_config(overrides=base))
    message = assert_message(error, "shapes", "train.batch_size=1", "model.input_fit=pad")
    assert re.search(r"im\d\.tiff: \d+ x \d+", message), message          # names an image and its shape
    assert not (tmp_path / "run").exists()
    history = run(load_config(overrides=[*base, "train.batch_size=1"]))      # one image per batch: any shapes
    assert len(history) == 1
