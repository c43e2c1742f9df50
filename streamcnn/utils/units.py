"""Units and conversions used across the library: memory sizes, training dtypes, pixel
values and (height, width) pairs. Nothing here knows about models or plans."""
from __future__ import annotations

import re
from typing import Sequence

import torch

__all__ = ["parse_size", "format_size", "resolve_dtype", "pixels_to_unit"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(size: str | int | float) -> int:
    """Bytes in ``size``: ``"11GB"`` = 11 * 10**9, ``"11GiB"`` = 11 * 2**30, ``"512MB"``,
    ``"11 GB"``, ``"1.5GiB"`` or a plain number of bytes. Units are case-insensitive."""
    if isinstance(size, bool):
        raise ValueError(f"not a memory size: {size!r}")
    if isinstance(size, (int, float)):
        if size <= 0:
            raise ValueError(f"a memory size must be positive, got {size!r}")
        return int(size)
    match = _SIZE.match(str(size))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"not a memory size: {size!r}; write a number and a unit, e.g. '11GB' (11 * 10^9 bytes), "
            "'11GiB' (11 * 2^30 bytes), '512MB', '800MiB', or a number of bytes")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {size!r}")
    return value


def format_size(n: int | float) -> str:
    """``n`` bytes in decimal units, as people write budgets: ``format_size(11e9) == '11.00 GB'``."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{sign}{n / scale:.2f} {unit}"
    return f"{sign}{int(n)} B"


_DTYPES = {"fp32": None, "float32": None, "32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype for ``dtype`` ("fp32"/None: no autocast, "bf16", "fp16")."""
    if dtype is None or dtype == torch.float32:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
    elif str(dtype).lower() in _DTYPES:
        return _DTYPES[str(dtype).lower()]
    raise ValueError(f"unsupported training dtype {dtype!r}; choose fp32, bf16 or fp16")


def pixels_to_unit(pixels: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Integer pixels as floats in [0, 1] (divided by the integer type's maximum, like
    torchvision's ``to_tensor``); float pixels are taken as already in [0, 1] and only cast.
    ``dtype``: the result's; None keeps a float tensor's dtype and gives float32 for integers."""
    if pixels.is_floating_point():
        return pixels if dtype is None else pixels.to(dtype)
    return pixels.to(dtype or torch.float32) / float(torch.iinfo(pixels.dtype).max)


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """``(value, value)`` for an int, else the first two entries as ints: a (height, width)."""
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])
