#!/usr/bin/env python
"""Write a folder of generated RGB slides (pyramidal TIFFs with mpp) and a slide table.

    python tools/make_demo_slides.py --out demo/slides --count 12 --min-size 1024 --max-size 3072

Sizes are drawn between ``--min-size`` and ``--max-size`` px per side (mixed aspect ratios);
``slides.csv`` lists ``case_id,slide_id,label`` with the class names ``normal``/``tumor``.
See docs/pathology.md.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the slides and slides.csv to")
    parser.add_argument("--count", type=int, default=12, help="number of slides (default 12)")
    parser.add_argument("--min-size", type=int, default=1024, help="smallest side in px (default 1024)")
    parser.add_argument("--max-size", type=int, default=3072, help="largest side in px (default 3072)")
    parser.add_argument("--mpp", type=float, default=0.25, help="microns per pixel of level 0 (default 0.25, '40x')")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 64 <= args.min_size <= args.max_size:
        print("make_demo_slides.py: error: need 64 <= --min-size <= --max-size", file=sys.stderr)
        return 1
    import numpy as np

    from streamcnn.data.demo_slides import generate_demo_slides

    rng = np.random.default_rng(args.seed)
    sizes = [tuple(int(v) for v in rng.integers(args.min_size, args.max_size + 1, 2) // 16 * 16)
             for _ in range(args.count)]
    levels = max(1, int(np.log2(args.max_size / 256)) + 1)
    table = generate_demo_slides(args.out, sizes, mpp=args.mpp, levels=levels, period=24, tile=256)
    print(f"wrote {args.count} slides ({levels} levels, {args.mpp} mpp) and {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
