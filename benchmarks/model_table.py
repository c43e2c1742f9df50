"""Which torchvision/timm families stream exactly, and at what cost.

    python benchmarks/model_table.py [--image-size 4000] [--tile 1024] [--models NAME ...]

For each trunk name (built on the meta device: nothing is computed or downloaded) it
reports whether the trunk streams exactly or the refusal (layer, reason, fix), the total
stride, the halo (input pixels a tile reads beyond its own area on one side, for tiles
not clamped at the image border), the tile overlap factor for a square image of
``--image-size`` px in ``--tile`` px tiles, and the predicted relative cost of a streamed
training step against a conventional one (the planner's cost model: FLOPs times the
recomputation and the overlap; ``pool`` head). Prints a markdown table, writes JSON
(machine, versions, date, load) to ``benchmarks/results/model_table.json`` and a PNG of the
costs to ``benchmarks/results/model_table.png``.
"""
from __future__ import annotations

import argparse
import time

import common
import torch

import streamcnn
from streamcnn.utils.files import pyplot, save_figure
from streamcnn.models.classifier import build_model

MODELS = (
    "resnet18", "resnet50", "torchvision:resnext50_32x4d", "torchvision:wide_resnet50_2", "torchvision:vgg16_bn",
    "torchvision:densenet121", "torchvision:mobilenet_v2", "torchvision:regnet_x_400mf",
    "torchvision:squeezenet1_1", "torchvision:shufflenet_v2_x1_0", "torchvision:convnext_tiny",
    "torchvision:efficientnet_b0", "torchvision:mobilenet_v3_large", "torchvision:regnet_y_400mf",
    "timm:resnet50d", "timm:convnext_atto", "timm:convnext_tiny", "timm:efficientnet_b0", "timm:seresnet50",
    "timm:convnextv2_atto",
)


def halo(plan: streamcnn.TilePlan) -> int:
    """The most input pixels any tile reads beyond its own area on one unclamped side."""
    most = 0
    for tile in plan.tiles:
        for ax in range(2):
            (w0, w1), (r0, r1), n = tile.window[ax], tile.region[ax], plan.image_size[ax]
            if w0 > 0:
                most = max(most, r0 * plan.stride[ax] - w0)
            if w1 < n:
                most = max(most, w1 - r1 * plan.stride[ax])
    return most


def row(name: str, image: int, tile: int) -> dict:
    with torch.device("meta"):
        model = build_model(name, "pool", num_classes=2, in_channels=3)
    out = {"model": name, "params_m": round(sum(p.numel() for p in model.trunk.parameters()) / 1e6, 2)}
    try:
        geometry = model.trunk.geometry
    except streamcnn.UnsupportedLayerError as err:
        return {**out, "streams": False, "refused": str(err)}
    tiles = streamcnn.tile_plan(geometry, image, tile)
    report = streamcnn.plan(model, image, "100TB", tile_sizes=[tile], device="cuda")
    stream = next(c for c in report.candidates if c.mode == "stream" and not c.offload)
    return {**out, "streams": True, "refused": None, "stride": geometry.output_stride[0], "halo_px": halo(tiles),
            "tiles": len(tiles.tiles), "overlap": round(tiles.overlap_factor, 3),
            "relative_cost": round(stream.relative_cost, 3),
            "trunk_forward_tflops": round(report.flops.trunk_forward / 1e12, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=4000)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    env = common.environment()
    started = time.perf_counter()
    rows = [row(name, args.image_size, args.tile) for name in args.models]
    table = [{**r, "refused": None if r["streams"] else r["refused"].split(". Fix:")[0]} for r in rows]
    print(common.markdown_table(table, [
        ("model", "trunk"), ("streams", "streams exactly"), ("refused", "refused at (reason)"), ("stride", "stride"),
        ("halo_px", "halo px"), ("overlap", f"overlap ({args.image_size}² / {args.tile} px)"),
        ("relative_cost", "rel. cost"), ("params_m", "params (M)")]))
    common.write_json("model_table.json", {**env, "image_size": args.image_size, "tile_size": args.tile,
                                           "seconds": round(time.perf_counter() - started, 1), "rows": rows})
    ok = [r for r in rows if r["streams"]]
    fig, ax = pyplot().subplots(figsize=(8, 0.35 * len(ok) + 1.2))
    ax.barh([r["model"] for r in ok], [r["relative_cost"] for r in ok], color="tab:blue")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set(xlabel=f"predicted streamed step cost / conventional ({args.image_size}² px, {args.tile} px tiles)")
    ax.invert_yaxis()
    fig.tight_layout()
    save_figure(fig, common.RESULTS / "model_table.png")


if __name__ == "__main__":
    main()
