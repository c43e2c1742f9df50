"""What every benchmark records next to its numbers: machine, device, versions, date, load.

Benchmarks import this as ``from common import ...`` (the script's folder is on sys.path).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from streamcnn.utils.files import atomic_write_text, save_figure

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "torchvision", "numpy", "tifffile", "imagecodecs", "zarr", "pyvips", "openslide-python",
            "openslide-bin", "tiffslide")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"cpu: {_cpu_name()}"


def environment(device: str = "cpu") -> dict:
    """Machine, device, package versions, date and load average, for a results file."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        import pyvips

        versions["libvips"] = f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"
    except Exception:  # noqa: BLE001 - optional
        versions["libvips"] = None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "device": device_name(device),
        "versions": versions,
        "load_average_before": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def write_json(name: str | Path, payload: dict) -> Path:
    """Write ``payload`` to ``benchmarks/results/NAME`` (or to a path) atomically."""
    return atomic_write_text(name if isinstance(name, Path) else RESULTS / name, json.dumps(payload, indent=2) + "\n")


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with (key, header) ``columns``; floats get 3 significant digits."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def run_worker(script: str | Path, spec: dict, env: dict | None = None) -> dict:
    """Run ``script --worker JSON`` in a fresh process; its last stdout line parsed, or ``{"error": last line}``."""
    proc = subprocess.run([sys.executable, str(script), "--worker", json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def finish_figure(fig, axes, path: Path, dpi: int = 110) -> Path:
    """Small legends on ``axes``, a tight layout, and the figure saved atomically to ``path``."""
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=dpi)


def randomise_batchnorm(module, bias: bool = False):
    """Give every BatchNorm2d in ``module`` random statistics and affine weights (``bias``: a random
    bias too), so a frozen-BN exactness check is not the identity; returns ``module``."""
    import torch

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                if bias:
                    m.bias.uniform_(-0.1, 0.1)
    return module
