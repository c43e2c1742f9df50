"""The global mean + max pool: autograd's gradient, in one feature-map-sized tensor."""
import torch

from streamcnn.engine import pooling
from streamcnn.planning.tracking import LiveStorageTracker


def _reference(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def test_gradient_equals_autograd_with_ties_and_chunks(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 9, dtype=torch.float64)
    x[0, 0, 1, 1] = x[1, 3, 4, 4] = 10.0      # ties: the max's gradient is split evenly
    x[0, 0, 2, 5] = x[1, 3, 0, 8] = 10.0
    g = torch.randn(2, 10, dtype=torch.float64)
    monkeypatch.setattr(pooling, "_CHUNK_ELEMENTS", 2 * 7 * 9 * 2)   # chunks of 2 channels, last one short
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    _reference(a).backward(g)
    out = pooling.global_mean_max(b)
    out.backward(g)
    assert torch.equal(out, _reference(x))
    assert torch.equal(a.grad, b.grad)
    assert b.grad[0, 0, 1, 1] == b.grad[0, 0, 2, 5] != b.grad[0, 0, 0, 0]


def test_backward_holds_one_gradient_the_size_of_the_input():
    x = torch.randn(1, 64, 128, 128, requires_grad=True)
    size = x.numel() * x.element_size()
    out = pooling.global_mean_max(x)
    grad = torch.ones_like(out)
    with LiveStorageTracker("cpu") as tracker:
        out.backward(grad)
    # x.grad and the chunked temporaries (16 MiB elements of 4 bytes at most each)
    assert size <= tracker.peak < size + 3 * 4 * pooling._CHUNK_ELEMENTS
    with LiveStorageTracker("cpu") as reference:
        y = x.detach().requires_grad_()
        _reference(y).backward(grad)
    assert reference.peak >= 2 * size      # what autograd's own backward holds at once
