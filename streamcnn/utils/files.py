"""Writing files so that an interrupted run never leaves a half-written one.

Everything streamcnn writes (images, manifests, checkpoints, reports, plots, benchmark
results) goes through :func:`atomic_write`: the content is written to a hidden temporary
name in the same folder and renamed over the target, so a file either is complete or
does not exist. Temporary names match :data:`TEMPORARY_GLOB`, so a resumed run can
delete what an interrupted one left behind.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable

__all__ = ["TEMPORARY_GLOB", "atomic_write", "atomic_write_text", "pyplot", "save_figure"]

TEMPORARY_GLOB = ".*.tmp-*"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` for a temporary path beside ``path``, then rename it to ``path``.

    The temporary file is removed if ``write`` fails. ``write`` creates the file itself,
    so its permissions follow the umask like any other file's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), for figures saved by :func:`save_figure`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Save a matplotlib figure atomically (format from the suffix, default PNG) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png",
                                                           **savefig_kwargs))
    finally:
        plt.close(fig)
