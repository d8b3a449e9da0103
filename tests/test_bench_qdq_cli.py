"""benchmarks/bench_qdq.py runs on CPU as far as it can: its --help, and a clear refusal (exit 2)
without CUDA. The GPU run is listed in docs/validation.md."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_qdq.py"


def test_help_lists_the_options():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    for opt in ("--out", "--quick", "--repeats", "--dtype", "--no-compile"):
        assert opt in out


def test_refuses_without_cuda_in_one_line(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the benchmark would run")
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "bench_qdq.py needs a CUDA GPU (torch.cuda.is_available() is False); run it on the lent GPU."]  # fmt: skip


def test_shapes_and_rules_are_the_contract():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_qdq
    finally:
        sys.path.pop(0)
    from megatron_qat.mxfp4 import RULES

    assert len(bench_qdq.SHAPES) == 6
    assert [(t, k) for _, t, k in bench_qdq.ACTIVATION_SHAPES] == [(4096, 2048), (4096, 2880), (4096, 768), (4096, 2880), (4096, 2048)]
    assert set(bench_qdq.WEIGHT_RULES_GROUPED + bench_qdq.ACTIVATION_RULES) <= set(RULES)
