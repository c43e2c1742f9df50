"""Atomic training checkpoints and the random-number state that makes resume exact.

A checkpoint holds everything a run needs to continue as if it had never stopped:
model, optimizer, scheduler and gradient-scaler state, every random generator
(Python, NumPy, torch CPU and CUDA), the epoch and step counters, the metrics
history and the config. :func:`save_checkpoint` writes to a temporary file in the
same directory and renames it over the target, so a run killed at any instant
leaves either the previous complete checkpoint or the new one, never half a file.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamcnn.utils.files import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "seed_everything"]


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save(state)`` to ``path`` atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
    return atomic_write(path, write)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, with a clear error if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # The checkpoint holds our own config/history dicts and RNG states: trusted input.
    return torch.load(path, map_location=map_location, weights_only=False)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every random generator's state, to be restored by :func:`set_rng_state`."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
