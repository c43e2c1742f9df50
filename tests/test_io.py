"""Lazy image readers: round trips through every backend, laziness, errors, streaming from a reader."""
from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn as nn

from helpers import assert_message
from streamcnn import RegionSource, StreamingModule
from streamcnn.data.ultramnist import write_pyramid_tiff
from streamcnn.io import SlideReader, TiffReader, VipsReader, open_image

H, W = 300, 412


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    """(H, W, 3) uint8 with structure (gradients) and noise, so misplaced reads show."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:H, :W]
    base = np.stack([x * 255 // W, y * 255 // H, (x + y) % 256], axis=-1)
    return (base + rng.integers(0, 20, size=base.shape)).clip(0, 255).astype(np.uint8)


def half(image: np.ndarray) -> np.ndarray:
    return image[::2, ::2]


@pytest.fixture(scope="module")
def files(tmp_path_factory, rgb) -> dict[str, tuple[Path, list[np.ndarray]]]:
    """name -> (file, expected (H, W[, C]) arrays per level) in many layouts and codecs."""
    import pyvips

    d = tmp_path_factory.mktemp("images")
    out: dict[str, tuple[Path, list[np.ndarray]]] = {}
    # pyvips pyramid, levels as pages (what the generator writes)
    write_pyramid_tiff(rgb, d / "pages.tiff", tile=64)
    with tifffile.TiffFile(d / "pages.tiff") as tif:
        out["pyramid as pages, deflate"] = (d / "pages.tiff", [p.asarray() for p in tif.pages])
    # tifffile pyramid in SubIFDs, LZW, BigTIFF
    with tifffile.TiffWriter(d / "subifd.tiff", bigtiff=True) as tif:
        tif.write(rgb, tile=(64, 64), compression="lzw", subifds=1, photometric="rgb")
        tif.write(half(rgb), tile=(64, 64), compression="lzw", subfiletype=1, photometric="rgb")
    out["pyramid as SubIFDs, LZW, BigTIFF"] = (d / "subifd.tiff", [rgb, half(rgb)])
    # striped (untiled), deflate, greyscale
    tifffile.imwrite(d / "striped.tif", rgb[..., 0], compression="zlib", rowsperstrip=16)
    out["striped grey, deflate"] = (d / "striped.tif", [rgb[..., 0]])
    # JPEG tiles: lossy, so compare with the decoded file
    tifffile.imwrite(d / "jpeg.tiff", rgb, tile=(64, 64), compression="jpeg", photometric="rgb")
    out["tiled JPEG"] = (d / "jpeg.tiff", [tifffile.imread(d / "jpeg.tiff")])
    # OME-TIFF, planar channels (CYX)
    tifffile.imwrite(d / "image.ome.tiff", np.moveaxis(rgb, -1, 0), ome=True, tile=(64, 64),
                     metadata={"axes": "CYX"})
    out["OME-TIFF planar CYX"] = (d / "image.ome.tiff", [rgb])
    # PNG and JPEG through libvips
    pyvips.Image.new_from_array(rgb).pngsave(str(d / "image.png"))
    out["PNG"] = (d / "image.png", [rgb])
    pyvips.Image.new_from_array(rgb).jpegsave(str(d / "image.jpg"), Q=90)
    out["JPEG"] = (d / "image.jpg", [pyvips.Image.new_from_file(str(d / "image.jpg")).numpy()])
    return out


def as_chw(a: np.ndarray) -> np.ndarray:
    return a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)


REGIONS = [(0, 0, 64, 64), (37, 101, 77, 150), (H - 50, W - 33, 50, 33), (0, 0, H, W)]


@pytest.mark.parametrize("name,backend", [
    ("pyramid as pages, deflate", TiffReader), ("pyramid as SubIFDs, LZW, BigTIFF", TiffReader),
    ("striped grey, deflate", TiffReader), ("tiled JPEG", TiffReader), ("OME-TIFF planar CYX", TiffReader),
    ("PNG", VipsReader), ("JPEG", VipsReader),
])
def test_round_trip(files, name, backend):
    path, levels = files[name]
    with open_image(path) as reader:
        assert type(reader) is backend
        assert isinstance(reader, RegionSource)
        assert reader.level_shapes == [as_chw(level).shape for level in levels]
        assert reader.shape == as_chw(levels[0]).shape and reader.dtype == np.uint8
        for top, left, h, w in REGIONS:
            region = reader.read_region(top, left, h, w)
            assert region.shape == (reader.shape[0], h, w)
            np.testing.assert_array_equal(region, as_chw(levels[0])[:, top:top + h, left:left + w])
        for k, level in enumerate(levels):
            np.testing.assert_array_equal(reader.read_level(k), as_chw(level))


def test_pyramid_levels_as_pages_are_all_seen_by_tifffile_openslide_and_tiffslide(files, rgb):
    pytest.importorskip("openslide")
    path, levels = files["pyramid as pages, deflate"]
    assert len(levels) == 4          # 300x412 with 64 px tiles: 4 levels down to one tile
    reader = open_image(path)
    slide = open_image(path, backend="slide")
    assert type(slide) is SlideReader and slide.level_count == reader.level_count == 4
    # OpenSlide returns RGB; it reads exact pixels where the level's downsample is an integer
    # (levels 0..2 here; level 3, 38 x 52, is 8.09x smaller and OpenSlide resamples it).
    for k in range(3):
        _, h, w = reader.level_shapes[k]
        np.testing.assert_array_equal(slide.read_region(5, 7, h - 9, w - 11, level=k),
                                      reader.read_region(5, 7, h - 9, w - 11, level=k))
    tiffslide = pytest.importorskip("tiffslide")
    with tiffslide.TiffSlide(str(path)) as ts:
        assert ts.level_dimensions == tuple((w, h) for _, h, w in reader.level_shapes)


@pytest.mark.parametrize("bands", [1, 3])
def test_a_one_tile_image_is_the_file_libvips_would_write(tmp_path, rgb, bands):
    from streamcnn.data.ultramnist import write as ultramnist_write

    image = np.ascontiguousarray(rgb[:120, :90] if bands == 3 else rgb[:120, :90, 1])
    write_pyramid_tiff(image, tmp_path / "fast.tiff")           # one 256 px tile: tifffile
    ultramnist_write._pyramid(np.atleast_3d(image), tmp_path / "vips.tiff", 256, "deflate")
    pages = {}
    for name in ("fast", "vips"):
        with tifffile.TiffFile(tmp_path / f"{name}.tiff") as tif:
            assert tif.is_bigtiff and len(tif.pages) == 1
            page = tif.pages[0]
            pages[name] = page.asarray(), {tag: page.tags[tag].value for tag in (
                "ImageWidth", "ImageLength", "SamplesPerPixel", "PhotometricInterpretation", "Compression",
                "Predictor", "TileWidth", "TileLength", "XResolution", "ResolutionUnit")}, page.planarconfig
    assert np.array_equal(pages["fast"][0], image) and np.array_equal(pages["vips"][0], image)
    assert pages["fast"][2] == pages["vips"][2]     # samples interleaved
    fast, vips = pages["fast"][1], pages["vips"][1]
    (fn, fd), (vn, vd) = fast.pop("XResolution"), vips.pop("XResolution")
    assert fn / fd == pytest.approx(vn / vd, rel=1e-6)    # 25.4 pixels per inch: 1 px/mm
    assert fast == vips
    np.testing.assert_array_equal(open_image(tmp_path / "fast.tiff").read_level(0),
                                  image[None] if bands == 1 else np.moveaxis(image, -1, 0))


def test_thumbnail_uses_the_pyramid(files, rgb):
    path, levels = files["pyramid as pages, deflate"]
    reader = open_image(path)
    calls = []
    real = reader._read
    reader._read = lambda handle, level, *a: (calls.append(level), real(handle, level, *a))[1]
    thumb = reader.read_thumbnail(100)
    assert calls == [2] and thumb.shape == (3, 73, 100)    # level 2 is 75 x 103: the smallest >= 100
    expected = torch.nn.functional.interpolate(torch.from_numpy(as_chw(levels[2])).float()[None], size=(73, 100),
                                               mode="area")[0].round().numpy().astype(np.uint8)
    np.testing.assert_array_equal(thumb, expected)
    png = open_image(files["PNG"][0]).read_thumbnail(103)
    assert png.shape == (3, 75, 103)


def test_backend_is_chosen_by_content_not_extension(tmp_path, files):
    tiff_named_png = tmp_path / "really_a_tiff.png"
    tiff_named_png.write_bytes(files["tiled JPEG"][0].read_bytes())
    png_named_tiff = tmp_path / "really_a_png.tiff"
    png_named_tiff.write_bytes(files["PNG"][0].read_bytes())
    assert type(open_image(tiff_named_png)) is TiffReader
    assert type(open_image(png_named_tiff)) is VipsReader
    np.testing.assert_array_equal(open_image(png_named_tiff).read_level(0), open_image(files["PNG"][0]).read_level(0))


def test_readers_pickle_and_reopen(files):
    for name in ("pyramid as pages, deflate", "PNG"):
        reader = open_image(files[name][0])
        first = reader.read_region(10, 20, 30, 40)
        clone = pickle.loads(pickle.dumps(reader))
        assert clone._handle is None and clone.shape == reader.shape
        np.testing.assert_array_equal(clone.read_region(10, 20, 30, 40), first)
        reader.close()
        np.testing.assert_array_equal(reader.read_region(10, 20, 30, 40), first)    # reopens lazily


def test_errors_name_the_file_and_the_problem(tmp_path, files):
    missing = tmp_path / "nope.tiff"
    with pytest.raises(FileNotFoundError) as error:
        open_image(missing)
    assert_message(error, str(missing), "no such")
    path = files["pyramid as pages, deflate"][0]
    reader = open_image(path)
    with pytest.raises(ValueError) as error:
        reader.read_region(290, 0, 20, 10)
    assert_message(error, str(path), "top=290 left=0 height=20 width=10", "outside", "level-0", "300 x 412")
    with pytest.raises(ValueError) as error:
        reader.read_region(-1, 0, 5, 5, level=1)
    assert_message(error, str(path), "top=-1", "outside", "level-1", "150 x 206")
    with pytest.raises(ValueError) as error:
        reader.read_region(0, 0, 5, 5, level=4)
    assert_message(error, str(path), "level 4", "does not exist", "0..3")

    garbage = tmp_path / "garbage.tiff"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError) as error:
        open_image(garbage)
    # not assert_message: the message carries libvips's own error text, which spans two lines
    assert str(garbage) in str(error.value) and "not an image file" in str(error.value)
    bad_tiff = tmp_path / "bad_header.tiff"
    bad_tiff.write_bytes(b"II*\x00" + b"\xff" * 100)
    with pytest.raises(ValueError) as error:
        open_image(bad_tiff)
    assert_message(error, str(bad_tiff), "not a readable TIFF")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError) as error:
        open_image(empty)
    assert_message(error, str(empty), "empty")
    with pytest.raises(ValueError, match="unknown backend 'gdal'"):
        open_image(path, backend="gdal")


def test_truncated_files_are_reported(tmp_path, files):
    data = files["pyramid as pages, deflate"][0].read_bytes()
    # libvips writes the tile data of a level before its directory: keep the first directory and
    # some tiles, drop the rest of level 0's tiles.
    with tifffile.TiffFile(files["pyramid as pages, deflate"][0]) as tif:
        page = tif.pages[0]
        offsets = sorted(page.dataoffsets)
    truncated = tmp_path / "truncated.tiff"
    truncated.write_bytes(data[: max(offsets[len(offsets) // 2], page.offset + 4000)])
    with pytest.raises(ValueError, match=re.escape(str(truncated))):
        open_image(truncated)
    png = tmp_path / "truncated.png"
    png.write_bytes(files["PNG"][0].read_bytes()[:20000])
    with pytest.raises(ValueError, match=re.escape(str(png))):
        open_image(png).read_level(0)


def test_truncated_tile_data_is_detected_when_the_directory_survives(tmp_path, rgb):
    path = tmp_path / "ifd_first.tiff"
    tifffile.imwrite(path, rgb, tile=(64, 64), compression="zlib", photometric="rgb")
    data = path.read_bytes()
    with tifffile.TiffFile(path) as tif:     # tifffile writes the directory before the tile data
        assert tif.pages[0].offset < min(tif.pages[0].dataoffsets)
    path.write_bytes(data[: len(data) - 500])
    with pytest.raises(ValueError) as error:
        open_image(path)
    assert_message(error, str(path), "truncated", f"{len(data)} bytes")


LAZY_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from streamcnn.io import open_image

    def rss_mb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) / 1024

    path, backend = sys.argv[1], sys.argv[2]
    reader = open_image(path, backend=backend)
    reader.read_region(0, 0, 512, 512)               # first read: imports and caches
    before = rss_mb("VmRSS")
    rng = np.random.default_rng(0)
    total = 0
    for _ in range(40):
        level = int(rng.integers(2))
        _, h, w = reader.level_shapes[level]
        top, left = int(rng.integers(h - 512)), int(rng.integers(w - 512))
        region = reader.read_region(top, left, 512, 512, level=level)
        total += int(region.astype(np.int64).sum())
    print(json.dumps({"growth_mb": rss_mb("VmHWM") - before, "rss_mb": rss_mb("VmRSS"),
                      "shape": reader.shape, "levels": reader.level_count, "checksum": total}))
""")


@pytest.fixture(scope="module")
def big_tiff(tmp_path_factory) -> Path:
    """A 16384^2 greyscale (256 MiB raw) tiled deflate pyramid, mostly constant so it writes fast."""
    path = tmp_path_factory.mktemp("big") / "big.tiff"
    side, tile = 16384, 512
    patterned = np.tile(np.arange(tile, dtype=np.uint8), (tile, 1))

    def tiles(n):
        for i in range(n * n):
            yield patterned if i % 97 == 0 else np.full((tile, tile), i % 251, dtype=np.uint8)

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(side // tile), shape=(side, side), dtype=np.uint8, tile=(tile, tile), compression="zlib")
        tif.write(tiles(side // tile // 2), shape=(side // 2, side // 2), dtype=np.uint8, tile=(tile, tile),
                  compression="zlib", subfiletype=1)
    return path


@pytest.mark.parametrize("backend", ["tiff", "slide"])
def test_reading_regions_of_a_large_pyramid_stays_small(big_tiff, backend):
    if backend == "slide":
        pytest.importorskip("openslide")
    result = subprocess.run([sys.executable, "-c", LAZY_SCRIPT, str(big_tiff), backend],
                            capture_output=True, text=True, check=True)
    stats = json.loads(result.stdout)
    assert stats["shape"] == [1 if backend == "tiff" else 3, 16384, 16384] and stats["levels"] == 2
    # 40 reads of 512^2 regions: peak RSS grows by a few tiles (OpenSlide: plus its 32 MiB tile
    # cache), never by the 256 MiB image (768 MiB as OpenSlide's RGB).
    assert stats["growth_mb"] < {"tiff": 32, "slide": 80}[backend], stats


class _Trunk(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(5, 6, 3, padding=1))


def test_streaming_from_readers_equals_the_tensor(tmp_path, rgb):
    torch.manual_seed(0)
    trunk = _Trunk().double()
    image = np.ascontiguousarray(rgb[:100, :132])
    write_pyramid_tiff(image, tmp_path / "a.tiff", tile=32)
    tifffile.imwrite(tmp_path / "b.ome.tiff", np.moveaxis(image, -1, 0), ome=True, tile=(32, 32),
                     metadata={"axes": "CYX"})
    readers = [open_image(tmp_path / "a.tiff"), open_image(tmp_path / "b.ome.tiff")]
    tensor = torch.from_numpy(np.stack([np.moveaxis(image, -1, 0)] * 2)).double() / 255

    def run(x, tile):
        trunk.zero_grad()
        out = StreamingModule(trunk, tile)(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), [p.grad.clone() for p in trunk.parameters()]

    reference, reference_grads = run(tensor, None)
    out, grads = run(readers, 32)
    assert len(StreamingModule(trunk, 32).plan((100, 132)).tiles) > 4
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, reference_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    single, _ = run(readers[0], 64)
    torch.testing.assert_close(single, reference[:1], rtol=1e-12, atol=1e-12)
