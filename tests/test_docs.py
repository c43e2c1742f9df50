"""The front door and the generated pages: README.md's promises, docs/benchmarks.md from its JSON."""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAKE_DOCS = ROOT / "tools" / "make_docs.py"
_spec = importlib.util.spec_from_file_location("make_docs", MAKE_DOCS)
make_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_docs)


def _page(results: Path) -> str:
    return make_docs.render(results)


def _write(folder: Path, name: str, payload: dict) -> None:
    (folder / name).write_text(json.dumps(payload))


def test_the_committed_benchmarks_page_is_what_make_docs_writes_and_rerunning_changes_nothing(tmp_path):
    written = tmp_path / "benchmarks.md"
    run = subprocess.run([sys.executable, str(MAKE_DOCS), "--out", str(written)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert written.read_text() == _page(ROOT / "benchmarks" / "results")     # the same in another process
    committed = (ROOT / "docs" / "benchmarks.md").read_text()
    assert committed == written.read_text(), "docs/benchmarks.md is stale: run python tools/make_docs.py"


def test_every_results_file_and_figure_is_on_the_page():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    results = ROOT / "benchmarks" / "results"
    for path in sorted(results.glob("*.json")):
        assert f"`{path.name}`" in page, path.name
    for path in sorted(results.glob("*.png")):
        assert f"(../benchmarks/results/{path.name})" in page, path.name


def test_an_unknown_layout_gets_a_table_and_a_gpu_run_is_named(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _write(results, "widget.json", {"environment": {"command": "python benchmarks/bench_widget.py",
                                                    "device": "NVIDIA H100 80GB HBM3 (79 GiB)"},
                                    "rows": [{"size": 64, "ms": 2.5, "nested": {"a": 1}}, {"size": 128, "ms": 9.75}]})
    _write(results, "gpu_check-cpu.json", {"device": "cpu: Some CPU", "command": "python benchmarks/gpu_check.py",
                                           "sections": {"exactness": {"status": "passed", "rows": [{"tile": 256, "rel_error": 3e-7}]},
                                                        "budget_cap": {"status": "skipped", "reason": "no CUDA"}}})
    (results / "bare.json").write_text(json.dumps([{"a": 1, "b": "x"}]))   # a bare list of records
    page = _page(results)
    assert "| a | b |\n|---|---|\n| 1 | x |" in page
    assert "| size | ms |" in page and "| 64 | 2.5 |" in page and "| 128 | 9.75 |" in page
    assert "| exactness | passed |" in page and "| budget_cap | skipped | no CUDA |" in page
    assert "`sections.exactness.rows`:\n\n| tile | rel error |\n|---|---|\n| 256 | 3e-07 |" in page  # nested records
    gpu_part = page.split("## What has run on a GPU")[1].split("\n## ")[0]
    assert "`widget.json` (NVIDIA H100" in gpu_part
    assert "Nothing has run on a GPU" not in gpu_part
    assert "`gpu_check-cpu.json` (device: cpu: Some CPU; sections: 1 passed, 1 skipped)" in gpu_part


def test_cpu_only_results_say_nothing_ran_on_a_gpu(tmp_path):
    _write(tmp_path, "thing.json", {"device": "cpu: Some CPU", "rows": [{"x": 1, "y": 2}]})
    gpu_part = _page(tmp_path).split("## What has run on a GPU")[1].split("\n## ")[0]
    assert "Nothing has run on a GPU" in gpu_part and "gpu_check" in gpu_part and "none" in gpu_part


def test_check_names_a_stale_page_and_a_missing_folder_is_one_line(tmp_path, capsys):
    _write(tmp_path, "thing.json", {"device": "cpu: Some CPU", "rows": [{"x": 1, "y": 2}]})
    page = tmp_path / "page.md"
    assert make_docs.main(["--results", str(tmp_path), "--out", str(page)]) == 0
    assert make_docs.main(["--results", str(tmp_path), "--out", str(page), "--check"]) == 0
    page.write_text(page.read_text() + "edited by hand\n")
    capsys.readouterr()
    assert make_docs.main(["--results", str(tmp_path), "--out", str(page), "--check"]) == 1
    err = capsys.readouterr().err
    assert "page.md" in err and "make_docs.py" in err
    assert make_docs.main(["--results", str(tmp_path / "absent")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "absent" in lines[0] and "--results" in lines[0]
    (tmp_path / "cut.json").write_text('{"rows": [')                   # a file cut off mid-write
    assert make_docs.main(["--results", str(tmp_path), "--out", str(page)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cut.json" in lines[0] and "JSON" in lines[0]


def test_readme_is_short_runs_the_ci_commands_and_links_to_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 220
    assert "2026-" not in readme
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ("python -m pip install -e \".[test]\"", "python -m pytest -q"):
        assert command.replace("-q ", "") in ci.replace("-q ", ""), command  # .ci/run installs quietly
        assert command in readme, command
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert any(link == "docs/benchmarks.md" for link in local)
    for link in local:
        assert (ROOT / link).exists(), link
    assert "tools/make_docs.py" in readme
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    # the README's word on GPUs is the generated page's
    assert ("Nothing has been measured on a GPU" in readme) == ("Nothing has run on a GPU" in page)
    for figure in ("1.15e-14", "2.68"):     # the figures the README quotes are on the page
        assert (figure in readme) <= (figure in page), figure


def test_no_dates_in_docstrings_under_streamcnn():
    dated = []
    for path in sorted((ROOT / "streamcnn").rglob("*.py")):
        tree = ast.parse(path.read_text())
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                        ast.ClassDef)))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and re.search(r"\b20\d\d-\d\d", doc):
                dated.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 1)}")
    assert not dated, dated


# References in pages other helpers own that named the flat layout; their owners update them. Shrink only.
KNOWN_STALE = {
    ("docs/data.md", "streamcnn/data/ultramnist.py"),
    ("docs/learning.md", "streamcnn/scratch.py"),
    ("docs/learning.md", "configs/learning-down256/512/1024.yaml"),   # shorthand for three files
    ("docs/planner.md", "streamcnn/allocator.py"),
    ("docs/planner.md", "streamcnn/memory.py"),
    ("docs/planner.md", "streamcnn/units.py"),
}


def _resolves(dotted: str) -> bool:
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(found, name):
                return False
            found = getattr(found, name)
        return True
    return False


def test_every_file_and_dotted_name_the_pages_mention_exists():
    broken = set()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text, rel = page.read_text(), page.relative_to(ROOT).as_posix()
        for path in set(re.findall(r"(?<!:)\b((?:streamcnn|tools|benchmarks|tests|configs)/[\w./-]+\.(?:py|yaml|md))", text)):
            if not (ROOT / path).exists():
                broken.add((rel, path))
        for dotted in set(re.findall(r"\bstreamcnn(?:\.[A-Za-z_]\w*)+", text)):
            if not _resolves(dotted):
                broken.add((rel, dotted))
    assert not broken - KNOWN_STALE, f"pages name what does not exist: {sorted(broken - KNOWN_STALE)}"


def test_every_relative_link_in_the_pages_reaches_a_file():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if link.startswith(("http://", "https://", "#", "mailto:")):
                continue
            if not (page.parent / link.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {link}")
    assert not broken, broken
