"""Atomic training checkpoints, reading them back on any device, and the random state that makes resume exact.

A checkpoint holds everything a run needs to continue as if it had never stopped:
model, optimizer, scheduler and gradient-scaler state, every random generator
(Python, NumPy, torch CPU and CUDA), the epoch and step counters, the metrics
history and the config. :func:`save_checkpoint` writes to a temporary file in the
same directory and renames it over the target, so a run killed at any instant
leaves either the previous complete checkpoint or the new one, never half a file.

Checkpoints are always read into host memory (:func:`load_checkpoint`): ``load_state_dict``
copies weights and optimizer state onto the model's device, and the random-generator states
must stay CPU ``ByteTensor``s (``torch.set_rng_state`` rejects any other). A file that cannot
be read (truncated by a full disk, copied half-way, not a checkpoint) is a
:class:`CheckpointError` naming the file; :func:`load_newest_readable` falls back to the
newest checkpoint of a run that still reads.
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from streamcnn.utils.files import atomic_write

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_newest_readable", "checkpoint_candidates",
           "rng_state", "set_rng_state", "seed_everything"]

#: the checkpoints a run folder holds, in the order they are tried when equally new
RUN_CHECKPOINTS = ("last.pt", "best.pt")


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be read; the message names the file and says why."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save(state)`` to ``path`` atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
    return atomic_write(path, write)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, in host memory (whatever device wrote it).

    Raises FileNotFoundError when ``path`` does not exist and :class:`CheckpointError` (one line:
    the file, "truncated or corrupt", the fix) when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # The checkpoint holds our own config/history dicts and RNG states: trusted input.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as error:
        reason = str(error).splitlines()[0].split(". ")[0][:160] if str(error) else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason}): delete it, or resume "
                              "from another checkpoint of the run") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: it holds a {type(state).__name__}, not a "
                              "checkpoint's dict")
    return state


def checkpoint_candidates(run: str | Path) -> list[Path]:
    """The checkpoints to try for ``run``, in order: a file first, then the other checkpoints of its
    folder; for a run folder its ``last.pt`` and ``best.pt``, newest first."""
    run = Path(run)
    folder = run if run.is_dir() else run.parent
    found = [folder / name for name in RUN_CHECKPOINTS if (folder / name).is_file()]
    found.sort(key=lambda p: -p.stat().st_mtime_ns)      # stable: last.pt first when equally new
    return found if run.is_dir() else [run] + [p for p in found if p != run]


def load_newest_readable(run: str | Path, *, say: Callable[[str], Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """(path, state) of the first checkpoint of :func:`checkpoint_candidates` that reads.

    ``run`` is a checkpoint file or a run folder. An unreadable checkpoint is passed over for the
    next, and ``say`` (e.g. ``print``) is told in one line which file did not read and which one is
    used. Raises the first file's :class:`CheckpointError` when none reads, FileNotFoundError when
    there is nothing to read."""
    run = Path(run)
    if not run.exists():
        raise FileNotFoundError(f"checkpoint {run} does not exist")
    candidates = checkpoint_candidates(run)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint in {run} (expected {' or '.join(RUN_CHECKPOINTS)})")
    failures: list[CheckpointError] = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except CheckpointError as error:
            failures.append(error)
            continue
        if failures and say is not None:
            say(f"{failures[0]}; using {path} instead, the newest checkpoint of the run that reads")
        return path, state
    raise failures[0]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every random generator's state (host tensors), to be restored by :func:`set_rng_state`."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s generators. Saved CUDA generators are restored for the GPUs both
    runs see (the first ``min(saved, visible)``); GPUs beyond them keep their seeded state."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(_host_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_host_bytes(cuda_state), index)


def _host_bytes(state: torch.Tensor) -> torch.Tensor:
    return state.to(device="cpu", dtype=torch.uint8)
