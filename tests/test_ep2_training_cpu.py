"""EP=2 training check on CPU (issue 19 item 1, the CI variant of tests/gpu/ep2_training.py).

``torchrun --standalone --nproc-per-node 2 tests/gpu/ep2_training.py --backend gloo --dispatcher
allgather``: REAL multi-process torch.distributed (gloo, 2 processes), real megatron-core
``MoELayer`` / ``TEGroupedMLP`` / DDP with the distributed optimizer / ``forward_backward_no_pipelining``
/ ``finalize_model_grads``, expert-parallel size 2, gradient-accumulation fusion. Transformer Engine
cannot be installed on CPU: its grouped linear is the STAND-IN of tests/_cpu_megatron.py (TE 2.20.2's
BF16 protocol from tests/te_standin.py under megatron-core's ``TEGroupedLinear`` semantics), and
megatron-core's hard-coded CUDA allocations are redirected to the CPU (listed there).

The script's own checks (bit for bit on integer views, every rank): forward == a flag-off
reference holding ``fake_quantize`` of the masters, every ``main_grad`` == the reference's (each
expert gradient lands exactly once), cache on == cache off over 2 optimizer steps. The alltoall
dispatcher needs CUDA streams, so the CPU run uses megatron's allgather dispatcher; the GPU runs
(tests/gpu/test_ep2_training_gpu.py) use both.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_export_live import require

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "gpu" / "ep2_training.py"


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("MEGATRON_QAT_CACHE", None)
    return env


def test_ep2_training_gloo_two_processes():
    require("megatron.core", "megatron-core is a test dependency ([megatron] extra)")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
         "--backend", "gloo", "--dispatcher", "allgather"],
        capture_output=True, text=True, timeout=900, env=_env(), cwd=ROOT,
    )
    out = done.stdout
    assert done.returncode == 0, (out + done.stderr)[-6000:]
    assert "EP=2 training check: backend gloo (Transformer Engine STAND-IN" in out
    assert "2 ranks, 2 optimizer steps x 2 micro-batches" in out
    for rank in (0, 1):  # each rank compared what it claims: 2 local experts x (fc1, fc2), 2 runs x 2 steps
        line = re.search(rf"^rank {rank}: .*$", out, re.M).group(0)
        assert "4 expert weights; compared 8 outputs and 20 main_grads (16 expert)" in line, line
        assert "'cache': (4, 4, 0), 'no_cache': (0, 0, 8)" in line, line
    assert "MISMATCH" not in out
    assert out.rstrip().splitlines()[-1].startswith("PASS:")


def _load():
    spec = importlib.util.spec_from_file_location("ep2_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, world, message", [
    (["--backend", "gloo", "--steps", "1"], "2", "both must be >= 2"),
    (["--backend", "gloo", "--ep", "2"], "1", "--ep 2 needs 2 processes; torchrun started 1"),
    (["--backend", "gloo", "--dispatcher", "alltoall"], "2", "with --backend gloo use --dispatcher allgather"),
    (["--backend", "gloo"], None, "launch with torchrun"),
])
def test_bad_arguments_are_one_line_errors(argv, world, message, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if world:
        monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(SystemExit) as exc:
        _load().parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
