"""benchmarks/apex_standin (issue 14 item 5): without Apex, ``import fused_weight_gradient_mlp_cuda``
works after ``benchmarks/_gpu_env.ensure_fused_wgrad()`` and its wgrad accumulates
``main_grad += dY^T X`` as megatron-core's ColumnParallelLinear backward calls it (CPU, small)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_stand_in_is_found_and_accumulates_dy_t_x(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.delitem(sys.modules, "fused_weight_gradient_mlp_cuda", raising=False)
    import _gpu_env

    assert _gpu_env.ensure_fused_wgrad() == "stand-in"
    wgrad = importlib.import_module("fused_weight_gradient_mlp_cuda")
    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(7, 5, generator=gen), torch.randn(7, 3, generator=gen)
    main_grad = torch.ones(3, 5)
    wgrad.wgrad_gemm_accum_fp32(x, dy, main_grad)
    assert torch.equal(main_grad, 1 + dy.t() @ x)
    half = torch.zeros(3, 5, dtype=torch.bfloat16)
    wgrad.wgrad_gemm_accum_fp16(x.bfloat16(), dy.bfloat16(), half)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), dy.t() @ x, rtol=0.05, atol=0.05)
    sys.path.remove(str(_gpu_env.STANDIN_DIR))
