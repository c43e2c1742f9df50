"""One function over many files in worker processes, in order, with a progress bar.

Generating a data set, checking its headers and reading small images into memory each
touch thousands of files with Python-heavy work (a 128 px TIFF takes about 1 ms to open and
decode), so they run on every core. Workers are forked where that is safe (Linux, and libvips
not loaded here: its thread pool does not survive a fork), and spawned elsewhere; a spawned
worker imports torch and streamcnn (seconds), so work shorter than that stays in this process
(:func:`worker_count`).
"""
from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from streamcnn.utils.cpu import usable_cores

__all__ = ["worker_count", "process_map", "START_SECONDS"]

T = TypeVar("T")
R = TypeVar("R")

#: Seconds a worker takes to start: forked, or spawned (importing torch and streamcnn; 2-core AMD EPYC).
START_SECONDS = {"fork": 0.2, "spawn": 3.0}


def _start_method() -> str:
    return "fork" if sys.platform == "linux" and "pyvips" not in sys.modules else "spawn"


def worker_count(items: int, seconds_each: float) -> int:
    """Processes for ``items`` of about ``seconds_each`` of work each: every core this process
    may use, but only as many as the work repays (each worker's share longer than its start).
    Spawned workers re-import the main script, so a program read from stdin then works here."""
    method = _start_method()
    main = getattr(sys.modules["__main__"], "__file__", None)
    if method == "spawn" and main is not None and not Path(main).is_file():
        return 1
    cores = usable_cores()
    return max(1, min(cores, int(items * seconds_each / START_SECONDS[method])))


def process_map(fn: Callable[[T], R], items: Sequence[T], workers: int, *, desc: str, progress: bool = True,
                chunksize: int = 16, unit: str = "file") -> list[R]:
    """``[fn(item) for item in items]``, on ``workers`` processes when more than one (``fn``
    and the items must pickle), with a tqdm bar unless ``progress`` is false."""
    from tqdm.auto import tqdm

    results: list[R] = []
    with tqdm(total=len(items), desc=desc, unit=unit, disable=not progress) as bar:
        if workers <= 1:
            for item in items:
                results.append(fn(item))
                bar.update()
            return results
        with ProcessPoolExecutor(workers, mp_context=get_context(_start_method())) as pool:
            for result in pool.map(fn, items, chunksize=chunksize):
                results.append(result)
                bar.update()
    return results
