"""Train/val/test splits of a slide table: its own ``split`` or ``fold`` column, or a seeded split.

:func:`table_splits` gives each image of a table ``train``, ``val`` or ``test``: the table's
``split`` column when it has one, else its ``fold`` column (the fold asked for is validated
on, the others trained on), else :func:`grouped_stratified_split`, which keeps every
patient's images on one side (no patient leaks from training into validation) and gives
each class about the same share on each side, the same for the same seed.
:func:`write_split_csv` records the outcome (``split.csv`` in a run folder: one row per image).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from streamcnn.utils.files import atomic_write_text

__all__ = ["grouped_stratified_split", "table_splits", "write_split_csv"]


def grouped_stratified_split(labels: Sequence[int], groups: Sequence[str | None], *, val: float = 0.2,
                             test: float = 0.0, seed: int = 0) -> list[str]:
    """``train``/``val``/``test`` per image; images of one group (patient; None: the image alone)
    share a side. A group counts for its most common label; per label, ``round(n * val)`` of its
    ``n`` groups (shuffled by ``seed``) are validated and ``round(n * test)`` tested, and at least
    one group is trained on; with ``val > 0`` at least one group is validated."""
    keys = [g if g is not None else f"\0image {i}" for i, g in enumerate(groups)]
    members: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    by_label: dict[int, list[str]] = {}
    for key, images in members.items():
        counts = Counter(labels[i] for i in images)
        label = min(counts, key=lambda lab: (-counts[lab], lab))
        by_label.setdefault(label, []).append(key)
    rng = np.random.default_rng(seed)
    side: dict[str, str] = {}
    for label in sorted(by_label):
        keys_of = sorted(by_label[label])
        keys_of = [keys_of[j] for j in rng.permutation(len(keys_of))]
        n = len(keys_of)
        n_val = min(round(n * val), n - 1)
        n_test = min(round(n * test), n - 1 - n_val)
        for j, key in enumerate(keys_of):
            side[key] = "val" if j < n_val else "test" if j < n_val + n_test else "train"
    if val > 0 and "val" not in side.values():     # few groups: validate on one of the largest class's
        largest = max(sorted(by_label), key=lambda lab: len(by_label[lab]))
        trained = [key for key in sorted(by_label[largest]) if side[key] == "train"]
        if len(trained) > 1:
            side[trained[int(rng.integers(len(trained)))]] = "val"
    return [side[key] for key in keys]


def table_splits(source: Path | str, splits: Sequence[str | None], folds: Sequence[int | None],
                 labels: Sequence[int], patients: Sequence[str | None], *, fold: int | None = None,
                 val: float = 0.2, test: float = 0.0, seed: int = 0) -> tuple[list[str], str]:
    """(``train``/``val``/``test`` per image, how it was chosen) for a table's columns (see the
    module docstring); ``source`` names the table in errors."""
    if any(s is not None for s in splits):
        missing = [i for i, s in enumerate(splits) if s is None]
        if missing:
            raise ValueError(f"{source}: {len(missing)} row(s) have no value in the split column (the first is "
                             f"row {missing[0] + 1}): give every row train, val or test, or drop the column")
        return list(splits), "the table's split column"   # type: ignore[arg-type]
    if any(f is not None for f in folds):
        if any(f is None for f in folds):
            raise ValueError(f"{source}: some rows have no value in the fold column: give every row its fold")
        chosen = min(f for f in folds if f is not None) if fold is None else fold
        if chosen not in folds:
            raise ValueError(f"{source}: data.fold={chosen} is not in the fold column (folds "
                             f"{sorted(set(folds))})")    # type: ignore[type-var]
        return ["val" if f == chosen else "train" for f in folds], f"fold {chosen} of the table's fold column"
    sides = grouped_stratified_split(labels, patients, val=val, test=test, seed=seed)
    grouped = "grouped by patient, " if any(p is not None for p in patients) else ""
    return sides, f"a split {grouped}stratified by label, seed {seed} (val {val:g}, test {test:g})"


def write_split_csv(path: str | Path, ids: Sequence[str], sides: Sequence[str]) -> Path:
    """``split.csv``: ``id,split``, one row per image, ids as written in the table."""
    def quoted(text: str) -> str:
        return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n') else text
    return atomic_write_text(path, "id,split\n" + "".join(f"{quoted(i)},{s}\n" for i, s in zip(ids, sides)))
