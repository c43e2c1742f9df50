"""Generate UltraMNIST images as tiled pyramidal BigTIFFs plus a manifest.csv.

Example (the benchmark's training split at full size, on 2 cores)::

    python tools/generate_ultramnist.py --out data/ultramnist/train --count 28000 --split train --workers 2
    python tools/generate_ultramnist.py --out data/ultramnist/test --count 28000 --split test --workers 2

Image i depends only on (seed, split, i); an interrupted run resumes where it stopped.
See docs/data.md for the rules, the scaled-canvas rule and the output format.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from streamcnn.data import generate_ultramnist


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (manifest.csv, images/)")
    parser.add_argument("--count", type=int, required=True, help="number of images")
    parser.add_argument("--size", type=int, default=4000, help="canvas side in px (default 4000, the benchmark's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=["train", "test"], default="train",
                        help="digit instances of the two splits are disjoint")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--mnist", type=Path, default=None,
                        help="folder with the MNIST IDX files (default: the packaged 10,000-digit bank)")
    parser.add_argument("--preview", type=Path, default=None, help="write a PNG contact sheet of the first images")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    manifest = generate_ultramnist(args.out, args.count, size=args.size, seed=args.seed, split=args.split,
                                   workers=args.workers, mnist_dir=args.mnist, preview=args.preview,
                                   progress=not args.no_progress)
    print(f"wrote {manifest}" + (f" and {args.preview}" if args.preview else ""))


if __name__ == "__main__":
    main()
