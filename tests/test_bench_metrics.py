"""benchmarks/bench_metrics.py on CPU: ``--help`` runs, and without a GPU it says so and exits 2
(nothing timed, nothing written). No timing: the benchmark itself needs a GPU (see its docstring)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_metrics.py"


def test_help_runs_without_a_gpu():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--torch-repeats" in done.stdout and "--quick" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the benchmark would run")
def test_without_a_gpu_it_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "metrics.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr, done.stderr
    assert not out.exists()
