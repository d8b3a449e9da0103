"""benchmarks/bench_export.py on CPU: its gloo mode end to end (2 real gloo processes, one model,
one sync per path; no timing is asserted) and the argument rules of its NCCL mode (issue 19 item 2),
which itself needs two GPUs (docs/validation.md, 'Not run: needs two GPUs (issue 19)')."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_export.py"


def test_gloo_mode_counts_the_bytes_and_checks_them_against_a_one_device_export(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, str(SCRIPT), "--models", "Qwen3-30B-A3B", "--repeats", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    text = (tmp_path / "export_cpu-gloo.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| Qwen3-30B-A3B"))
    # 1 timed expert per rank: fc1 [1536, 2048] + fc2 [2048, 768] = 4,718,592 elements
    assert "| 1 | 144.0 MiB | 38.2 MiB | 3.765x | 9,437,184 / 2,506,752 B = 3.765x (as formula) |" in row, row
    assert row.endswith("| yes |"), row
    assert "Result: PASS" in text and "gpt-oss" not in text


def _load():
    spec = importlib.util.spec_from_file_location("bench_export", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, env, message", [
    (["--backend", "nccl"], {}, "runs under torchrun"),
    (["--backend", "nccl", "--repeats", "5"], {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "median of >= 10 syncs"),
    (["--backend", "nccl", "--warmup", "0"], {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "after >= 1 warm-up"),
    (["--repeats", "0"], {}, "must be >= 1"),
])
def test_bad_arguments_are_one_line_errors(argv, env, message, monkeypatch, capsys):
    for name in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        _load().parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_nccl_mode_refuses_without_one_gpu_per_rank(monkeypatch, capsys):
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has >= 2 GPUs: the NCCL mode would run (docs/validation.md)")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit) as exc:
        _load().parse_args(["--backend", "nccl"])
    assert exc.value.code == 2 and "needs one GPU per rank" in capsys.readouterr().err
