"""Benchmark: how exactly streamed gradients equal full-image gradients (float64).

    python benchmarks/bench_exactness.py            # ResNet-18 and ResNet-50 trunks, 331 x 517, batch 2

For each trunk and tile size: the largest relative error (max |a - b| / max |a|) over the
feature map, every parameter's gradient and the input gradient, streamed vs conventional
autograd on the whole image. BatchNorm is frozen with random running statistics. Prints a
table and writes ``benchmarks/results/exactness.json``.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torchvision
from common import environment, markdown_table, randomise_batchnorm, write_json

import streamcnn


def trunk(arch: str) -> nn.Module:
    torch.manual_seed(0)
    r = getattr(torchvision.models, arch)(weights=None)
    body = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4).double()
    return streamcnn.freeze_batchnorm(randomise_batchnorm(body))


def gradients(model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, weight: torch.Tensor):
    for p in params:
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    features = model(x)
    (features * weight).sum().backward()
    return [features.detach(), x.grad, *(p.grad for p in params)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=(331, 517))
    parser.add_argument("--tiles", type=int, nargs="+", default=(64, 96, 160))
    args = parser.parse_args()
    env = environment("cpu")
    x = torch.randn(2, 3, *args.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = []
    for arch in ("resnet18", "resnet50"):
        body = trunk(arch)
        params = list(body.parameters())
        weight = torch.randn(body(x[:1]).shape[1:], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        reference = gradients(body, params, x, weight)
        for tile in args.tiles:
            streamed = streamcnn.StreamingModule(body, tile)
            start = time.perf_counter()
            result = gradients(streamed, params, x, weight)
            errors = [relative(a, b) for a, b in zip(reference, result)]
            plan = streamed.plan(args.size)
            rows.append({"trunk": arch, "tile": tile, "tiles": len(plan.tiles), "overlap": plan.overlap_factor,
                         "features": errors[0], "input_grad": errors[1], "param_grads_max": max(errors[2:]),
                         "seconds": time.perf_counter() - start})
    print(f"float64, batch 2, {args.size[0]} x {args.size[1]}, relative error streamed vs full image\n")
    print(markdown_table(rows, [("trunk", "trunk"), ("tile", "tile"), ("tiles", "tiles"), ("overlap", "overlap"),
                                ("features", "features"), ("input_grad", "input grad"),
                                ("param_grads_max", "worst parameter grad")]))
    path = write_json("exactness.json", {"environment": env, "image": list(args.size), "batch": 2, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
