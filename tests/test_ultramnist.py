"""UltraMNIST generator: the spec's rules, the file format, determinism and resuming."""
from __future__ import annotations

import csv
import gzip
import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

from streamcnn.data import generate_ultramnist, layout_statistics, load_digit_bank, sample_layout
from streamcnn.data.digits import read_idx
from streamcnn.data.ultramnist import MANIFEST_COLUMNS, MIN_DIGIT_PX, class_multisets, digit_side
from streamcnn.data.ultramnist import write as ultramnist_write
from helpers import assert_message

ultramnist_generate = importlib.import_module("streamcnn.data.ultramnist.generate")

SIZE = 512


def otsu(image: np.ndarray) -> int:
    """Brute-force Otsu on uint8 values: the t maximising n0 n1 (mean0 - mean1)^2; foreground is > t."""
    counts = np.bincount(image.ravel(), minlength=256).astype(np.float64)
    values = np.arange(256)
    best, best_t = -1.0, 0
    for t in range(255):
        n0, n1 = counts[:t + 1].sum(), counts[t + 1:].sum()
        if n0 and n1:
            m0 = (counts[:t + 1] * values[:t + 1]).sum() / n0
            m1 = (counts[t + 1:] * values[t + 1:]).sum() / n1
            if n0 * n1 * (m0 - m1) ** 2 > best:
                best, best_t = n0 * n1 * (m0 - m1) ** 2, t
    return best_t


def reference_background(layout) -> np.ndarray:
    """The spec's background made the direct way (images, not the generator's inverse-mapped
    lookup): the grid nearest-resized to the canvas, a bicubic affine about the centre with
    fill 0 (torch's grid_sample), a centre crop of half the canvas resized 2x (bicubic), an
    Otsu threshold; XOR circles and triangles tested pixel centre by pixel centre."""
    size, grid = layout.size, np.asarray(layout.grid, dtype=np.float32)
    cells = np.floor((np.arange(size) + 0.5) * len(grid) / size).astype(int)
    canvas = torch.from_numpy(grid[np.ix_(cells, cells)])[None, None]
    rotation, scale, shear = (math.radians(layout.affine[0]), layout.affine[1], math.radians(layout.affine[2]))
    forward = scale * np.array([[math.cos(rotation), -math.sin(rotation)], [math.sin(rotation), math.cos(rotation)]]) \
        @ np.array([[1.0, math.tan(shear)], [0.0, 1.0]])
    ys, xs = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    centre = size / 2
    source = np.einsum("ij,jhw->ihw", np.linalg.inv(forward), np.stack([xs - centre, ys - centre])) + centre
    where = torch.from_numpy(np.stack([2 * source[0] / size - 1, 2 * source[1] / size - 1], axis=-1)[None]).float()
    warped = F.grid_sample(canvas, where, mode="bicubic", padding_mode="zeros", align_corners=False)
    crop = warped[:, :, size // 4:3 * size // 4, size // 4:3 * size // 4]
    zoomed = F.interpolate(crop, scale_factor=2, mode="bicubic", align_corners=False)[0, 0].numpy()
    zoomed = np.clip(np.round(zoomed * 255), 0, 255).astype(np.uint8)
    shapes = np.zeros((size, size), dtype=bool)     # drawn on one black canvas: overlaps stay white
    for cx, cy, r in layout.circles:
        shapes |= (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    for x0, y0, x1, y1, x2, y2 in layout.triangles:
        sides = [(xb - xa) * (ys - ya) - (yb - ya) * (xs - xa)
                 for (xa, ya), (xb, yb) in (((x0, y0), (x1, y1)), ((x1, y1), (x2, y2)), ((x2, y2), (x0, y0)))]
        shapes |= np.all([d >= 0 for d in sides], axis=0) | np.all([d <= 0 for d in sides], axis=0)
    return (zoomed > otsu(zoomed)) ^ shapes


def within(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels at most ``radius`` px (Chebyshev) from a pixel where ``mask`` changes value."""
    edge = np.zeros_like(mask)
    for axis in (0, 1):
        change = np.diff(mask, axis=axis)
        lead = [slice(None)] * 2
        lead[axis] = slice(1, None)
        edge[tuple(lead)] |= change
        lead[axis] = slice(None, -1)
        edge[tuple(lead)] |= change
    near = edge.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            near |= np.roll(edge, (dy, dx), axis=(0, 1))
    return near


def read_manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ultramnist")
    generate_ultramnist(out, 10, size=SIZE, seed=3, progress=False, preview=out / "preview.png")
    return out


def test_class_multisets_give_the_spec_digit_counts():
    assert class_multisets(0) == ((0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0, 0))
    assert class_multisets(1) == ((0, 0, 1), (0, 0, 0, 1), (0, 0, 0, 0, 1))
    for label in range(28):
        assert all(sum(m) == label and list(m) == sorted(m) for m in class_multisets(label))
    # Classes are balanced and each picks a multiset uniformly: expected share of k digits.
    share = {k: np.mean([sum(len(m) == k for m in class_multisets(c)) / len(class_multisets(c)) for c in range(28)])
             for k in (3, 4, 5)}
    assert share[3] == pytest.approx(0.158, abs=0.002)
    assert share[4] == pytest.approx(0.301, abs=0.002)
    assert share[5] == pytest.approx(0.541, abs=0.002)


def test_digit_sides_scale_with_the_canvas_and_keep_a_floor():
    assert digit_side(1, True, 4000) == 14 and digit_side(1, False, 4000) == 28 and digit_side(75, False, 4000) == 2100
    assert digit_side(1, True, 512) == MIN_DIGIT_PX == digit_side(3, False, 512)
    assert digit_side(75, False, 512) == round(2100 * 512 / 4000)


def test_manifest_rules_and_pixels(generated):
    rows = read_manifest(generated)
    assert list(rows[0].keys()) == list(MANIFEST_COLUMNS)
    assert [r["id"] for r in rows] == [f"train_{i:06d}" for i in range(10)]
    bank = load_digit_bank("train")
    bank_sizes = [len(v) for v in bank.by_value]
    for i, row in enumerate(rows):
        digits, boxes = json.loads(row["digits"]), json.loads(row["boxes"])
        assert int(row["label"]) == sum(digits) and 3 <= len(digits) <= 5 and digits == sorted(digits)
        assert len(boxes) == len(digits)
        for k, (x, y, w, h) in enumerate(boxes):
            assert w == h and MIN_DIGIT_PX <= w <= round(2100 * SIZE / 4000)
            assert 0 <= x and x + w <= SIZE and 0 <= y and y + h <= SIZE
            for (x2, y2, w2, h2) in boxes[:k]:
                assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y, "digit boxes overlap"
        image = tifffile.imread(generated / row["path"])
        assert image.shape == (SIZE, SIZE) and image.dtype == np.uint8
        assert set(np.unique(image)) <= {0, 255}
        # The image is background XOR digits: outside the boxes it is the background the spec
        # describes, made here independently: the two may place an edge up to 2 px apart (bicubic
        # edges, the blocky upsampled grid), nowhere else; inside the boxes image XOR background
        # is a digit stroke.
        layout = sample_layout(i, size=SIZE, seed=3, bank_sizes=bank_sizes)
        assert layout.boxes == boxes and layout.digits == digits
        background = reference_background(layout)
        in_boxes = np.zeros(image.shape, dtype=bool)
        for x, y, w, h in boxes:
            in_boxes[y:y + h, x:x + w] = True
            stroke = (image[y:y + h, x:x + w] > 0) ^ background[y:y + h, x:x + w]
            assert 0 < stroke.mean() < 0.7
        wrong = ((image > 0) != background) & ~in_boxes
        assert wrong.mean() < 0.02 and not (wrong & ~within(background, 2) & ~within(image > 0, 2)).any()
    # The XOR background is really there: both colours fill large areas outside the digits.
    backgrounds = [tifffile.imread(generated / r["path"]) for r in rows]
    assert all(0.1 < b.mean() / 255 < 0.9 for b in backgrounds)
    assert (generated / "preview.png").stat().st_size > 10_000


def test_files_are_tiled_pyramids_with_levels_as_pages(generated):
    path = generated / read_manifest(generated)[0]["path"]
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
        assert len(tif.pages) == 2 and [p.shape for p in tif.pages] == [(512, 512), (256, 256)]
        assert all(p.is_tiled and p.tilewidth == 256 and p.tilelength == 256 for p in tif.pages)
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert not tif.pages[0].subifds
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_dimensions == ((512, 512), (256, 256))


def test_image_depends_only_on_seed_split_index(tmp_path, generated):
    generate_ultramnist(tmp_path / "a", 6, size=SIZE, seed=3, workers=2, progress=False)
    rows_a, rows_full = read_manifest(tmp_path / "a"), read_manifest(generated)
    assert rows_a == rows_full[:6]
    for row in rows_a:
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "a" / row["path"]),
                                      tifffile.imread(generated / row["path"]))
    generate_ultramnist(tmp_path / "b", 2, size=SIZE, seed=4, progress=False)
    assert read_manifest(tmp_path / "b")[0]["boxes"] != rows_full[0]["boxes"]


def test_resume_after_interruption(tmp_path, monkeypatch):
    real_write = ultramnist_write.write_pyramid_tiff
    calls = []

    def interrupted_write(image, path, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(path)
        real_write(image, path, **kwargs)

    monkeypatch.setattr(ultramnist_write, "write_pyramid_tiff", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        generate_ultramnist(tmp_path, 6, size=SIZE, progress=False)
    assert not (tmp_path / "manifest.csv").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "images").iterdir()}
    assert sorted(kept) == ["train_000000.tiff", "train_000001.tiff", "train_000002.tiff"]
    (tmp_path / "images" / ".train_000003.tiff.tmp-1").write_bytes(b"half written")

    monkeypatch.setattr(ultramnist_write, "write_pyramid_tiff", real_write)
    generate_ultramnist(tmp_path, 6, size=SIZE, progress=False)
    files = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert files == [f"train_{i:06d}.tiff" for i in range(6)]
    assert all((tmp_path / "images" / name).stat().st_mtime_ns == t for name, t in kept.items())
    reference = tmp_path / "reference"
    generate_ultramnist(reference, 6, size=SIZE, progress=False)
    assert read_manifest(tmp_path) == read_manifest(reference)
    for name in files:
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "images" / name),
                                      tifffile.imread(reference / "images" / name))


def test_a_finished_folder_is_reused_and_a_damaged_one_is_repaired(tmp_path, monkeypatch):
    generate_ultramnist(tmp_path, 4, size=SIZE, progress=False)
    manifest = read_manifest(tmp_path)
    drawn = []
    real_layout = ultramnist_generate.sample_layout
    monkeypatch.setattr(ultramnist_generate, "sample_layout", lambda *a, **k: drawn.append(a) or real_layout(*a, **k))
    generate_ultramnist(tmp_path, 4, size=SIZE, progress=False)
    assert drawn == [] and read_manifest(tmp_path) == manifest      # reused: no layout drawn again
    (tmp_path / "images" / "train_000002.tiff").unlink()
    generate_ultramnist(tmp_path, 4, size=SIZE, progress=False)
    assert len(drawn) == 4 and (tmp_path / "images" / "train_000002.tiff").is_file()
    assert read_manifest(tmp_path) == manifest
    generate_ultramnist(tmp_path, 5, size=SIZE, progress=False)      # more images: the rows are drawn again
    assert len(drawn) == 9 and read_manifest(tmp_path)[:4] == manifest


def test_refuses_to_mix_parameters_in_one_folder(tmp_path):
    generate_ultramnist(tmp_path, 1, size=SIZE, seed=0, progress=False)
    with pytest.raises(ValueError) as error:
        generate_ultramnist(tmp_path, 1, size=SIZE, seed=1, progress=False)
    assert_message(error, str(tmp_path), "'seed': (0, 1)")   # the folder, and the parameter that differs


def test_train_and_test_use_disjoint_digit_instances():
    train, test = load_digit_bank("train"), load_digit_bank("test")
    for v in range(10):
        train_set = {d.tobytes() for d in train.by_value[v]}
        assert not train_set & {d.tobytes() for d in test.by_value[v]}
    assert sum(map(len, train.by_value)) == 8004 and sum(map(len, test.by_value)) == 1996


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_files_split_by_file(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, value in (("train", 1), ("t10k", 2)):
        images = rng.integers(0, 256, size=(30, 28, 28))
        images[:, 0, 0] = value            # marks which file a digit came from
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(30) % 10)
    assert read_idx(tmp_path / "train-images-idx3-ubyte.gz").shape == (30, 28, 28)
    for split, value in (("train", 1), ("test", 2)):
        bank = load_digit_bank(split, tmp_path)
        assert all(len(d) == 3 and (d[:, 0, 0] == value).all() for d in bank.by_value)
    manifest = generate_ultramnist(tmp_path / "out", 2, size=256, mnist_dir=tmp_path, progress=False)
    assert json.loads((manifest.parent / "generation.json").read_text())["digits"] == f"MNIST IDX train files in {tmp_path}"
    (tmp_path / "bad").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        load_digit_bank("train", tmp_path / "bad")
    assert_message(error, "bad", "train-images-idx3-ubyte")
    (tmp_path / "bad" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "bad" / "train-images-idx3-ubyte")


def test_statistics_at_4000_match_the_reference():
    stats = layout_statistics(1500, size=4000, seed=0)
    assert sum(stats["label_counts"]) == 1500 and max(stats["label_counts"]) - min(stats["label_counts"]) <= 1
    assert stats["digit_count_mean"] == pytest.approx(4.38, abs=0.05)
    assert stats["digit_side_quantiles"]["10%"] == pytest.approx(84, abs=28)
    assert stats["digit_side_quantiles"]["50%"] == pytest.approx(420, rel=0.15)
    assert stats["digit_side_quantiles"]["90%"] == pytest.approx(1820, rel=0.1)
    assert stats["share_with_digit_at_most"]["56px"] == pytest.approx(0.36, abs=0.04)
    assert stats["share_with_digit_at_most"]["112px"] == pytest.approx(0.60, abs=0.04)
    values = stats["digit_value_counts"]
    assert values[0] == max(values) and values[0] > 4 * values[9]      # skewed toward 0, as in the spec


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        generate_ultramnist("/tmp/never", 1, split="val", progress=False)
    with pytest.raises(ValueError, match="canvas size 40 is too small"):
        sample_layout(0, size=40, bank_sizes=[10] * 10)
