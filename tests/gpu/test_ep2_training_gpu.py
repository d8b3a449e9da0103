"""EP=2 training check on GPUs (issue 19 item 1): tests/gpu/ep2_training.py under
``torchrun --nproc-per-node 2 ... --backend nccl`` -- real megatron-core 0.19.2 MoELayer with
Transformer Engine 2.20.2 ``TEGroupedMLP`` experts, expert-parallel size 2 over NCCL, megatron DDP
with the distributed optimizer and fused wgrad, both token dispatchers; the checks are the
script's (see its docstring). Needs two GPUs: skipped with the reason on a machine with fewer.
``test_ep1_training_one_gpu`` runs the same checks at EP=1 on one GPU (what a one-GPU machine can run).

Multi-GPU machines need ``NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
NVSHMEM_DISABLE_NVLS=1`` (the staged env.sh sets them; they are inherited by the run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.megatron]

sys.path.insert(0, os.path.dirname(__file__))
import _moe_harness as H  # noqa: E402

H.require_gpu_stack()

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "gpu" / "ep2_training.py"


def _torchrun(nproc: int, *argv: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("MEGATRON_QAT_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), str(SCRIPT),
         "--backend", "nccl", *argv],
        capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-8000:]
    assert "MISMATCH" not in done.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith("PASS:"), done.stdout[-4000:]
    return done.stdout


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_ep2_training_two_gpus(dispatcher):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs >= 2 GPUs for expert-parallel size 2 over NCCL ({torch.cuda.device_count()} visible); "
                    "see docs/validation.md, 'Not run: needs two GPUs (issue 19)'")
    out = _torchrun(2, "--dispatcher", dispatcher)
    assert f"EP=2 training check: backend nccl, dispatcher {dispatcher}, 2 ranks" in out
    for rank in (0, 1):
        assert f"rank {rank}: 4 expert weights; compared 8 outputs and 20 main_grads (16 expert)" in out


def test_ep1_training_one_gpu():
    out = _torchrun(1, "--ep", "1")
    assert "EP=1 training check: backend nccl, dispatcher alltoall, 1 ranks" in out
    assert "rank 0: 8 expert weights; compared 8 outputs and 36 main_grads (32 expert)" in out
