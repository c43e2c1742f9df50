"""A pathology user's first week: slide defaults, table conventions, splits, augmentation, metrics, bad input."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from helpers import relative_error
from slide_data import sets, tool, CLASSES, make_slide_folder, slide_pixels, write_slide
from streamcnn.data import ManifestDataset
from streamcnn.data.augment import AUGMENTS, Augmentation, AugmentedDataset, AugmentedView
from streamcnn.data.splits import grouped_stratified_split
from streamcnn.io import open_image
from streamcnn.models.classifier import build_model
from streamcnn.training.config import load_config
from streamcnn.engine.step import micro_step
from streamcnn.training.datasets import ShardedBatchSampler, build_datasets, class_weights, loss_weights, unwrap_dataset
from streamcnn.training.distributed import init_distributed
from streamcnn.training.metrics import classification_metrics, confusion_matrix, quadratic_kappa

SIZES = [(96, 128), (160, 112), (128, 192), (80, 80), (144, 160), (112, 144)]
pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["model.trunk=tiny-cnn", "model.head=pool", "train.epochs=1", "plan.tile_size=64", "optim.warmup_steps=0"]


def _table(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _one_line_error(capsys, must_contain: list[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for part in must_contain:
        assert part in err, (part, err)
    return err


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    return make_slide_folder(tmp_path_factory.mktemp("slides"), SIZES)


def test_a_mixed_size_csv_trains_with_no_batch_flag_and_reports_slide_metrics(slides, tmp_path, capsys):
    out = tmp_path / "run"
    assert tool("train").main(["--data", str(slides / "slides.csv"), "--out", str(out), *sets(*SMALL)]) == 0
    stdout = capsys.readouterr().out.splitlines()
    split = list(csv.DictReader(open(out / "split.csv")))
    trained = sum(row["split"] == "train" for row in split)
    # first the run's one-line summary (what, how long, how to change it), then how slides are batched
    assert stdout[0].startswith("will run: ")
    assert stdout[1].startswith(f"1 image(s) per step, gradients accumulated over {min(16, trained)}")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["train"]["batch_size"], config["train"]["accumulate"]) == (1, min(16, trained))
    assert config["data"]["augment"] is None and config["data"]["kind"] == "manifest"
    assert (config["model"]["trunk"], config["optim"]["warmup_steps"]) == ("tiny-cnn", 0)   # --set wins
    # every slide of the table once, by its id as written; patients C0..C2 never straddle the split
    assert sorted(row["id"] for row in split) == [f"S{i}" for i in range(len(SIZES))]
    side = {row["id"]: row["split"] for row in split}
    for patient in range(3):
        assert side[f"S{2 * patient}"] == side[f"S{2 * patient + 1}"]
    assert {"train", "val"} <= set(side.values())
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["val_auc"] is not None and 0 <= row["val_auc"] <= 1
    assert len(row["val_recall"]) == 2 and row["val_balanced_accuracy"] is not None
    progress = [json.loads(line) for line in stdout if line.startswith("{")]
    assert progress and "val_auc" in progress[-1] and "val_balanced_accuracy" in progress[-1]


def test_a_batch_flag_or_config_keeps_its_own_batch(slides, tmp_path):
    train = tool("train")
    args = train.parse_args(["--data", str(slides), "--set", "train.batch_size=2"])
    assert (train.config_from_args(args).train.batch_size, train.config_from_args(args).train.effective_batch) == (2, None)
    assert train.config_from_args(args).model.trunk == "resnet18"
    ultramnist = train.config_from_args(train.parse_args([]))
    assert (ultramnist.train.batch_size, ultramnist.train.effective_batch) == (128, None)
    assert ultramnist.model.trunk != "resnet18" and ultramnist.optim.warmup_steps > 0


def test_mixed_sizes_in_a_batch_of_two_are_refused_before_training_with_the_fix(slides, capsys):
    assert tool("train").main(["--data", str(slides / "slides.csv"), "--out", str(slides / "never"),
                               *sets(*SMALL, "train.batch_size=2", "train.progress=false")]) == 1
    _one_line_error(capsys, [str(slides / "slides.csv"), "sizes", "train.batch_size=1"])


def _config(root: Path, *overrides: str):
    return load_config(overrides=["data.kind=manifest", f"data.root={root}", "train.progress=false",
                                  "train.batch_size=1", *SMALL,
                                  *overrides])


def test_the_split_column_is_honoured_the_validated_images_are_the_val_rows(slides):
    sides = ["train", "train", "val", "test", "train", "val"]
    _table(slides / "split.csv", "slide_id,label,split",
           [f"S{i},{CLASSES[i % 2]},{s}" for i, s in enumerate(sides)])
    train, val = build_datasets(_config(slides, "data.manifest=split.csv"), init_distributed("cpu"))
    base, val_indices = unwrap_dataset(val)
    _, train_indices = unwrap_dataset(train)
    assert [base.ids[i] for i in val_indices] == ["S2", "S5"]
    assert [base.ids[i] for i in train_indices] == ["S0", "S1", "S4"]
    assert isinstance(train, AugmentedDataset) and not isinstance(val, AugmentedDataset)   # slides: on for training


def test_a_fold_column_validates_on_the_fold_asked_for(slides):
    _table(slides / "folds.csv", "slide_id,label,fold", [f"S{i},{CLASSES[i % 2]},{i % 3}" for i in range(6)])
    train, val = build_datasets(_config(slides, "data.manifest=folds.csv", "data.fold=2"), init_distributed("cpu"))
    base, val_indices = unwrap_dataset(val)
    assert [base.ids[i] for i in val_indices] == ["S2", "S5"]
    assert len(train) == 4


def test_the_default_split_is_grouped_by_patient_stratified_and_seeded():
    rng = np.random.default_rng(0)
    patients = [f"P{p}" for p in rng.integers(0, 40, 200)]
    label_of = {p: int(rng.random() < 0.2) for p in set(patients)}      # a 1:4 imbalance, per patient
    labels = [label_of[p] for p in patients]
    sides = grouped_stratified_split(labels, patients, val=0.2, test=0.1, seed=3)
    assert sides == grouped_stratified_split(labels, patients, val=0.2, test=0.1, seed=3)
    assert sides != grouped_stratified_split(labels, patients, val=0.2, test=0.1, seed=4)
    for p in set(patients):
        assert len({s for s, q in zip(sides, patients) if q == p}) == 1
    for label in (0, 1):
        groups = {p for p in set(patients) if label_of[p] == label}
        val_groups = {p for p in groups if sides[patients.index(p)] == "val"}
        assert len(val_groups) == round(len(groups) * 0.2)


def test_balance_class_draws_each_class_about_equally(slides):
    _table(slides / "skewed.csv", "slide_id,label", [f"S{i},{'tumor' if i == 0 else 'normal'}" for i in range(6)])
    train, _ = build_datasets(_config(slides, "data.manifest=skewed.csv", "data.val_fraction=0",
                                      "data.augment=[]"), init_distributed("cpu"))
    weights = class_weights(train)
    sampler = ShardedBatchSampler(len(train), 1, seed=0, weights=weights)
    drawn = []
    for epoch in range(200):
        sampler.set_epoch(epoch)
        drawn += [i for batch in sampler for i in batch]
    base, indices = unwrap_dataset(train)
    tumour_share = sum(base.labels[indices[i]] == 1 for i in drawn) / len(drawn)
    assert 0.45 < tumour_share < 0.55          # 1 of 6 images without balancing
    config = _config(slides, "data.manifest=skewed.csv", "data.balance=loss")
    assert loss_weights(train, config).tolist() == pytest.approx([6 / (2 * 5), 6 / (2 * 1)])


def test_the_class_weighted_loss_weights_each_image_even_in_a_batch_of_one():
    torch.manual_seed(0)
    model = build_model("tiny-cnn", "pool", num_classes=2, in_channels=3).double()
    images, labels, weights = torch.rand(3, 3, 40, 40, dtype=torch.float64), torch.tensor([0, 1, 1]), torch.tensor([0.6, 3.0])
    for batch in ([0], [0, 1, 2]):
        model.zero_grad()
        loss, _ = micro_step(model, images[batch], labels[batch], device_type="cpu", class_weights=weights)
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        per_image = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch], reduction="none")
        expected = (per_image * weights[labels[batch]]).mean()
        expected.backward()
        assert float(loss) == pytest.approx(float(expected), rel=1e-6)      # micro_step: float32 loss
        for g, p in zip(got, model.parameters()):
            assert relative_error(g, p.grad) <= 1e-6


@pytest.mark.parametrize("names", [AUGMENTS, ("flip", "rot90")])
def test_an_augmented_streamed_step_equals_the_augmented_image_trained_whole(slides, names):
    reader = open_image(slides / "S2.tiff")
    augmentation = next(a for a in (Augmentation.draw(names, (0, 2, epoch)) for epoch in range(50))
                        if a.rot90 % 2 == 1 and a.hflip and a.colour == (names == AUGMENTS))
    view = AugmentedView(reader, augmentation)
    assert view.shape[1:] == (SIZES[2][1], SIZES[2][0])
    whole = view.read_region(0, 0, *view.shape[1:])
    expected = augmentation.colours(augmentation.geometry(reader.read_region(0, 0, *SIZES[2])))
    assert np.array_equal(whole, expected)
    torch.manual_seed(0)
    model = build_model("tiny-cnn", "pool", num_classes=2, in_channels=3, tile_size=48).double()
    labels = torch.tensor([1])
    model.train()
    torch.nn.functional.cross_entropy(model(view), labels).backward()
    streamed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.trunk.tile_size = None
    pixels = torch.from_numpy(whole.astype(np.float64) / 255)[None]
    torch.nn.functional.cross_entropy(model(pixels), labels).backward()
    for got, want in zip(streamed, [p.grad for p in model.parameters()]):
        assert relative_error(got, want) <= 1e-10


def test_augmentation_is_seeded_per_image_and_epoch(slides):
    dataset = AugmentedDataset(ManifestDataset(slides, "slides.csv"), AUGMENTS, seed=5)
    first = [dataset[i][0].augmentation for i in range(6)]
    assert [dataset[i][0].augmentation for i in range(6)] == first
    assert len(set(first)) > 1
    dataset.epoch = 1
    assert [dataset[i][0].augmentation for i in range(6)] != first


def test_metrics_auc_balanced_accuracy_recall_and_quadratic_kappa():
    rng = np.random.default_rng(0)
    labels = torch.tensor(rng.integers(0, 2, 60))
    logits = torch.tensor(rng.normal(size=(60, 2))).round(decimals=1)     # ties
    scores = torch.softmax(logits.double(), 1)[:, 1]
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a in scores[labels == 1] for b in scores[labels == 0]]
    metrics = classification_metrics(logits, labels, 2)
    assert metrics["val_auc"] == pytest.approx(np.mean(pairs), abs=1e-12)
    predicted = logits.argmax(1)
    recall = [float(((predicted == c) & (labels == c)).sum() / (labels == c).sum()) for c in (0, 1)]
    assert metrics["val_recall"] == pytest.approx(recall) and metrics["val_balanced_accuracy"] == pytest.approx(np.mean(recall))
    grades, guesses = torch.tensor(rng.integers(0, 4, 80)), torch.tensor(rng.integers(0, 4, 80))
    weight = lambda a, b: (a - b) ** 2 / 9     # noqa: E731
    observed = np.mean([weight(a, b) for a, b in zip(grades.tolist(), guesses.tolist())])
    chance = np.mean([weight(a, b) for a in grades.tolist() for b in guesses.tolist()])
    assert quadratic_kappa(confusion_matrix(guesses, grades, 4)) == pytest.approx(1 - observed / chance)
    assert quadratic_kappa(confusion_matrix(grades, grades, 4)) == pytest.approx(1.0)


def test_best_by_chooses_the_metric_behind_best_pt():
    from streamcnn.training.runner import _best

    history = [{"epoch": 1, "train_loss": 0.5, "val_accuracy": 0.9, "val_auc": 0.6, "val_loss": 0.4},
               {"epoch": 2, "train_loss": 0.4, "val_accuracy": 0.8, "val_auc": 0.7, "val_loss": 0.3}]
    assert _best(history)["epoch"] == 1
    assert _best(history, "val_auc")["epoch"] == 2 and _best(history, "val_loss")["epoch"] == 2


def test_best_by_names_only_metrics_it_can_follow(slides, capsys):
    assert tool("train").main(["--data", str(slides / "slides.csv"), "--out", str(slides / "never"),
                               *sets(*SMALL, "train.best_by=val_f1", "train.progress=false")]) == 1
    _one_line_error(capsys, ["train.best_by", "val_f1", "val_auc"])


def test_a_table_that_is_not_utf8_is_named_in_one_line(slides, capsys):
    bad = slides / "latin1.csv"
    bad.write_bytes("slide_id,label\nS0,normal\nS1,tumör\n".encode("latin-1"))
    assert tool("train").main(["--data", str(bad), *sets(*SMALL, "train.progress=false")]) == 1
    _one_line_error(capsys, [str(bad), "not UTF-8"])


def test_a_label_column_with_one_class_says_so(slides, capsys):
    one = _table(slides / "one.csv", "slide_id,label", [f"S{i},tumor" for i in range(6)])
    assert tool("train").main(["--data", str(one), "--out", str(slides / "never"),
                                *sets(*SMALL, "train.progress=false")]) == 1
    _one_line_error(capsys, [str(one), "only one class: tumor"])


def test_a_truncated_jpeg_pyramid_says_truncated(slides, tmp_path):
    pyvips = pytest.importorskip("pyvips")
    pixels = slide_pixels(256, 320, seed=1, label=1)
    whole = tmp_path / "jpeg.tiff"
    pyvips.Image.new_from_array(pixels).tiffsave(str(whole), tile=True, pyramid=True, compression="jpeg",
                                                 tile_width=64, tile_height=64)
    data = whole.read_bytes()
    for fraction in (0.3, 0.6, 0.95):        # libvips writes each level's tiles before its directory
        cut = tmp_path / f"cut{fraction}.tiff"
        cut.write_bytes(data[:int(len(data) * fraction)])
        with pytest.raises(ValueError) as error:
            open_image(cut).level_shapes
        message = str(error.value)
        assert "\n" not in message and str(cut) in message and "truncated" in message


def _write_svs(path: Path, image: np.ndarray, levels: int) -> None:
    """An Aperio SVS as the scanner lays it out: baseline, thumbnail, then the reduced levels (tiled, JPEG)."""
    head = f"Aperio Image Library v12.0.15\r\n{image.shape[1]}x{image.shape[0]} (64x64) JPEG/RGB Q=90"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(64, 64), photometric="rgb", compression="jpeg", metadata=None,
                  description=f"{head}|AppMag = 20|MPP = 0.5")
        if levels > 1:
            tif.write(image[::8, ::8], photometric="rgb", compression="jpeg", metadata=None, description=head)
            for k in range(1, levels):
                tif.write(np.ascontiguousarray(image[::2 ** k, ::2 ** k]), tile=(64, 64), photometric="rgb",
                          compression="jpeg", metadata=None, description=head)


@pytest.mark.parametrize("levels", [1, 3])
def test_aperio_svs_reads_trains_and_predicts_like_a_tiff(tmp_path, levels, capsys):
    if importlib.util.find_spec("openslide") is None:
        pytest.importorskip("tiffslide")
    rows = []
    for i, (h, w) in enumerate([(256, 320), (320, 256), (256, 256), (320, 320)]):
        _write_svs(tmp_path / f"A{i}.svs", slide_pixels(h, w, seed=i, label=i % 2), levels)
        rows.append(f"P{i},A{i},{CLASSES[i % 2]}")
    reader = open_image(tmp_path / "A1.svs")
    assert reader.backend == "slide" and reader.level_count == levels and reader.mpp[0] == pytest.approx(0.5)
    assert reader.level_shapes[0] == (3, 320, 256)
    table = _table(tmp_path / "slides.csv", "patient,slide_id,label", rows)
    out = tmp_path / "run"
    assert tool("train").main(["--data", str(table), "--out", str(out), *sets(*SMALL, "data.val_fraction=0")]) == 0
    assert tool("predict").main(["--checkpoint", str(out / "last.pt"), "--data", str(table),
                                  "--out", str(tmp_path / "pred"), "--quiet"]) == 0
    predicted = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert [Path(row["path"]).name for row in predicted] == [f"A{i}.svs" for i in range(4)]
    capsys.readouterr()
    assert tool("evaluate").main(["--checkpoint", str(out / "last.pt"), "--data", str(table),
                                  "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["images"] == 4 and 0 <= report["auc"] <= 1 and len(report["recall"]) == 2
    assert "AUC" in capsys.readouterr().out
    cut = tmp_path / "cut.svs"
    cut.write_bytes((tmp_path / "A0.svs").read_bytes()[:-300])
    with pytest.raises(ValueError) as error:
        r = open_image(cut)
        r.level_shapes, r.read_region(0, 0, 256, 320)
    assert str(cut) in str(error.value) and "truncated" in str(error.value)
