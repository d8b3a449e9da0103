"""GPU proof of the weight cache (issue 9 item 1, DistributedOptimizer bullet; item 5) on a real
one-GPU MoELayer (TEGroupedMLP, SwiGLU, bf16, gradient-accumulation fusion) under Megatron DDP with
the distributed optimizer, ``overlap_param_gather`` off and on.

Targets megatron-core 0.19.2 + Transformer Engine 2.20.2 (shared/device/README.md). NOT run in the
session that wrote it (no GPU was lent); the cache is wired by ``megatron_qat.enable()`` (the
runtime's weight hook -> ``cache.ModuleState.fake_weights``, TE's forward wrapped): the first test
says so plainly if it is not.

Per optimizer step (2 steps, 2 micro-batches each), bitwise on integer views:
 - the layer's output and every expert's ``main_grad`` equal a reference layer (flag off) whose
   expert weights are ``fake_quantize`` of the current master weights;
 - what the cache holds equals ``fake_quantize`` of the master weights AFTER the distributed
   optimizer's update (copied into the param buffer, then all-gathered -- in the next forward's
   pre-hook under ``overlap_param_gather``): a stale reuse would differ from the first step on.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.megatron]


sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root
import _moe_harness as H  # noqa: E402
from _helpers import bits  # noqa: E402

H.require_gpu_stack()

import megatron_qat  # noqa: E402
from megatron_qat import mxfp4  # noqa: E402
from megatron_qat.megatron import current  # noqa: E402
from megatron_qat.megatron.cache import STATE_ATTR  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _gpu_session(megatron_gpu):
    yield


def _grouped_modules(model):
    return [m for m in model.modules() if STATE_ATTR in m.__dict__]


def _ddp_with_distributed_optimizer(layer, config, overlap_param_gather):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_param_gather,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=True,
    )
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=layer)
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-2, bf16=True, use_distributed_optimizer=True, clip_grad=0.0)
    optimizer = get_megatron_optimizer(opt_config, [model])
    return model, optimizer


def _reference_from(master_layer, config):
    """Flag off (caller disables): a fresh layer holding fake_quantize of master_layer's experts."""
    ref = H.build_moe_layer(config, state_dict=master_layer.state_dict())
    H.overwrite_experts_with_fake_quant(ref)
    return ref


@pytest.mark.parametrize("overlap_param_gather", [False, True], ids=["param-gather-sync", "overlap-param-gather"])
def test_distributed_optimizer_updates_are_picked_up_next_step(overlap_param_gather):
    config = H.make_config(fusion=True)
    megatron_qat.enable(32)
    current().reset_stats()
    layer = H.build_moe_layer(config)
    model, optimizer = _ddp_with_distributed_optimizer(layer, config, overlap_param_gather)
    masters = H.expert_weights(layer)
    for step in range(2):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        batches = H.micro_batches(2, seed=step)
        megatron_qat.enable(32)
        outs = [H.forward_backward(model, x, dy) for x, dy in batches]
        if overlap_param_gather:
            model.finish_grad_sync()
        stats = current().stats()
        assert stats.hits > 0, f"the weight cache is not wired into the hook (stats {stats})"
        for module in _grouped_modules(layer):
            entry = module.__dict__[STATE_ATTR]
            assert entry.plain is not None
            for i, fake in enumerate(entry.plain):
                want = mxfp4.fake_quantize(module.get_parameter(f"weight{i}").detach(), 32)
                assert torch.equal(bits(fake), bits(want)), f"step {step}: stale cached weight{i}"
        grads = {n: p.main_grad.clone() for n, p in masters.items()}
        megatron_qat.disable()
        ref = _reference_from(layer, config)
        ref_model = H.wrap_ddp(ref, config, overlap_grad_reduce=False)
        ref_outs = [H.forward_backward(ref_model, x, dy) for x, dy in batches]
        for a, b in zip(outs, ref_outs):
            assert torch.equal(bits(a), bits(b)), f"step {step}: output differs from the fake-weight reference"
        ref_params = H.expert_weights(ref)
        for name, g in grads.items():
            assert torch.equal(bits(g), bits(ref_params[name].main_grad)), f"step {step}: {name} main_grad"
        megatron_qat.enable(32)
        update_ok, _, _ = optimizer.step()
        assert update_ok


def test_cache_on_equals_cache_off_bitwise(monkeypatch):
    config = H.make_config(fusion=True)
    runs, initial = [], None
    for env in ("0", "1"):
        monkeypatch.setenv("MEGATRON_QAT_CACHE", env)
        megatron_qat.disable()
        megatron_qat.enable(32)  # reads MEGATRON_QAT_CACHE
        layer = H.build_moe_layer(config, state_dict=initial)
        if initial is None:
            initial = {k: v.clone() for k, v in layer.state_dict().items()}
        model, optimizer = _ddp_with_distributed_optimizer(layer, config, overlap_param_gather=True)
        outs, grads = [], []
        for step in range(2):
            model.zero_grad_buffer()
            optimizer.zero_grad()
            outs += [H.forward_backward(model, x, dy) for x, dy in H.micro_batches(2, seed=step)]
            model.finish_grad_sync()
            grads += [p.main_grad.clone() for p in H.expert_weights(layer).values()]
            optimizer.step()
        runs.append(outs + grads)
        megatron_qat.disable()
    for a, b in zip(*runs):
        assert torch.equal(bits(a), bits(b))
