"""The process's resident memory (RSS): its size now and its peak so far, in bytes.

The peak is ``getrusage``'s ``ru_maxrss``, a high-water mark over the whole life of the process (so
it never decreases); the kernel reports it in KiB on Linux and in bytes on macOS.
"""
from __future__ import annotations

import resource
import sys

__all__ = ["current_rss_bytes", "peak_rss_bytes"]


def peak_rss_bytes() -> int:
    """The largest resident set this process has had, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """The resident set now, in bytes (from ``/proc/self/status``; 0 where there is no ``/proc``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
