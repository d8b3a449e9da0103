"""Megatron-Bridge adapter (``megatron_qat.export.bridge``) against a STAND-IN for Bridge's gathers.

megatron-bridge >= 0.6.2 (the first release with ``AutoBridge.export_hf_weights_quant``) needs
Python >= 3.12 and does not install on this Python 3.11 machine (PyPI offers up to 0.3.1 here), so a
real-Bridge run is BLOCKED here. The stand-in below reproduces, on lists of per-rank shards in one
process, the gather semantics read in Bridge's ``models/conversion/param_mapping.py`` (main
067f987d; PR #2737): ``quant_fn(local_2d_shard, quant_block_size)`` per expert-TP shard;
``GatedMLPMapping``: every shard ``chunk(2, dim=0)`` into gate/up, each side ``cat(dim=0)``;
``RowParallelMapping``: codes and scales ``cat(dim=1)``; experts: ``all_gather`` over EP (rank
order), ``gather_from_ep_ranks`` ``unsqueeze(0)...squeeze(0)`` for weights and
``gather_from_ep_ranks_scale`` ``.squeeze().unsqueeze(-1)`` for scales; names ``hf_name`` and
``hf_name + "_scale_inv"`` with the global expert id ``local + N * ep_rank``. (The real
collectives of our own export are tested multi-process in tests/test_export_distributed.py.)
"""

from __future__ import annotations

import pytest
import torch

from megatron_qat.export import ExportError, emit_layer
from megatron_qat.export.bridge import (
    QUANT_BLOCK_SIZE,
    bridge_to_compressed_tensors,
    mxfp4_quant_fn,
    mxfp4_quantization_checker,
)
from test_export_live import I, assert_same_pairs, global_weights, local_shard, reference_layer

EP, ETP, E = 2, 2, 4
N = E // EP


def _ep_gather(per_ep: list[torch.Tensor], names: list[str], scale: bool) -> dict:
    out = {}
    for name, t in zip(names, per_ep):
        t = t.unsqueeze(0)
        out[name] = t.squeeze().unsqueeze(-1) if scale else t.squeeze(0)
    return out


def standin_export_layer(w: dict, layer: int, quant_fn, checker):
    """What Bridge's quantized stream yields for one layer's experts (gated fc1 + fc2)."""
    pairs = []
    for i in range(N):
        shards = [[local_shard(w, ep_rank=ep, ep=EP, etp_rank=r, etp=ETP, glu=True) for r in range(ETP)] for ep in range(EP)]
        names = {role: [f"model.layers.{layer}.mlp.experts.{i + N * ep}.{role}_proj.weight" for ep in range(EP)] for role in ("gate", "up", "down")}
        # GatedMLPMapping (linear_fc1.weight{i})
        assert checker(f"decoder.layers.{layer}.mlp.experts.linear_fc1.weight{i}")
        gate_q, up_q, gate_s, up_s = [], [], [], []
        for ep in range(EP):
            qs = [quant_fn(shards[ep][r]["fc1"][i], QUANT_BLOCK_SIZE) for r in range(ETP)]
            gate_q.append(torch.cat([q.chunk(2, dim=0)[0] for q, _ in qs], dim=0))
            up_q.append(torch.cat([q.chunk(2, dim=0)[1] for q, _ in qs], dim=0))
            gate_s.append(torch.cat([s.chunk(2, dim=0)[0] for _, s in qs], dim=0))
            up_s.append(torch.cat([s.chunk(2, dim=0)[1] for _, s in qs], dim=0))
        res = {**_ep_gather(gate_q, names["gate"], False), **_ep_gather(up_q, names["up"], False)}
        res.update({k + "_scale_inv": v for k, v in _ep_gather(gate_s, names["gate"], True).items()})
        res.update({k + "_scale_inv": v for k, v in _ep_gather(up_s, names["up"], True).items()})
        pairs += list(res.items())
        # RowParallelMapping (linear_fc2.weight{i})
        assert checker(f"decoder.layers.{layer}.mlp.experts.linear_fc2.weight{i}")
        down_q, down_s = [], []
        for ep in range(EP):
            qs = [quant_fn(shards[ep][r]["fc2"][i], QUANT_BLOCK_SIZE) for r in range(ETP)]
            down_q.append(torch.cat([q for q, _ in qs], dim=1))
            down_s.append(torch.cat([s for _, s in qs], dim=1))
        res = _ep_gather(down_q, names["down"], False)
        res.update({k + "_scale_inv": v for k, v in _ep_gather(down_s, names["down"], True).items()})
        pairs += list(res.items())
    return pairs


def test_bridge_gathers_with_our_quant_fn_give_the_engine_bytes():
    """EP=2 x ETP=2 through the stand-in, renamed: exactly our compressed-tensors export of the layer."""
    w = global_weights(3, E, True)
    raw = standin_export_layer(w, 3, mxfp4_quant_fn, mxfp4_quantization_checker)
    scale = dict(raw)["model.layers.3.mlp.experts.2.down_proj.weight_scale_inv"]
    assert tuple(scale.shape) == (64, I // 32, 1)  # Bridge's trailing dim on expert scales
    got = dict(bridge_to_compressed_tensors(raw))
    want = dict(emit_layer(reference_layer(w, 3, True), "compressed-tensors", "qwen3_moe"))
    assert_same_pairs(dict(sorted(got.items())), dict(sorted(want.items())))


def test_checker_selects_routed_experts_only():
    yes = ["decoder.layers.0.mlp.experts.linear_fc1.weight3", "decoder.layers.2.mlp.experts.linear_fc2.weight0",
           "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight"]
    no = ["decoder.layers.0.mlp.shared_experts.linear_fc1.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
          "decoder.layers.0.mlp.router.weight", "decoder.layers.0.mlp.linear_fc1.weight", "embedding.word_embeddings.weight",
          "output_layer.weight"]
    assert all(mxfp4_quantization_checker(n) for n in yes)
    assert not any(mxfp4_quantization_checker(n) for n in no)


def test_quant_fn_refuses_split_blocks_bad_block_size_and_nonfinite():
    with pytest.raises(ExportError, match=r"K_shard.*= 48"):
        mxfp4_quant_fn(torch.ones(64, 48, dtype=torch.bfloat16), QUANT_BLOCK_SIZE)
    with pytest.raises(ExportError, match="quant_block_size must be"):
        mxfp4_quant_fn(torch.ones(64, 64, dtype=torch.bfloat16), (128, 128))
    bad = torch.ones(4, 64, dtype=torch.bfloat16)
    bad[2, 9] = float("inf")
    with pytest.raises(ExportError, match="row 2"):
        mxfp4_quant_fn(bad, QUANT_BLOCK_SIZE)
    q, s = mxfp4_quant_fn(torch.ones(4, 64, dtype=torch.bfloat16), None)
    assert q.dtype == s.dtype == torch.uint8 and q.shape == (4, 32) and s.shape == (4, 2)


def test_rename_refuses_unpaired_and_misshaped_and_passes_bf16_through():
    codes = torch.zeros(8, 32, dtype=torch.uint8)
    with pytest.raises(ExportError, match="partner never arrived"):
        list(bridge_to_compressed_tensors([("m.experts.0.up_proj.weight", codes)]))
    with pytest.raises(ExportError, match="does not match codes"):
        list(bridge_to_compressed_tensors([("m.experts.0.up_proj.weight", codes),
                                           ("m.experts.0.up_proj.weight_scale_inv", torch.zeros(8, 3, dtype=torch.uint8))]))
    bf16 = torch.ones(4, 4, dtype=torch.bfloat16)
    out = list(bridge_to_compressed_tensors([("model.norm.weight", bf16), ("x.weight_scale_inv", torch.zeros(8, 2, dtype=torch.uint8)),
                                             ("x.weight", codes)]))
    assert [n for n, _ in out] == ["model.norm.weight", "x.weight_packed", "x.weight_scale"]
