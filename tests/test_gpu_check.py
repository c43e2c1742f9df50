"""benchmarks/gpu_check.py --device cpu --quick: every section that applies on a CPU runs and passes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CUDA_ONLY = {"offload", "planner", "torchrun", "throughput"}


def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    sections = json.loads(out.read_text())["sections"]
    assert set(sections) == {"exactness", "offload", "planner", "resume", "amp", "torchrun", "throughput"}
    assert all(entry["status"] != "fail" for entry in sections.values()), sections
    assert sections["exactness"]["status"] == "pass" and sections["resume"]["status"] == "pass"
    assert sections["amp"]["status"] == "pass"
    assert {row["dtype"] for row in sections["amp"]["rows"]} == {"bfloat16", "float16"}
    assert [row["grad_scaler"] for row in sections["amp"]["rows"]] == [False, True]
    dtypes = {row["dtype"] for row in sections["exactness"]["rows"]}
    assert dtypes == {"float64", "float32"} and len(sections["exactness"]["rows"]) == 6
    if not torch.cuda.is_available():
        for name in CUDA_ONLY:
            assert sections[name]["status"] == "skipped" and "CUDA" in sections[name]["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU is visible")
def test_gpu_check_refuses_a_missing_gpu_in_one_line():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cuda"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and "--device cpu" in done.stderr
