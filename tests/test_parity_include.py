"""The default --include regex: routed expert weights yes; routers, shared experts, biases, norms no."""

import re

import pytest

from megatron_qat.parity.options import DEFAULT_INCLUDE

POSITIVE = [
    "model.layers.0.mlp.experts.0.gate_proj.weight",  # Qwen-MoE / DeepSeek / OLMoE
    "model.layers.12.mlp.experts.127.up_proj.weight",
    "model.layers.3.mlp.experts.5.down_proj.weight",
    "model.layers.0.block_sparse_moe.experts.7.w1.weight",  # Mixtral
    "model.layers.0.block_sparse_moe.experts.7.w2.weight",
    "model.layers.0.block_sparse_moe.experts.7.w3.weight",
    "transformer.blocks.0.ffn.experts.mlp.w1",  # DBRX fused
    "model.layers.0.mlp.experts.gate_up_proj",  # gpt-oss / transformers fused 3-D
    "model.layers.0.mlp.experts.down_proj",
    "language_model.model.layers.0.feed_forward.experts.gate_up_proj",  # Llama-4
    "decoder.layers.0.mlp.experts.linear_fc1.weight0",  # Megatron TEGroupedLinear
    "decoder.layers.0.mlp.experts.linear_fc2.weight63",
    "model.decoder.layers.1.mlp.experts.linear_fc1.weight",  # grouped
    "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight",  # SequentialMLP
    "module.decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight",
]
NEGATIVE = [
    "model.layers.0.mlp.gate.weight",  # router (HF)
    "model.layers.0.block_sparse_moe.gate.weight",
    "decoder.layers.0.mlp.router.weight",  # router (Megatron)
    "model.layers.0.mlp.router.weight",  # gpt-oss router
    "model.layers.0.mlp.gate.e_score_correction_bias",
    "model.layers.0.mlp.shared_experts.gate_proj.weight",  # DeepSeek shared experts
    "model.layers.0.mlp.shared_expert.up_proj.weight",  # Qwen shared expert
    "model.layers.0.mlp.shared_expert_gate.weight",
    "decoder.layers.0.mlp.shared_experts.linear_fc1.weight",  # Megatron shared experts
    "model.layers.0.mlp.experts.gate_up_proj_bias",  # gpt-oss biases
    "model.layers.0.mlp.experts.down_proj_bias",
    "model.layers.0.mlp.experts.gate_up_proj_blocks",  # gpt-oss MXFP4 storage
    "model.layers.0.mlp.experts.gate_up_proj_scales",
    "model.layers.0.mlp.experts.0.gate_proj.bias",
    "decoder.layers.0.mlp.experts.linear_fc1._extra_state",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",  # dense MLP
    "decoder.layers.0.mlp.linear_fc1.weight",
    "model.layers.0.post_attention_layernorm.weight",
]


@pytest.mark.parametrize("name", POSITIVE)
def test_default_include_matches_routed_experts(name):
    assert re.search(DEFAULT_INCLUDE, name), name


@pytest.mark.parametrize("name", NEGATIVE)
def test_default_include_rejects_router_shared_and_others(name):
    assert not re.search(DEFAULT_INCLUDE, name), name
