"""Build a one-GPU Megatron ``MoELayer`` with ``TEGroupedMLP`` experts for tests/gpu/test_megatron_gpu.py.

Targets megatron-core 0.19.2 + Transformer Engine 2.20.2 (see ../../../shared/device/README.md):
torch.distributed (nccl, world size 1), ``parallel_state.initialize_model_parallel(1, 1,
expert_model_parallel_size=1)``, ``model_parallel_cuda_manual_seed``; the layer comes from
``get_moe_module_spec(use_te=True, num_experts=E, moe_grouped_gemm=True)`` called with ``config=``.
"""

from __future__ import annotations

import os
import socket

import torch


def require_gpu_stack() -> None:
    """Skip the calling test module (module level) unless a CUDA GPU, Transformer Engine and
    megatron-core are all there: the GPU suite runs on the lent GPU (shared/device/README.md)."""
    import pytest

    from _helpers import require

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the lent GPU)", allow_module_level=True)
    require("transformer_engine.pytorch", "Transformer Engine is not installed (GPU machine: see shared/device/README.md)")
    require("megatron.core", "megatron-core is not installed")

HIDDEN, FFN, EXPERTS, TOPK, TOKENS = 256, 128, 4, 2, 64


def init_single_gpu():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", world_size=1, rank=0)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    model_parallel_cuda_manual_seed(1234)


def make_config(*, fusion: bool, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        ffn_hidden_size=4 * HIDDEN,
        num_moe_experts=EXPERTS,
        moe_ffn_hidden_size=FFN,
        moe_router_topk=TOPK,
        moe_grouped_gemm=True,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        bf16=True,
        params_dtype=torch.bfloat16,
        gradient_accumulation_fusion=fusion,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_moe_layer(config, state_dict=None):
    """A fresh MoELayer on cuda (bf16 experts). ``state_dict``: copy weights from another layer."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    spec = get_moe_module_spec(use_te=True, num_experts=EXPERTS, moe_grouped_gemm=True)
    layer = build_module(spec, config=config) if isinstance(spec, ModuleSpec) else spec(config=config)
    layer = layer.cuda()
    if state_dict is not None:
        layer.load_state_dict(state_dict, strict=True)
    return layer


def expert_weights(layer):
    """{name: Parameter} of the routed experts' grouped linear weights (weight0..N-1 of fc1 and fc2)."""
    out = {}
    for name, p in layer.named_parameters():
        if name.startswith("experts.linear_fc") and ".weight" in name:
            out[name] = p
    assert out, f"no expert weights found in {[n for n, _ in layer.named_parameters()]}"
    return out


def overwrite_experts_with_fake_quant(layer, block_size=32):
    from megatron_qat import mxfp4

    with torch.no_grad():
        for p in expert_weights(layer).values():
            p.copy_(mxfp4.fake_quantize(p, block_size))


def micro_batches(n=2, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [
        (
            torch.randn(TOKENS // 2, 2, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen),
            torch.randn(TOKENS // 2, 2, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen),
        )
        for _ in range(n)
    ]


def forward_backward(model, x, dy):
    """One micro-batch: out = model(x)[0]; backward with dy (fixed upstream gradient)."""
    x = x.detach().requires_grad_(True)
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(dy)
    return out.detach()


def wrap_ddp(layer, config, overlap_grad_reduce):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce, use_distributed_optimizer=False
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=layer)


def run_ddp(model_ddp, layer, mbs):
    """Micro-batches ``mbs`` through ``model_ddp`` (Megatron DDP over ``layer``) as Megatron's schedule
    does (``no_sync`` but for the last, then ``finish_grad_sync``). After each: Megatron's hook must
    have consumed every expert ``param.grad``. Returns the experts' ``main_grad`` copies and whether
    every expert Parameter's ``grad_added_to_main_grad`` was set, per micro-batch."""
    snaps, flags = [], []
    model_ddp.zero_grad_buffer()
    for i, (x, dy) in enumerate(mbs):
        if i < len(mbs) - 1:
            with model_ddp.no_sync():
                forward_backward(model_ddp, x, dy)
        else:
            forward_backward(model_ddp, x, dy)
            model_ddp.finish_grad_sync()
        weights = expert_weights(layer)
        assert all(p.grad is None for p in weights.values()), "Megatron's hook did not consume param.grad"
        flags.append(all(getattr(p, "grad_added_to_main_grad", False) for p in weights.values()))
        snaps.append({n: p.main_grad.clone() for n, p in weights.items()})
    return snaps, flags
