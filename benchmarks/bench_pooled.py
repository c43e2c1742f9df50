"""Benchmark: a pool-head step with the trunk pooling tile by tile vs holding the feature map.

    OMP_NUM_THREADS=1 python benchmarks/bench_pooled.py            # tiny-cnn, 2048 and 4096 px, tiles of 256
    OMP_NUM_THREADS=1 python benchmarks/bench_pooled.py --trunk resnet18 --sizes 1024 --tile 512

For each image size, one training step of a pool-head classifier (float32, CPU) on a
uint8 image read a window at a time (as a slide is), streamed with tiles of ``--tile`` px,
twice: the trunk returning its feature map to the
head's global pooling (``pool=None``), and the trunk pooling tile by tile
(``pool="meanmax"``). Columns: the feature map's elements, the largest tensor any op made
and the peak of live tensor bytes during the step (both counted by
:class:`streamcnn.planning.tracking.LiveStorageTracker`), and the largest relative
difference between the two modes' parameter gradients. Prints a table and writes
``benchmarks/results/pooled_cpu.json`` (``pooled_cpu-<trunk>.json`` for another trunk).
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from common import environment, markdown_table, write_json

from streamcnn.models.classifier import build_model
from streamcnn.planning.tracking import LiveStorageTracker


class ArrayImage:
    """A region source over a (C, H, W) uint8 array: the engine reads one window at a time."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape = array, array.shape

    def read_region(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        return self.array[:, top:top + height, left:left + width]


def step(model, x: ArrayImage, y: torch.Tensor) -> tuple[LiveStorageTracker, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with LiveStorageTracker("cpu") as tracker:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return tracker, [p.grad.clone() for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trunk", default="tiny-cnn")
    parser.add_argument("--sizes", type=int, nargs="+", default=(2048, 4096))
    parser.add_argument("--tile", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.trunk, "pool", num_classes=2, in_channels=3, tile_size=args.tile)
    channels = model.head[-1].in_features // 2
    rows = []
    for size in args.sizes:
        x = ArrayImage(np.random.default_rng(size).integers(0, 256, size=(3, size, size), dtype=np.uint8))
        y = torch.tensor([1])
        results = {}
        for pool in (None, "meanmax"):
            model.trunk.pool = pool
            results[pool] = step(model, x, y)
        (map_tracker, map_grads), (pool_tracker, pool_grads) = results[None], results["meanmax"]
        diff = max(((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item() for a, b in zip(map_grads, pool_grads))
        map_elements = channels * math.prod(model.trunk.geometry.output_size((size, size)))
        rows.append({"trunk": args.trunk, "size": size, "tile": args.tile, "map_elements": map_elements,
                     "largest_elements_map": map_tracker.largest_elements,
                     "largest_elements_pooled": pool_tracker.largest_elements,
                     "peak_mib_map": map_tracker.peak / 2**20, "peak_mib_pooled": pool_tracker.peak / 2**20,
                     "grad_rel_diff": diff})
    print(markdown_table(rows, [("trunk", "trunk"), ("size", "image px"), ("tile", "tile px"), ("map_elements", "map elements"),
                                ("largest_elements_map", "largest tensor (map)"),
                                ("largest_elements_pooled", "largest tensor (pooled)"),
                                ("peak_mib_map", "peak MiB (map)"), ("peak_mib_pooled", "peak MiB (pooled)"),
                                ("grad_rel_diff", "max rel. grad difference")]))
    name = "pooled_cpu.json" if args.trunk == "tiny-cnn" else f"pooled_cpu-{args.trunk}.json"
    print(f"wrote {write_json(name, {'environment': environment('cpu'), 'rows': rows})}")


if __name__ == "__main__":
    main()
