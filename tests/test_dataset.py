"""ManifestDataset and collate_images: generated UltraMNIST folders and a user's own folder."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch.utils.data import DataLoader

from helpers import assert_message
from streamcnn.data import ManifestDataset, collate_images, generate_ultramnist
from streamcnn.data.slides import BadFiles
from streamcnn.io import ImageReader, TiffReader, VipsReader


@pytest.fixture(scope="module")
def ultramnist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ultramnist")
    generate_ultramnist(out, 6, size=256, seed=1, progress=False)
    return out


def test_lazy_items_are_readers_with_labels(ultramnist):
    data = ManifestDataset(ultramnist)
    assert len(data) == 6 and data.num_classes == max(data.labels) + 1
    image, label = data[2]
    assert isinstance(image, TiffReader) and image.shape == (1, 256, 256) and image.level_count == 1
    assert label == data.labels[2]
    np.testing.assert_array_equal(image.read_region(10, 20, 30, 40)[0],
                                  tifffile.imread(ultramnist / "images" / "train_000002.tiff")[10:40, 20:60])
    assert ManifestDataset(ultramnist, num_classes=28).num_classes == 28


def test_eager_items_are_uint8_tensors_and_collate_stacks_them(ultramnist):
    data = ManifestDataset(ultramnist, lazy=False)
    image, _ = data[0]
    assert image.dtype == torch.uint8 and image.shape == (1, 256, 256)
    torch.testing.assert_close(image[0], torch.from_numpy(tifffile.imread(ultramnist / "images" / "train_000000.tiff")))
    images, labels = collate_images([data[0], data[1]])
    assert images.shape == (2, 1, 256, 256) and labels.dtype == torch.long
    assert labels.tolist() == data.labels[:2]


def test_images_read_whole_are_read_once_and_kept_compressed_when_they_fit_in_memory(ultramnist, tmp_path,
                                                                                     monkeypatch):
    import shutil

    import streamcnn.data.dataset as dataset_module

    copy = tmp_path / "copy"
    shutil.copytree(ultramnist, copy)
    kept, unkept = ManifestDataset(copy, lazy=False), ManifestDataset(copy, lazy=False, in_memory=False)
    monkeypatch.setattr(dataset_module, "IN_MEMORY_LIMIT", 6 * 256 * 256 - 1)   # one sample short of the six images
    over = ManifestDataset(copy, lazy=False)
    assert ManifestDataset(copy, lazy=True, in_memory=True)._kept is None   # readers are never decoded here
    first = [kept[i][0].clone() for i in range(6)]
    over[0]
    assert 0 < kept.kept_bytes < sum(image.numel() for image in first) / 4   # compressed: binary images, 4x at least
    assert unkept.kept_bytes == 0 and over.kept_bytes == 0
    (copy / "images" / "train_000003.tiff").write_bytes(b"")       # every image was read once: gone from disk now
    torch.testing.assert_close(kept[3][0], first[3], rtol=0, atol=0)
    assert kept[3][0].dtype == torch.uint8 and kept[3][0].shape == first[3].shape
    with pytest.raises(ValueError, match="train_000003.tiff"):
        unkept[3]
    with pytest.raises(ValueError, match="train_000003.tiff"):
        over[3]                                                     # 6 x 256^2 samples > the limit: not kept


def test_images_to_keep_are_read_with_their_headers_once_in_worker_processes(ultramnist, tmp_path, monkeypatch):
    import shutil

    import streamcnn.data.slides as slides_module

    opened = []
    real_open = slides_module.open_image
    monkeypatch.setattr(slides_module, "open_image", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    copy = tmp_path / "copy"
    shutil.copytree(ultramnist, copy)
    here = ManifestDataset(copy, lazy=False, workers=1)
    assert len(opened) == 6 and here.kept_bytes > 0                 # one open per file: header and pixels
    pooled = ManifestDataset(copy, lazy=False, workers=2)           # two spawned processes check and read
    assert pooled.entries == here.entries and pooled.kept_bytes == here.kept_bytes
    for path in (copy / "images").glob("*.tiff"):
        path.write_bytes(b"")                                       # nothing is read from disk any more
    for i in range(6):
        torch.testing.assert_close(pooled[i][0], here[i][0], rtol=0, atol=0)
    assert len(opened) == 6
    with pytest.raises(BadFiles, match="train_000002.tiff"):        # a bad file named from a worker, too
        ManifestDataset(copy, lazy=False, workers=2)


def test_collate_never_stacks_readers_or_unequal_tensors(ultramnist):
    data = ManifestDataset(ultramnist)
    images, labels = collate_images([data[0], data[1]])
    assert isinstance(images, list) and all(isinstance(i, ImageReader) for i in images)
    assert labels.tolist() == data.labels[:2]
    mixed, _ = collate_images([(torch.zeros(1, 4, 4), 0), (torch.zeros(1, 5, 4), 1)])
    assert isinstance(mixed, list) and [m.shape for m in mixed] == [(1, 4, 4), (1, 5, 4)]


def _top_left_mean(reader: ImageReader) -> torch.Tensor:
    return torch.tensor(reader.read_region(0, 0, 64, 64).mean())


def test_dataloader_workers_send_and_read_readers(ultramnist):
    data = ManifestDataset(ultramnist)
    loader = DataLoader(data, batch_size=3, num_workers=2, collate_fn=collate_images)
    batches = list(loader)
    readers = [r for images, _ in batches for r in images]
    assert len(readers) == 6 and all(isinstance(r, TiffReader) for r in readers)
    expected = [tifffile.imread(p)[:64, :64].mean() for p in data.paths]
    assert [float(r.read_region(0, 0, 64, 64).mean()) for r in readers] == pytest.approx(expected)
    # Reading inside the workers (file handles opened per process).
    reading = ManifestDataset(ultramnist, transform=_top_left_mean)
    means = torch.cat([m for m, _ in DataLoader(reading, batch_size=2, num_workers=2)])
    assert means.tolist() == pytest.approx(expected)


def test_a_users_own_folder(tmp_path):
    import pyvips

    rng = np.random.default_rng(0)
    (tmp_path / "slides").mkdir()
    rgb = rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "slides" / "a.tif", rgb, tile=(32, 32), photometric="rgb")
    png = tmp_path / "elsewhere.png"
    pyvips.Image.new_from_array(rgb[:40]).pngsave(str(png))
    (tmp_path / "labels.csv").write_text(f"path,label,notes\nslides/a.tif,3,first\n{png},0,absolute path\n")
    data = ManifestDataset(tmp_path, manifest="labels.csv")
    assert data.labels == [3, 0] and data.num_classes == 4
    assert isinstance(data[0][0], TiffReader) and isinstance(data[1][0], VipsReader)
    np.testing.assert_array_equal(data[1][0].read_level(0), np.moveaxis(rgb[:40], -1, 0))
    images, _ = collate_images([ManifestDataset(tmp_path, "labels.csv", lazy=False)[i] for i in range(2)])
    assert isinstance(images, list) and [tuple(i.shape) for i in images] == [(3, 64, 80), (3, 40, 80)]


def test_manifest_errors_name_the_problem(tmp_path, ultramnist):
    with pytest.raises(FileNotFoundError) as error:
        ManifestDataset(tmp_path)
    assert_message(error, str(tmp_path / "manifest.csv"), "not found")
    (tmp_path / "nolabel.csv").write_text("path,digits\nimages/x.tiff,[1]\n")
    with pytest.raises(ValueError) as error:
        ManifestDataset(tmp_path, "nolabel.csv")
    assert_message(error, "nolabel.csv", "missing", "'label'")
    image = ultramnist / "images" / "train_000000.tiff"
    (tmp_path / "missing.csv").write_text(f"path,label\n{image},1\nimages/gone.tiff,2\n")
    with pytest.raises(FileNotFoundError) as error:
        ManifestDataset(tmp_path, "missing.csv")
    assert_message(error, str(tmp_path / "images" / "gone.tiff"), "not found")
    assert "train_000000.tiff" not in str(error.value)          # only the missing file is named
    (tmp_path / "badlabel.csv").write_text(f"path,label\n{image},1\n{image},seven\n")
    with pytest.raises(ValueError) as error:
        ManifestDataset(tmp_path, "badlabel.csv")
    assert_message(error, "badlabel.csv", "line 3", str(image), "'seven'", "not an integer")
