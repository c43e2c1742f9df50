"""Argument checks the command-line tools run before importing torch (so errors come in < 1 s).

Importing ``streamcnn`` imports torch (seconds); these checks do not. The config schema
(:mod:`streamcnn.training.config`, pydantic + YAML only) is loaded from its file without
running the package's ``__init__``, so a bad key or value is reported just as fast.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Callable

_SIZE = re.compile(r"^\s*\d+(\.\d*)?\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def config_module():
    """``streamcnn.training.config``, loaded without importing torch."""
    spec = importlib.util.find_spec("streamcnn")
    path = Path(spec.origin).parent / "training" / "config.py"
    loaded = importlib.util.spec_from_file_location("_streamcnn_config_preflight", path)
    module = importlib.util.module_from_spec(loaded)
    sys.modules[loaded.name] = module     # pydantic resolves annotations through sys.modules
    loaded.loader.exec_module(module)
    return module


def check_budget(budget: str | None) -> None:
    if budget is not None and not _SIZE.match(budget):
        raise ValueError(f"--budget {budget!r} is not a memory size: write a number and a unit, e.g. 11GB or 24GiB")


def check_exists(path: str | None, what: str, hint: str = "") -> None:
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"{what} {path} does not exist" + (f" ({hint})" if hint else ""))


def check_run_args(checkpoint: str, data: str, budget: str | None) -> None:
    """What evaluating and predicting check first: the checkpoint and the data exist, the budget is a size."""
    check_exists(checkpoint, "checkpoint")
    check_exists(data, "data", "a folder with manifest.csv, a folder of images, or a CSV table")
    check_budget(budget)


def one_line_errors(tool: str, body: Callable[[], int]) -> int:
    """Run a tool's body; a bad argument, file, config or budget (``BudgetError`` is a ``ValueError``)
    ends as one line on stderr and exit status 1, never a traceback."""
    try:
        return body()
    except (FileNotFoundError, ValueError) as error:
        print(f"{tool}: error: {error}", file=sys.stderr)
        return 1
