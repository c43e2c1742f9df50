"""Slide tables, pyramid level / mpp choice, tissue crops and header checks on generated RGB slides."""
from __future__ import annotations

import re

import numpy as np
import pytest
import tifffile
import torch

from helpers import assert_message
from slide_data import CLASSES, SIZES, make_slide_folder, slide_pixels, write_slide
from streamcnn.data import ManifestDataset
from streamcnn.data.slides import SlideView, choose_level
from streamcnn.io import open_image
from streamcnn.training.baselines import downsample_image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_slide_folder(tmp_path_factory.mktemp("slides"))


def test_slide_table_with_slide_ids_and_class_names(folder):
    data = ManifestDataset(folder, "slides.csv")
    assert data.classes == CLASSES and data.num_classes == 2 and data.channels == 3
    assert data.labels == [i % 2 for i in range(len(SIZES))]
    assert [p.name for p in data.paths] == [f"S{i}.tiff" for i in range(len(SIZES))]   # extension found
    assert [e.size for e in data.entries] == SIZES
    assert data.entries[data.largest()].size == (256, 384)
    # a model's class list numbers the names; an unknown name is one line naming it
    (folder / "named.csv").write_text("slide_id,label\nS0,tumor\nS1,x\n")
    assert ManifestDataset(folder, "named.csv", classes=["tumor", "x"]).labels == [0, 1]
    (folder / "other.csv").write_text("slide_id,label\nS0,tumor\nS1,benign\n")
    with pytest.raises(ValueError) as error:
        ManifestDataset(folder, "other.csv", classes=["tumor", "x"])
    assert_message(error, "other.csv", "line 3", "S1", "'benign'", "['tumor', 'x']")


def test_mpp_is_read_from_tiff_tags_aperio_and_ome(tmp_path):
    image = slide_pixels(128, 192, seed=0)
    write_slide(tmp_path / "tags.tiff", image, mpp=0.25)
    write_slide(tmp_path / "svs.tiff", image, mpp=None, description="Aperio Image Library v12 |MPP = 0.2520|AppMag = 40")
    tifffile.imwrite(tmp_path / "ome.ome.tiff", image, photometric="rgb", metadata={"PhysicalSizeX": 0.5,
                                                                                     "PhysicalSizeXUnit": "µm"})
    write_slide(tmp_path / "none.tiff", image, mpp=None)
    assert open_image(tmp_path / "tags.tiff").mpp == pytest.approx([0.25, 0.5, 1.0])
    assert open_image(tmp_path / "svs.tiff").mpp == pytest.approx([0.252, 0.504, 1.008])
    assert open_image(tmp_path / "ome.ome.tiff").mpp == pytest.approx([0.5])
    assert open_image(tmp_path / "none.tiff").mpp == [None, None, None]


def test_level_and_mpp_read_that_levels_pixels(tmp_path):
    levels = write_slide(tmp_path / "a.tiff", slide_pixels(256, 320, seed=3), mpp=0.25)
    (tmp_path / "t.csv").write_text("path,label\na.tiff,0\n")
    reader = open_image(tmp_path / "a.tiff")
    # the level closest to the asked mpp without being coarser (never upsample)
    assert [choose_level(reader, mpp=m)[0] for m in (0.25, 0.4, 0.5, 0.99, 1.0, 8.0)] == [0, 0, 1, 1, 2, 2]
    for options, level in (({"level": 1}, 1), ({"mpp": 1.0}, 2), ({"mpp": 0.6}, 1)):
        image, _ = ManifestDataset(tmp_path, "t.csv", **options)[0]
        assert image.shape == (3, *levels[level].shape[:2])
        np.testing.assert_array_equal(image.read_region(5, 7, 40, 50), np.moveaxis(levels[level][5:45, 7:57], -1, 0))
        eager, _ = ManifestDataset(tmp_path, "t.csv", lazy=False, **options)[0]
        np.testing.assert_array_equal(eager.numpy(), np.moveaxis(levels[level], -1, 0))
    write_slide(tmp_path / "b.tiff", slide_pixels(128, 128, seed=1), mpp=None)
    (tmp_path / "u.csv").write_text("path,label\nb.tiff,0\n")
    with pytest.warns(UserWarning, match="microns-per-pixel") as warned:
        assert ManifestDataset(tmp_path, "u.csv", mpp=1.0, level=1).entries[0].level == 1
    assert_message(next(w.message for w in warned if "microns-per-pixel" in str(w.message)),
                   str(tmp_path / "b.tiff"), "no microns-per-pixel", "level 1", "data.level")
    with pytest.raises(ValueError) as error:
        ManifestDataset(tmp_path, "u.csv", level=5)
    assert_message(error, str(tmp_path / "b.tiff"), "0..2", "level 5", "data.level")


def test_tissue_crop_from_otsu_and_from_a_mask(tmp_path):
    image = slide_pixels(256, 320, seed=2)
    levels = write_slide(tmp_path / "a.tiff", image)
    (tmp_path / "t.csv").write_text("path,label\na.tiff,0\n")
    data = ManifestDataset(tmp_path, "t.csv", tissue="otsu", level=1)
    view, _ = data[0]
    top, left, h, w = data.entries[0].box
    # the tissue rectangle of slide_pixels (seed 2) at level 1, rounded outwards
    assert isinstance(view, SlideView) and (top, left) == (52 // 2, 82 // 2) and view.shape == (3, h, w)
    assert (top + h, left + w) == (-(-(256 - 256 // 6) // 2), -(-(320 - 320 // 5) // 2))
    np.testing.assert_array_equal(view.read_region(0, 0, h, w), np.moveaxis(levels[1][top:top + h, left:left + w], -1, 0))
    mask = np.zeros((64, 80), np.uint8)
    mask[16:32, 20:60] = 255
    tifffile.imwrite(tmp_path / "a_mask.tiff", mask)
    masked = ManifestDataset(tmp_path, "t.csv", tissue="mask")
    assert masked.entries[0].box == (64, 80, 64, 160)


def test_bad_files_are_named_before_training_and_skipped_on_request(tmp_path):
    make_slide_folder(tmp_path, SIZES[:3])
    good = (tmp_path / "S1.tiff").read_bytes()
    with tifffile.TiffFile(tmp_path / "S1.tiff") as tif:
        end = int(max(np.add(tif.pages[0].dataoffsets, tif.pages[0].databytecounts)))
    (tmp_path / "S1.tiff").write_bytes(good[:end - 100])
    (tmp_path / "S2.tiff").write_text("not an image at all")
    with pytest.raises(ValueError) as error:
        ManifestDataset(tmp_path, "slides.csv")
    # not assert_message: S2's reason carries libvips's own error text, which spans two lines
    message = str(error.value)
    for part in ("2 bad image file", str(tmp_path / "S1.tiff"), "truncated", str(tmp_path / "S2.tiff"), "not an image",
                 "data.on_error=skip"):
        assert part in message, (part, message)
    data = ManifestDataset(tmp_path, "slides.csv", on_error="skip")
    assert [p.name for p in data.paths] == ["S0.tiff"]
    assert [p.name for p, _ in data.skipped] == ["S1.tiff", "S2.tiff"]
    tifffile.imwrite(tmp_path / "S1.tiff", slide_pixels(64, 64, 0)[..., 0])
    (tmp_path / "S2.tiff").write_bytes(good)
    with pytest.raises(ValueError) as error:
        ManifestDataset(tmp_path, "slides.csv")
    assert_message(error, str(tmp_path / "S1.tiff"), "1 channel", "3")


def test_downsample_baseline_keeps_the_aspect_ratio():
    image = torch.zeros(3, 100, 300, dtype=torch.uint8) + 255
    padded = downsample_image(image, 60)
    assert padded.shape == (3, 60, 60)
    assert padded[:, 20:40].min() == 1 and padded[:, :20].max() == 0 and padded[:, 40:].max() == 0
    assert downsample_image(image, 60, fit="long_side").shape == (3, 20, 60)
