"""docs/architecture.md against the code: the layer order every import obeys, and the module map.

The layers are read from the page's "Layers" table, so the page and the check cannot disagree. Known
exceptions are listed in ``ALLOWED_*`` below, each with the helper work that removes it; an entry that
is no longer needed fails the test, so the lists only shrink.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"
LAYERS = ["streamcnn/utils", "streamcnn/io", "streamcnn/data", "streamcnn/engine", "streamcnn/planning",
          "streamcnn/models", "streamcnn/training", "tools"]
# (importing file, imported module) pairs that climb a layer today. Shrink, never grow.
ALLOWED_UP: set[tuple[str, str]] = set()
# (importing file, imported module, private name) imports of another module's private names.
ALLOWED_PRIVATE: set[tuple[str, str, str]] = set()
# Files over the 400-line limit today.
ALLOWED_LONG: set[str] = set()


def _modules() -> list[Path]:
    return sorted([*(ROOT / "streamcnn").rglob("*.py"), *(ROOT / "tools").glob("*.py")])


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _layer_of_file(rel: str) -> int | None:
    """The layer index of a file; None for the package facade, which sits above every layer."""
    for index, layer in enumerate(LAYERS):
        if rel.startswith(layer + "/"):
            return index
    return None


def _layer_of_module(name: str) -> int | None:
    """The layer index of an imported module; len(LAYERS) for the facade; None outside streamcnn."""
    parts = name.split(".")
    if parts[0] != "streamcnn":
        return None
    if len(parts) == 1:
        return len(LAYERS)
    return LAYERS.index(f"streamcnn/{parts[1]}") if f"streamcnn/{parts[1]}" in LAYERS else None


def _imports(path: Path, root: Path = ROOT) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import in a file (``root`` its tree), at any depth."""
    parts = path.relative_to(root).with_suffix("").parts
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(parts[:len(parts) - node.level])
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [alias.name for alias in node.names]
            if module == "streamcnn":  # `from streamcnn import io` names a layer; other names the facade
                for name in names:
                    found.append((node.lineno, f"streamcnn.{name}" if f"streamcnn/{name}" in LAYERS else module, [name]))
            else:
                found.append((node.lineno, module, names))
    return found


def test_the_page_lists_the_layers_the_check_enforces_and_each_exists():
    table = re.findall(r"^\| (\d+) \| `([^`]+)/` \|", PAGE.read_text(), flags=re.M)
    assert [int(n) for n, _ in table] == list(range(1, len(LAYERS) + 1))
    assert [folder for _, folder in table] == LAYERS
    for layer in LAYERS:
        assert (ROOT / layer).is_dir(), layer


def test_every_module_the_page_names_exists_and_every_module_is_named():
    named = set(re.findall(r"`((?:streamcnn|tools)/[\w/]+\.py)`", PAGE.read_text()))
    missing = sorted(name for name in named if not (ROOT / name).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
    modules = {_rel(p) for p in _modules() if p.name != "__init__.py" or p.parent == ROOT / "streamcnn"}
    unnamed = sorted(modules - named)
    assert not unnamed, f"add these modules to docs/architecture.md's table: {unnamed}"


def test_imports_point_down_the_layers():
    climbing = set()
    for path in _modules():
        rel = _rel(path)
        mine = _layer_of_file(rel)
        if mine is None:  # the facade re-exports every layer
            continue
        for line, module, _ in _imports(path):
            theirs = _layer_of_module(module)
            if theirs is not None and theirs > mine:
                climbing.add((rel, module, line))
    unexpected = sorted(c for c in climbing if c[:2] not in ALLOWED_UP)
    assert not unexpected, f"imports that climb a layer (file, module, line): {unexpected}"
    stale = sorted(ALLOWED_UP - {c[:2] for c in climbing})
    assert not stale, f"these no longer climb: remove them from ALLOWED_UP: {stale}"


def test_the_layer_check_sees_imports_inside_functions_and_relative_ones(tmp_path):
    engine = tmp_path / "streamcnn" / "engine"
    engine.mkdir(parents=True)
    (engine / "probe.py").write_text("def f():\n    from ..training import runner\n    import streamcnn.models\n")
    found = [(line, module) for line, module, _ in _imports(engine / "probe.py", root=tmp_path)]
    assert found == [(2, "streamcnn.training"), (3, "streamcnn.models")]
    assert all(_layer_of_module(m) > LAYERS.index("streamcnn/engine") for _, m in found)


def test_no_module_imports_another_modules_private_names():
    private = set()
    for path in _modules():
        own = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for _, module, names in _imports(path):
            if module.startswith("streamcnn") and module != own:
                private |= {(_rel(path), module, n) for n in names if n.startswith("_") and not n.startswith("__")}
    unexpected = sorted(private - ALLOWED_PRIVATE)
    assert not unexpected, f"private names imported from another module: {unexpected}"
    stale = sorted(ALLOWED_PRIVATE - private)
    assert not stale, f"no longer imported: remove them from ALLOWED_PRIVATE: {stale}"


def test_no_module_is_over_400_lines():
    long = {_rel(p) for p in _modules() if len(p.read_text().splitlines()) > 400}
    assert not long - ALLOWED_LONG, f"files over 400 lines: {sorted(long - ALLOWED_LONG)}"
    assert not ALLOWED_LONG - long, f"now within 400 lines: remove from ALLOWED_LONG: {sorted(ALLOWED_LONG - long)}"
