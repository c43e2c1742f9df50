"""Print the UltraMNIST generator's statistics next to the reference figures of the spec.

Computed from layouts alone (no pixels), so 28,000 images take about half a minute::

    python tools/ultramnist_stats.py --count 28000            # the table in docs/data.md
    python tools/ultramnist_stats.py --count 2000 --size 512  # a scaled canvas

Sizes are in pixels of the canvas; the "share with a digit <= t px" thresholds scale with
the canvas (t * size / 4000). ``--json FILE`` also writes the numbers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from streamcnn.data import layout_statistics

#: The reference generator's figures (docs: ../shared/ultramnist-spec.md, at 4000 px).
REFERENCE = {
    "digit side 10%": 84, "digit side 25%": 168, "digit side 50% (median)": 420,
    "digit side 75%": 952, "digit side 90%": 1820, "digit side mean": 670,
    "images with a digit <= 14 px": 0.10, "images with a digit <= 28 px": 0.19,
    "images with a digit <= 56 px": 0.36, "images with a digit <= 112 px": 0.60,
    "3 digits": 0.158, "4 digits": 0.301, "5 digits": 0.541, "mean digit count": 4.38,
}


def rows(stats: dict) -> dict:
    q, share, counts = stats["digit_side_quantiles"], stats["share_with_digit_at_most"], stats["digit_count_share"]
    return {
        "digit side 10%": q["10%"], "digit side 25%": q["25%"], "digit side 50% (median)": q["50%"],
        "digit side 75%": q["75%"], "digit side 90%": q["90%"], "digit side mean": stats["digit_side_mean"],
        "images with a digit <= 14 px": share["14px"], "images with a digit <= 28 px": share["28px"],
        "images with a digit <= 56 px": share["56px"], "images with a digit <= 112 px": share["112px"],
        "3 digits": counts["3"], "4 digits": counts["4"], "5 digits": counts["5"],
        "mean digit count": stats["digit_count_mean"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=28000)
    parser.add_argument("--size", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=["train", "test"], default="train")
    parser.add_argument("--json", type=Path, default=None, help="also write the statistics as JSON")
    args = parser.parse_args(argv)
    stats = layout_statistics(args.count, size=args.size, seed=args.seed, split=args.split, progress=True)
    reference = args.size == 4000
    print(f"| statistic ({args.count} images, {args.size} px, seed {args.seed}, {args.split}) | streamcnn |"
          + (" reference (spec) |" if reference else ""))
    print("|---|---|" + ("---|" if reference else ""))
    for name, value in rows(stats).items():
        fmt = (lambda v: f"{v:.1%}") if isinstance(REFERENCE[name], float) and REFERENCE[name] < 1 else (lambda v: f"{v:.0f}")
        if name == "mean digit count":
            fmt = lambda v: f"{v:.2f}"  # noqa: E731
        print(f"| {name} | {fmt(value)} |" + (f" {fmt(REFERENCE[name])} |" if reference else ""))
    print(f"digit values 0..9: {stats['digit_value_counts']}")
    if args.json:
        args.json.write_text(json.dumps(stats, indent=2) + "\n")


if __name__ == "__main__":
    main()
