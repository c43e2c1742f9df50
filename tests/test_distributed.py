"""StreamingModule under DistributedDataParallel: 2 gloo processes equal one process."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import streamcnn
from helpers import randomise_batchnorm


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1),
    ).double()
    randomise_batchnorm(net)
    return streamcnn.freeze_batchnorm(net)


def _batch() -> torch.Tensor:
    return torch.randn(4, 3, 70, 90, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _loss(features: torch.Tensor) -> torch.Tensor:
    return (features * torch.linspace(-1, 1, features.shape[-1], dtype=features.dtype)).square().mean()


def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        net = _net()
        model = nn.parallel.DistributedDataParallel(streamcnn.StreamingModule(net, 16))
        x = _batch().chunk(world)[rank]
        for _ in range(2):  # a second step checks DDP's per-iteration bookkeeping
            model.zero_grad()
            _loss(model(x)).backward()
        if rank == 0:
            torch.save([p.grad for p in net.parameters()], out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_single_process(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    net = _net()
    _loss(net(_batch())).backward()
    ddp_grads = torch.load(out)
    for p, g in zip(net.parameters(), ddp_grads):
        assert torch.allclose(p.grad, g, rtol=1e-10, atol=1e-14)
