"""The process's resident memory, as the trainer's metrics and the benchmarks read it."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from streamcnn.utils.rss import current_rss_bytes, peak_rss_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_touched_memory_shows_in_the_current_and_the_peak_rss():
    before, peak_before = current_rss_bytes(), peak_rss_bytes()
    assert 0 < before <= peak_before + 2**20     # the kernel updates the high-water mark lazily
    block = np.ones(256 * 2**20, dtype=np.uint8)     # 256 MiB, every page written
    grown = current_rss_bytes() - before
    assert grown >= 200 * 2**20
    assert peak_rss_bytes() >= before + grown - 2**20
    del block
    assert peak_rss_bytes() >= before + grown - 2**20    # a high-water mark: it does not come back down
