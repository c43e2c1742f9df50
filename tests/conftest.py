"""Fixtures shared by the test modules."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one CPU thread.

    For tiny real CPU steps: with two OpenMP threads on a busy 2-core machine every op waits at
    a barrier (measured: ResNet-18 forward at 192 px 0.9 s vs 0.04 s on one thread).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
