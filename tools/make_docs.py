"""Regenerate ``docs/benchmarks.md`` from ``benchmarks/results/`` (the JSON files, PNGs and run folders).

``python tools/make_docs.py`` rewrites the page; ``--check`` exits 1 naming the page when it is out of
date; ``--results DIR --out FILE`` reads and writes elsewhere (the test uses both). The page has one
section per benchmark script (found from each JSON's recorded command): what it measures (the first
paragraph of the script's docstring), then per results file its command, machine, device and versions
as recorded, its tables and its figures. The first section says which files ran on a GPU, read from
each file's recorded device. The output depends only on the files it reads: no clock, no host name,
files in sorted order, so rerunning it changes nothing. A JSON layout it does not know gets the generic
rendering: every list of records (and every mapping of records) becomes a table of its scalar fields.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import markdown_table  # noqa: E402  (benchmarks/ is not a package)

PAGE = ROOT / "docs" / "benchmarks.md"
SCRIPT_DIRS = ("benchmarks", "tools")
# Section order for the scripts known today; any other script follows, alphabetically.
ORDER = ("bench_exactness", "bench_equivalence", "bench_streaming", "bench_scale", "bench_cpu_options",
         "bench_planner", "model_table", "bench_io", "ultramnist_stats", "bench_training", "bench_learning",
         "gpu_check")
# Results files that record no command: the script that writes them, by file-name prefix.
WRITTEN_BY = {"io_ultramnist_stats": "ultramnist_stats", "gpu_check": "gpu_check"}
ENVIRONMENT_KEYS = {"environment", "date", "machine", "device", "versions", "load_average_before",
                    "load_average_after", "omp_num_threads", "command", "torch_cuda_available",
                    "vips_concurrency", "note"}
# Long per-step or per-round records kept in the JSON but not printed.
NOT_PRINTED = {"per_round", "history", "curve", "runs_detail", "steps_detail"}
# The columns to print for known record layouts (key, header); other layouts print every scalar field.
COLUMNS = {
    "bench_exactness": [("trunk", "trunk"), ("tile", "tile"), ("tiles", "tiles"), ("overlap", "overlap"),
                        ("features", "features"), ("input_grad", "input grad"),
                        ("param_grads_max", "worst parameter grad")],
    "bench_streaming": [("model", "model"), ("tile", "tile"), ("forward_tile", "forward tile"),
                        ("tame", "malloc tamed"), ("seconds", "s/step"), ("time_vs_conventional", "time x"),
                        ("time_vs_predicted", "measured/predicted"), ("rss_growth_gib", "RSS growth GiB"),
                        ("peak_rss_vs_conventional", "peak RSS x"), ("allocator_peak_vs_conventional", "tensors x"),
                        ("rounds", "rounds")],
    "bench_scale": [("image", "image px"), ("mode", "mode"), ("plan", "plan"), ("peak_rss_gb", "peak RSS GB"),
                    ("predicted_rss_gb", "predicted RSS GB"), ("rss_growth_gb", "RSS growth GB"),
                    ("seconds", "s/step"), ("measured_vs_predicted", "measured/predicted s"), ("rounds", "rounds")],
    "bench_cpu_options": [("option", "option"), ("seconds", "s/step"), ("vs_fp32", "vs fp32"),
                          ("faster_every_round", "faster every round"), ("page_faults_per_step", "page faults/step"),
                          ("rounds", "rounds")],
    "bench_planner": [("model", "model"), ("image", "image"), ("batch", "batch"), ("dtype", "dtype"),
                      ("plan", "plan"), ("tile", "tile"), ("predicted_gb", "predicted GB"),
                      ("measured_gb", "measured GB"), ("error_pct", "error %"), ("predicted_rss_gb", "predicted RSS GB"),
                      ("measured_rss_gb", "measured RSS GB"), ("rss_error_pct", "RSS error %")],
    "model_table": [("model", "trunk"), ("streams", "streams"), ("refused", "refused at"), ("stride", "stride"),
                    ("halo_px", "halo px"), ("overlap", "overlap"), ("relative_cost", "rel. cost"),
                    ("params_m", "params (M)")],
    "bench_equivalence": [("name", "trunk"), ("dtype", "dtype"), ("steps", "steps"), ("image_px", "image px"),
                          ("n_tiles", "tiles"), ("loss_first", "loss, first"), ("loss_last", "loss, last"),
                          ("max_rel_loss_diff", "max rel. loss diff"), ("max_rel_param_diff", "max rel. param diff"),
                          ("control_max_rel_loss_diff", "control: max rel. loss diff"), ("cpu_seconds", "CPU s")],
    "gpu_check": [("name", "section"), ("status", "status"), ("seconds", "s"), ("reason", "reason")],
    "bench_training": [("config", "config"), ("mode", "mode"), ("trunk", "trunk"), ("input_size", "input px"),
                       ("budget", "budget"), ("epochs", "epochs"), ("wall_minutes", "wall min"),
                       ("peak_memory_gb", "peak memory GB"), ("final_train_loss", "final train loss"),
                       ("final_val_accuracy", "final val acc"), ("best_val_accuracy", "best val acc")],
}


def _cell(value):
    """A scalar for a table cell, or None for what a cell cannot hold (records, lists, long text)."""
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, str) and "\n" not in value:
        if len(value) > 240:  # a long message: its first sentence
            value = value.split(". ")[0]
            value = value if len(value) <= 240 else value[:237] + "..."
        return value.replace("|", "/")
    return None


def _scaled(record: dict) -> dict:
    """The record's scalar fields; ``*_bytes`` also as ``*_gb`` and ``*_gib``, fractions ``error``/``rss_error`` as %."""
    out = {}
    for key, value in record.items():
        cell = _cell(value)
        if cell is None and value is not None:
            continue
        out[key] = cell
        if key.endswith("_bytes") and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key[:-6] + "_gb"] = value / 1e9
            out[key[:-6] + "_gib"] = value / 2**30
    for key in ("error", "rss_error"):
        if isinstance(record.get(key), float) and f"{key}_pct" not in record:
            out[f"{key}_pct"] = record[key] * 100
    if isinstance(record.get("wall_seconds"), (int, float)):
        out["wall_minutes"] = record["wall_seconds"] / 60
    if "measured_vs_predicted" not in out and isinstance(record.get("predicted_seconds"), (int, float)) \
            and isinstance(record.get("seconds"), (int, float)) and record["predicted_seconds"]:
        out["measured_vs_predicted"] = record["seconds"] / record["predicted_seconds"]
    return out


def _table(records: list[dict], family: str) -> str:
    rows = [_scaled(r) for r in records]
    present = [c for c in COLUMNS.get(family, []) if any(r.get(c[0]) is not None for r in rows)]
    if len(present) < 2:  # an unknown layout: every scalar field that is not raw bytes
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys and not k.endswith(("_bytes", "_gib"))]
        present = [(k, k.replace("_", " ")) for k in keys[:14]]
    return markdown_table(rows, present)


def _tables(data: dict, family: str, prefix: str = "", depth: int = 0) -> list[str]:
    """Every list of records and every mapping of records in ``data``, as titled tables, its settings
    first; nested ones too (``a.b.c``), except under a record that carries its own ``summary``."""
    parts, settings = [], []
    for key, value in data.items():
        title = prefix + str(key)
        if key in ENVIRONMENT_KEYS and depth == 0:
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            if key in NOT_PRINTED:
                parts.append(f"`{title}`: {len(value)} records in the JSON.")
                continue
            parts.append(f"`{title}`:\n\n{_table(value, family)}")
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            records, nested = [], []
            for name, v in value.items():
                summary = v.get("summary") if isinstance(v.get("summary"), dict) else None
                records.append({"name": name, **{k: x for k, x in (summary or v).items() if x != name}})
                if summary is None and depth < 3:
                    nested += [p for p in _tables(v, family, f"{title}.{name}.", depth + 1)
                               if not p.startswith("Settings: ")]
            parts += [f"`{title}`:\n\n{_table(records, family)}", *nested]
        elif isinstance(value, dict):
            shown = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items() if _cell(v) is not None)
            if shown:
                settings.append(f"`{title}`: {shown}")
            if depth < 3:
                parts += [p for p in _tables(value, family, title + ".", depth + 1) if not p.startswith("Settings: ")]
        elif _cell(value) is not None:
            settings.append(f"`{title}`: {_fmt(value)}")
        elif isinstance(value, list) and value and all(_cell(v) is not None for v in value) and len(value) <= 32:
            settings.append(f"`{title}`: {', '.join(_fmt(v) for v in value)}")
    if settings:
        parts.insert(0, "Settings: " + "; ".join(settings) + ".")
    return parts


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _environment(data: dict) -> dict:
    env = data.get("environment")
    return env if isinstance(env, dict) else data


def _script_of(name: str, env: dict) -> str:
    for token in str(env.get("command") or "").split():
        if token.endswith(".py"):
            return Path(token).stem
    for prefix, script in WRITTEN_BY.items():
        if name.startswith(prefix):
            return script
    return name.split("_")[0].split("-")[0]


def _script_path(script: str) -> Path | None:
    for folder in SCRIPT_DIRS:
        path = ROOT / folder / f"{script}.py"
        if path.exists():
            return path
    return None


def _what_it_measures(script: str) -> str:
    path = _script_path(script)
    doc = ast.get_docstring(ast.parse(path.read_text())) if path else None
    if not doc:
        return f"(no script `{script}.py` in benchmarks/ or tools/ describes this file.)"
    first = " ".join(doc.split("\n\n")[0].split()).removeprefix("Benchmark: ")
    return first[:1].upper() + first[1:]


def _device(env: dict) -> str:
    return str(env.get("device") or "").strip()


def _on_gpu(env: dict) -> bool:
    device = _device(env).lower()
    return bool(device) and not device.startswith("cpu") and device != "meta"


def _statuses(data: dict) -> str:
    """``; sections: 3 pass, 4 skipped`` for a file whose ``sections`` carry a ``status``; else nothing."""
    sections = data.get("sections")
    records = list(sections.values()) if isinstance(sections, dict) else sections if isinstance(sections, list) else []
    counts: dict[str, int] = {}
    for record in records:
        if isinstance(record, dict) and isinstance(record.get("status"), str):
            counts[record["status"]] = counts.get(record["status"], 0) + 1
    return "; sections: " + ", ".join(f"{n} {status}" for status, n in counts.items()) if counts else ""


def _provenance(env: dict) -> list[str]:
    machine = env.get("machine") if isinstance(env.get("machine"), dict) else {}
    versions = env.get("versions") if isinstance(env.get("versions"), dict) else {}
    lines = []
    if env.get("command"):
        lines.append(f"- command: `{env['command']}`")
    where = ", ".join(str(x) for x in (machine.get("cpu"), machine.get("cores") and f"{machine['cores']} cores")
                      if x)
    if where:
        lines.append(f"- machine: {where}")
    lines.append(f"- device: {_device(env) or 'not recorded'}")
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if k in ("torch", "torchvision", "timm") and v)
    if shown:
        lines.append(f"- versions: {shown}")
    if env.get("date"):
        lines.append(f"- measured: {env['date']}")
    load = env.get("load_average_before")
    if isinstance(load, list) and load:
        lines.append(f"- load average before: {_fmt(float(load[0]))}")
    return lines


def _run_folder(folder: Path, page_dir: Path) -> list[str]:
    """A folder of one training run's own files: its timing lines, its plan, its metrics per epoch, its figures."""
    lines = [f"### `{folder.name}/`", ""]
    time_file = folder / "time.txt"
    if time_file.exists():
        wanted = ("Command being timed", "Elapsed (wall clock)", "Maximum resident set size")
        for line in time_file.read_text().splitlines():
            if line.strip().startswith(wanted):
                lines.append(f"- {line.strip()}")
        lines.append("")
    plan = folder / "plan.txt"
    if plan.exists():
        lines += ["What it printed as its plan (`plan.txt`):", "", "```", *plan.read_text().rstrip().splitlines(),
                  "```", ""]
    metrics = folder / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        epochs = [r for r in rows if "val_accuracy" in r]
        if epochs:
            lines += ["`metrics.jsonl`, one row per epoch:", "", markdown_table(epochs, [
                ("epoch", "epoch"), ("train_loss", "train loss"), ("train_accuracy", "train acc"),
                ("val_accuracy", "test acc"), ("images_per_second", "images/s"), ("seconds", "s")]), ""]
    for png in sorted(folder.glob("*.png")):
        lines.append(f"![{folder.name}/{png.stem}]({_link(png, page_dir)})")
        lines.append("")
    return lines


def _link(path: Path, page_dir: Path) -> str:
    return Path(os.path.relpath(path, page_dir)).as_posix()


def _figures_by_file(names: list[str], pngs: list[Path]) -> tuple[dict[str, list[Path]], list[Path]]:
    """Each PNG under the results file whose name is the longest prefix of its own; the rest apart."""
    owned: dict[str, list[Path]] = {n: [] for n in names}
    loose = []
    for png in pngs:
        matches = [n for n in names if png.stem == n or png.stem.startswith((n + "-", n + "_"))]
        if matches:
            owned[max(matches, key=len)].append(png)
        else:
            loose.append(png)
    return owned, loose


class BadResults(ValueError):
    """A results file the page cannot be made from; the message names it."""


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise BadResults(f"{path}: not readable JSON ({error}); fix or remove it") from None
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        return {"rows": data}
    if not isinstance(data, dict):
        raise BadResults(f"{path}: holds a {type(data).__name__}, not an object or a list of records; fix or remove it")
    return data


def render(results: Path) -> str:
    files = sorted(results.glob("*.json"))
    loaded = {f.stem: _load(f) for f in files}
    envs = {name: _environment(d) for name, d in loaded.items()}
    scripts = {name: _script_of(name, envs[name]) for name in loaded}
    owned, loose = _figures_by_file(list(loaded), sorted(results.glob("*.png")))
    order = [s for s in ORDER if s in scripts.values()] + sorted(set(scripts.values()) - set(ORDER))
    page_dir = PAGE.parent  # links are written for the page's home, wherever --out puts it

    gpu = [n for n in loaded if _on_gpu(envs[n])]
    checks = [n for n in loaded if n.startswith("gpu_check")]
    out = ["# Benchmarks", "",
           "Generated by `python tools/make_docs.py` from `benchmarks/results/`; do not edit by hand "
           "(rerun it after adding results). Each figure below is what the named JSON file records.", "",
           "## What has run on a GPU", ""]
    if gpu:
        out.append("Results files measured on a GPU (their recorded device): "
                   + "; ".join(f"`{n}.json` ({_device(envs[n])})" for n in gpu) + ".")
        out.append("Every other file was measured on a CPU or records no device.")
    else:
        out.append(f"**Nothing has run on a GPU.** All {len(loaded)} results files were measured on a CPU or "
                   "record no device (below, per file): no figure on this page was measured on a GPU.")
    out += ["", "Not yet measured, for want of a GPU: CUDA step times and peaks, the planner's CUDA allowances "
            "(context, workspace, fragmentation) against `torch.cuda.max_memory_allocated`, and the budget cap "
            "(`streamcnn.enforce_budget`). On a GPU: `python benchmarks/bench_streaming.py --device cuda` and "
            "`python benchmarks/bench_planner.py --device cuda`"
            + (", and `python benchmarks/gpu_check.py`." if (ROOT / "benchmarks" / "gpu_check.py").exists() else "."),
            ""]
    if checks:
        out.append("GPU check files found: " + "; ".join(
            f"`{n}.json` (device: {_device(envs[n]) or 'not recorded'}{_statuses(loaded[n])})" for n in checks) + ".")
    else:
        out.append("GPU check files found (`benchmarks/results/gpu_check-*.json`): none.")
    out.append("")
    for script in order:
        names = [n for n in loaded if scripts[n] == script]
        path = _script_path(script)
        title = f"`{path.relative_to(ROOT).as_posix()}`" if path else f"`{script}`"
        out += [f"## {title}", "", _what_it_measures(script), ""]
        for name in names:
            data = loaded[name]
            out += [f"### `{name}.json`", ""] + _provenance(envs[name]) + [""]
            for part in _tables(data, script):
                out += [part, ""]
            for png in owned[name]:
                out += [f"![{png.stem}]({_link(png, page_dir)})", ""]
    folders = sorted(p for p in results.iterdir() if p.is_dir())
    if folders:
        out += ["## Run folders", "", "Training runs kept with their own files (`time.txt` is `/usr/bin/time -v`).", ""]
        for folder in folders:
            out += _run_folder(folder, page_dir)
    if loose:
        out += ["## Other figures", ""] + [f"![{p.stem}]({_link(p, page_dir)})\n" for p in loose]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=PAGE)
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs from what would be written")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        print(f"error: no results folder {args.results}; pass --results DIR", file=sys.stderr)
        return 2
    try:
        text = render(args.results)
    except BadResults as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is out of date: run python tools/make_docs.py", file=sys.stderr)
            return 1
        return 0
    from streamcnn.utils.files import atomic_write_text

    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
