"""Generated slides for the pathology tests (see :mod:`streamcnn.data.demo_slides`)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from streamcnn.data.demo_slides import CLASSES as _CLASSES
from streamcnn.data.demo_slides import generate_demo_slides, slide_pixels, write_slide  # noqa: F401

SIZES = [(192, 256), (320, 224), (256, 384), (160, 160), (288, 320), (224, 288)]
CLASSES = list(_CLASSES)


def make_slide_folder(root: Path, sizes=SIZES, *, mpp: float = 0.5) -> Path:
    """``root`` with slides S0..Sn (mixed sizes) and ``slides.csv`` (case_id, slide_id without extension, class name)."""
    generate_demo_slides(root, sizes, mpp=mpp)
    return root


TOOLS = Path(__file__).resolve().parents[1] / "tools"


def tool(name: str):
    """``tools/<name>.py`` loaded as a module (its ``main(argv)`` runs the command in this process)."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sets(*overrides: str) -> list[str]:
    """``--set`` arguments for ``overrides``."""
    return [a for o in overrides for a in ("--set", o)]
