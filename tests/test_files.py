"""streamcnn.utils.files: atomic writes, and the glob that finds their temporary files."""
from __future__ import annotations

import pytest

from streamcnn.utils.files import TEMPORARY_GLOB, atomic_write


def test_temporary_names_match_the_glob_and_vanish(tmp_path):
    seen = []

    def write(tmp):
        tmp.write_text("partial")
        seen.append(list(tmp_path.glob(TEMPORARY_GLOB)))

    atomic_write(tmp_path / "out.txt", write)
    assert len(seen[0]) == 1 and seen[0][0].name.startswith(".out.txt.tmp-")   # the glob sees a write in progress
    assert not list(tmp_path.glob(TEMPORARY_GLOB)) and (tmp_path / "out.txt").read_text() == "partial"

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "other.txt", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
