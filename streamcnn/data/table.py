"""Slide tables: the CSV conventions pathology users already have, read into paths and labels.

A table has a ``path`` column (relative to the data folder, or absolute) or a ``slide_id``
column (a file name in the data folder, extension optional: ``slide_id=A1`` finds
``A1.svs``, ``A1.tiff``, ...), optionally ``patient`` (or CLAM's ``case_id``: the group a
train/val/test split keeps together), ``split`` (``train``, ``val`` or ``test``) or
``fold`` (an integer, for k-fold runs), an optional ``mask`` column (a tissue mask image
per slide) and a ``label`` column holding integers (0, 1, ...) or class names (``tumor``,
``normal``). The table must be UTF-8 (a byte-order mark is allowed). Class names are numbered in sorted order unless the
caller gives the list (a trained model's classes). A folder without a table is read as
every image in it, unlabelled (for prediction).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["TableRow", "SlideTable", "read_slide_table", "IMAGE_SUFFIXES", "SPLITS"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".mrxs", ".vms", ".bif", ".ome.tif", ".ome.tiff",
                  ".png", ".jpg", ".jpeg", ".webp", ".jp2")


SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TableRow:
    path: Path
    label: int | None
    mask: Path | None = None
    id: str = ""                   # the row's path or slide_id as written in the table
    patient: str | None = None
    split: str | None = None       # one of SPLITS
    fold: int | None = None


@dataclass(frozen=True)
class SlideTable:
    rows: list[TableRow]
    classes: list[str] | None      # None: integer labels without names
    source: Path                   # the CSV, or the folder listed


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def _resolve_slide_id(root: Path, slide_id: str, mask_suffix: str) -> Path:
    exact = root / slide_id
    if exact.is_file():
        return exact
    found = sorted(p for p in root.glob(f"{slide_id}.*") if _is_image(p) and not p.stem.endswith(mask_suffix))
    return found[0] if found else exact    # a missing file is reported with the other missing ones


def _numbered(names: list[str], classes: Sequence[str] | None, where: list[str]) -> tuple[list[int], list[str] | None]:
    """Labels as integers, and the class names (None when every label is already an integer)."""
    numeric = [n.lstrip("-").isdigit() for n in names]
    if classes is None and all(numeric):
        return [int(n) for n in names], None
    if classes is None and any(numeric):
        at = where[numeric.index(False)]
        raise ValueError(f"{at}: label {names[numeric.index(False)]!r} is not an integer, but other labels are: "
                         "use class names or integers throughout")
    classes = list(classes) if classes is not None else sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    labels = []
    for name, at in zip(names, where):
        if name in index:
            labels.append(index[name])
        elif name.isdigit() and int(name) < len(classes):
            labels.append(int(name))
        else:
            raise ValueError(f"{at}: label {name!r} is not one of the classes {classes}")
    return labels, classes


def read_slide_table(root: str | Path, table: str | Path | None = "manifest.csv", *,
                     classes: Sequence[str] | None = None, require_labels: bool = True,
                     mask_suffix: str = "_mask") -> SlideTable:
    """The slides (and labels) of ``root/table``; ``table=None`` lists the folder's images instead."""
    root = Path(root)
    if table is None or (not (root / table).is_file() and not require_labels and root.is_dir()):
        paths = sorted(p for p in root.iterdir() if _is_image(p) and not p.stem.endswith(mask_suffix))
        if not paths:
            raise FileNotFoundError(f"{root}: no table ({table}) and no image files to read")
        return SlideTable([TableRow(p, None, id=p.name) for p in paths], list(classes) if classes else None, root)
    source = root / table
    if not source.is_file():
        raise FileNotFoundError(f"manifest {source} not found (expected a CSV with columns path,label "
                                "or slide_id,label)")
    try:
        with open(source, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = list(reader)
    except UnicodeDecodeError as error:
        raise ValueError(f"{source}: not UTF-8 (byte 0x{error.object[error.start]:02x} at offset {error.start}): "
                         "save the table as UTF-8 (CSV UTF-8 in a spreadsheet)") from None
    key = "path" if "path" in columns else "slide_id" if "slide_id" in columns else None
    missing = ([] if key else ["path (or slide_id)"]) + (["label"] if require_labels and "label" not in columns else [])
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; found {columns}")
    if not rows:
        raise ValueError(f"{source}: no rows")
    paths, masks, names, where, extras = [], [], [], [], []
    for line, row in enumerate(rows, start=2):    # line 1 is the header
        value = (row[key] or "").strip()
        extras.append(_row_extras(row, value, f"{source}, line {line} ({value})"))
        if key == "path":
            path = Path(value)
            paths.append(path if path.is_absolute() else root / path)
        else:
            paths.append(_resolve_slide_id(root, value, mask_suffix))
        mask = (row.get("mask") or "").strip()
        masks.append((Path(mask) if Path(mask).is_absolute() else root / mask) if mask else None)
        names.append((row.get("label") or "").strip())
        where.append(f"{source}, line {line} ({value})")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{source}: image file(s) not found: {', '.join(missing[:3])}{more}")
    labelled = [n != "" for n in names]
    if require_labels and not all(labelled):
        raise ValueError(f"{where[labelled.index(False)]}: no label")
    if not any(labelled):
        return SlideTable([TableRow(p, None, m, **e) for p, m, e in zip(paths, masks, extras)],
                          list(classes) if classes else None, source)
    known = [n for n in names if n]
    numbers, found_classes = _numbered(known, classes, [w for w, n in zip(where, names) if n])
    for label, at in zip(numbers, where):
        if label < 0:
            raise ValueError(f"{at}: label {label} is negative")
    it = iter(numbers)
    labels = [next(it) if n else None for n in names]
    return SlideTable([TableRow(p, lab, m, **e) for p, lab, m, e in zip(paths, labels, masks, extras)],
                      found_classes, source)


def _row_extras(row: dict[str, str | None], value: str, at: str) -> dict:
    """The row's id, patient, split and fold columns (checked)."""
    patient = (row.get("patient") or row.get("case_id") or "").strip() or None
    split = (row.get("split") or "").strip().lower() or None
    if split is not None and split not in SPLITS:
        raise ValueError(f"{at}: split {split!r} is not one of {', '.join(SPLITS)}")
    fold_text = (row.get("fold") or "").strip()
    if fold_text and not fold_text.lstrip("-").isdigit():
        raise ValueError(f"{at}: fold {fold_text!r} is not an integer")
    return {"id": value, "patient": patient, "split": split, "fold": int(fold_text) if fold_text else None}
