"""Physical pixel size (microns per pixel, "mpp") from image metadata.

Sources, most specific first:

- OME-XML ``PhysicalSizeX`` (+ ``PhysicalSizeXUnit``, default µm) of an OME-TIFF;
- Aperio SVS ``ImageDescription`` (``... |MPP = 0.2520| ...``);
- the TIFF ``XResolution`` / ``ResolutionUnit`` tags (inch or centimetre; "no unit" is ignored);
- OpenSlide's ``openslide.mpp-x`` property (vendor formats).

Each function returns the level-0 mpp, or None when the file does not say. The mpp of a
pyramid level is the level-0 mpp times the level's downsample (level-0 width / level width).
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from typing import Any, Mapping

__all__ = ["tiff_mpp", "properties_mpp", "level_mpps"]

_MICRONS = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "nm": 1e-3, "Å": 1e-4}
_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")


def _ome_mpp(xml: str) -> float | None:
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("Pixels") and "PhysicalSizeX" in element.attrib:
            unit = element.attrib.get("PhysicalSizeXUnit", "µm")
            return float(element.attrib["PhysicalSizeX"]) * _MICRONS.get(unit, 1.0)
    return None


def tiff_mpp(tif: Any) -> float | None:
    """Level-0 mpp of an open ``tifffile.TiffFile`` (OME, Aperio, or resolution tags)."""
    if tif.is_ome and tif.ome_metadata:
        mpp = _ome_mpp(tif.ome_metadata)
        if mpp:
            return mpp
    page = tif.series[0].levels[0].keyframe
    match = _APERIO_MPP.search(page.description or "")
    if match:
        return float(match.group(1))
    unit = int(page.resolutionunit)         # 1 none, 2 inch, 3 centimetre
    x_per_unit = page.resolution[0]
    if unit in (2, 3) and x_per_unit > 0:
        return (25400.0 if unit == 2 else 10000.0) / x_per_unit
    return None


def properties_mpp(properties: Mapping[str, str]) -> float | None:
    """Level-0 mpp from OpenSlide/tiffslide properties."""
    value = properties.get("openslide.mpp-x") or properties.get("tiffslide.mpp-x")
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def level_mpps(mpp: float | None, level_shapes: list[tuple[int, int, int]]) -> list[float | None]:
    """The mpp of each level, from the level-0 mpp and the level widths."""
    width = level_shapes[0][2]
    return [None if mpp is None else mpp * width / w for _, _, w in level_shapes]
