"""Every guard refuses loudly: at model build (MoELayer.__init__, real megatron-core class) or at
the first forward of a patched TEGroupedLinear (stand-in)."""

from __future__ import annotations

import logging
import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _megatron_fixtures import te_ext  # noqa: E402,F401

import megatron_qat.megatron as mm  # noqa: E402
from megatron_qat.megatron import cache as fake_weights  # noqa: E402
from megatron_qat.megatron import runtime as guards  # noqa: E402  (the guards live in the runtime module)


def _layer(te_ext, **kw):
    return te_ext.TEGroupedLinear(2, 64, 8, **kw)


def _forward(layer):
    return layer._get_weight_tensors()


def test_delay_wgrad_module_attribute(te_ext):
    layer = _layer(te_ext)
    layer.delay_wgrad_compute = True
    mm.enable(32)
    with pytest.raises(RuntimeError, match="delay_wgrad_compute"):
        _forward(layer)


def test_delay_wgrad_from_config_and_te_store(te_ext):
    mm.enable(32)
    layer = _layer(te_ext)
    layer.config = SimpleNamespace(delay_wgrad_compute=True)
    with pytest.raises(RuntimeError, match="delay_wgrad_compute"):
        _forward(layer)
    layer = _layer(te_ext)
    layer.wgrad_store = SimpleNamespace(delay_wgrad_compute=lambda: True)
    with pytest.raises(RuntimeError, match="delay_wgrad_compute"):
        _forward(layer)


@pytest.mark.parametrize(
    "weight,attribute,message",
    [("weight1", "__fsdp_param__", "Megatron-FSDP"), ("weight0", "is_distributed_weight", "is_distributed_weight")],
    ids=["megatron_fsdp_params", "gtp_distributed_weights"],
)
def test_refused_weight_kinds(te_ext, weight, attribute, message):
    layer = _layer(te_ext)
    setattr(getattr(layer, weight), attribute, True)
    mm.enable(32)
    with pytest.raises(RuntimeError, match=message):
        _forward(layer)


class QuantizedTensor(torch.Tensor):
    """Named like TE's base class of FP8/MXFP8/NVFP4 primary weights."""


def test_quantized_primary_weights(te_ext):
    layer = _layer(te_ext)
    layer.weight0 = torch.nn.Parameter(torch.Tensor._make_subclass(QuantizedTensor, layer.weight0.detach()))
    mm.enable(32)
    with pytest.raises(RuntimeError, match="FP8/quantized primary weights"):
        _forward(layer)
    layer = _layer(te_ext)
    layer.config = SimpleNamespace(fp8_param=True)
    with pytest.raises(RuntimeError, match="fp8_param"):
        _forward(layer)


def test_k_not_multiple_of_block_size_names_shape_and_fc2_hint(te_ext):
    layer = te_ext.TEGroupedLinear(2, 48, 8)
    layer.config = SimpleNamespace(moe_ffn_hidden_size=96, expert_tensor_parallel_size=2)
    mm.enable(32)
    with pytest.raises(ValueError, match=r"shape \[8, 48\].*K=48.*block_size=32.*moe_ffn_hidden_size / expert-tensor"):
        _forward(layer)


def test_single_grouped_weight_is_refused_not_skipped(te_ext):
    layer = te_ext.TEGroupedLinear(3, 64, 8, single_grouped_weight=True)
    mm.enable(32)
    with pytest.raises(NotImplementedError, match="moe_single_grouped_weight.*NVTE_GROUPED_LINEAR_SINGLE_PARAM"):
        _forward(layer)


def test_fp8_compute_warns_once(te_ext, caplog):
    layer = _layer(te_ext)
    layer.fp8 = True
    mm.enable(32)
    with caplog.at_level(logging.WARNING, logger="megatron_qat"):
        _forward(layer)
        _forward(layer)
    assert sum("re-quantizes" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize(
    "switch, error",
    [
        ("use_transformer_engine_op_fuser", RuntimeError),
        ("moe_use_legacy_grouped_gemm", RuntimeError),
        ("delay_wgrad_compute", RuntimeError),
        ("fp8_param", RuntimeError),
        ("moe_single_grouped_weight", NotImplementedError),
    ],
)
def test_real_moe_layer_build_refuses_config_switch(te_ext, switch, error):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    mm.enable(32)
    with pytest.raises(error, match=switch):
        MoELayer(config=SimpleNamespace(**{switch: True}))


class _Experts(torch.nn.Module):
    def __init__(self, *children):
        super().__init__()
        for i, c in enumerate(children):
            self.add_module(f"linear_fc{i + 1}", c)


def test_built_layer_without_grouped_linear_names_the_switch(te_ext):
    layer = SimpleNamespace(experts=_Experts(torch.nn.Linear(4, 4)), layer_number=3,
                            config=SimpleNamespace(moe_grouped_gemm=False, moe_use_legacy_grouped_gemm=False))
    with pytest.raises(RuntimeError, match=r"experts are _Experts.*moe_grouped_gemm=False.*SequentialMLP"):
        guards.check_built_moe_layer(layer, te_ext.TEGroupedLinear, 32)


def test_built_layer_fc2_k_names_the_layer(te_ext):
    fc1, fc2 = te_ext.TEGroupedLinear(2, 64, 96), te_ext.TEGroupedLinear(2, 48, 64)
    layer = SimpleNamespace(experts=_Experts(fc1, fc2), layer_number=5,
                            config=SimpleNamespace(moe_ffn_hidden_size=48, expert_tensor_parallel_size=1))
    with pytest.raises(ValueError, match=r"layer_number=5\)\.experts\.linear_fc2 weight has shape \[64, 48\]"):
        guards.check_built_moe_layer(layer, te_ext.TEGroupedLinear, 32)
    layer.experts = _Experts(fc1, te_ext.TEGroupedLinear(2, 64, 64))
    guards.check_built_moe_layer(layer, te_ext.TEGroupedLinear, 32)  # accepted


def test_op_fuser_on_built_experts(te_ext):
    experts = _Experts(te_ext.TEGroupedLinear(2, 64, 64))
    experts._with_fused_impl = True
    with pytest.raises(RuntimeError, match="op fuser"):
        guards.check_built_moe_layer(SimpleNamespace(experts=experts), te_ext.TEGroupedLinear, 32)


def test_negative_control_flag_not_carried_back_adds_garbage(te_ext, monkeypatch):
    """Proves the protocol test is sensitive: without setting the Parameter's flag, TE's (NaN) dummy
    would be added into main_grad by the DDP hook."""
    from te_standin import DDPLikeHooks

    monkeypatch.setattr(fake_weights.FakeWeightsSTE, "backward",
                        staticmethod(lambda ctx, *grads: (None, None, None, *grads)))
    layer = te_ext.TEGroupedLinear(2, 64, 8, fuse_wgrad_accumulation=True)
    hooks = DDPLikeHooks([layer.weight0, layer.weight1])
    mm.enable(32)
    layer(torch.randn(5, 64), [2, 3]).sum().backward()
    assert torch.isnan(layer.weight0.main_grad).all() and hooks.adds[layer.weight0] == 1
