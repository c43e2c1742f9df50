"""streamcnn.data.variants: relabelled UltraMNIST manifests over the same images."""
from __future__ import annotations

import csv
import json

import pytest

from helpers import assert_message
from streamcnn.data import ManifestDataset, generate_ultramnist
from streamcnn.data.variants import write_variant_manifest


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("um")
    generate_ultramnist(root, 12, size=96, seed=3, progress=False)
    return root


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_count_labels_are_the_number_of_digits_and_classes_are_balanced(generated):
    digits = {row["path"]: json.loads(row["digits"]) for row in _rows(generated / "manifest.csv")}
    path, counts = write_variant_manifest(generated, "count")
    rows = _rows(path)
    assert path.name == "manifest-count.csv" and len(set(counts)) == 1 and counts[0] > 0 and sum(counts) == len(rows)
    for row in rows:
        assert int(row["label"]) == len(digits[row["path"]]) - 3
    dataset = ManifestDataset(generated, path.name, num_classes=3)
    assert len(dataset) == sum(counts)


def test_sum_variant_is_the_benchmark_label(generated):
    original = {row["path"]: int(row["label"]) for row in _rows(generated / "manifest.csv")}
    path, counts = write_variant_manifest(generated, "sum", balance=False)
    assert {row["path"]: int(row["label"]) for row in _rows(path)} == original and sum(counts) == 12


def test_unknown_variant_and_missing_manifest_are_named(tmp_path, generated):
    with pytest.raises(ValueError) as error:
        write_variant_manifest(generated, "parity")
    assert_message(error, "'parity'", "'smallest'", "'sum'")
    with pytest.raises(FileNotFoundError) as error:
        write_variant_manifest(tmp_path, "count")
    assert_message(error, str(tmp_path / "manifest.csv"), "does not exist", "generate")


def test_learning_arms_share_budget_data_optimizer_and_loop():
    """The benchmark's arms differ only in how the model sees the image (docs/learning.md)."""
    from pathlib import Path

    from streamcnn.training import load_config

    configs = {path.stem: load_config(path) for path in sorted((Path(__file__).parents[1] / "configs").glob("learning-*.yaml"))}
    assert set(configs) == {"learning-stream", "learning-down", "learning-patchgd", "learning-zoomin"}
    shared = {name: (c.data, c.plan, c.optim, c.train, c.model.trunk, c.model.num_classes) for name, c in configs.items()}
    assert len({repr(v) for v in shared.values()}) == 1
    assert {name: c.model.mode for name, c in configs.items()} == {
        "learning-stream": "stream", "learning-down": "downsample", "learning-patchgd": "patchgd",
        "learning-zoomin": "zoomin"}


def test_smallest_labels_from_a_hand_made_manifest(tmp_path):
    """The digit in the smallest box; boxes of the same smallest size: the largest of their values."""
    rows = [  # digits (ascending, as the generator writes them) and boxes [x, y, w, h]
        ("a.tiff", [1, 4, 7], [[0, 0, 40, 40], [50, 0, 14, 14], [0, 50, 20, 20]]),              # 4: one smallest
        ("b.tiff", [2, 3, 8], [[0, 0, 14, 14], [20, 0, 30, 30], [60, 0, 14, 14]]),              # tie 2 / 8: 8
        ("c.tiff", [0, 5, 5, 9], [[0, 0, 16, 16], [20, 0, 16, 16], [40, 0, 60, 60], [0, 40, 17, 17]]),  # tie 0 / 5: 5
        ("d.tiff", [0, 0, 6], [[0, 0, 70, 70], [80, 0, 90, 90], [0, 80, 15, 15]]),             # 6, far from the rest
    ]
    with open(tmp_path / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path", "label", "digits", "boxes"])
        for path, digits, boxes in rows:
            writer.writerow([path, path, sum(digits), json.dumps(digits), json.dumps(boxes)])
    path, counts = write_variant_manifest(tmp_path, "smallest", balance=False)
    assert [(row["path"], int(row["label"])) for row in _rows(path)] == [
        ("a.tiff", 4), ("b.tiff", 8), ("c.tiff", 5), ("d.tiff", 6)]
    assert counts == [0, 0, 0, 0, 1, 1, 1, 0, 1, 0]
    _, balanced = write_variant_manifest(tmp_path, "smallest")     # classes 0-3 have no image
    assert balanced == [0] * 10 and _rows(path) == []
