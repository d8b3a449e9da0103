"""megatron_qat.layouts against real checkpoints: tiny random models built with transformers 5.x's
own classes and written by ``save_pretrained`` (tests/_tiny_hf.py), plus the in-memory fused
state dicts, and the refusals (unknown family, ambiguous fused tensor, contradicting shape)."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import _tiny_hf
from megatron_qat.layouts import (
    FAMILIES,
    LayoutError,
    blocked_shape,
    blocked_view,
    classify,
    config_path_for,
    family_from_config,
    family_from_config_file,
    hf_expert_names,
)

INTERMEDIATE = {"gpt_oss": 96, "llama4": 32, "mixtral": 96}  # expert MLP width; 32 for the others


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for family in _tiny_hf.FAMILIES:
        d = tmp_path_factory.mktemp(family)
        out[family] = (d, _tiny_hf.build(family, d))
    return out


def _stored(directory):
    with safe_open(str(directory / "model.safetensors"), "pt") as h:
        return {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}


@pytest.mark.parametrize("family", _tiny_hf.FAMILIES)
def test_every_saved_expert_tensor_is_classified_with_in_features(saved, family):
    directory, _ = saved[family]
    assert family_from_config_file(config_path_for(str(directory / "model.safetensors"))) == family
    assert family_from_config(json.loads((directory / "config.json").read_text())) == family
    inter = INTERMEDIATE.get(family, 32)
    found = {}
    for name, shape in _stored(directory).items():
        info = classify(name, shape, family)
        routed = ".experts." in name and "shared" not in name and not name.endswith("_bias")
        assert (info is not None) == routed, name
        if info is None:
            continue
        want_in = inter if info.role == "down" else _tiny_hf.HIDDEN
        assert shape[info.in_dim] == want_in, (name, shape, info)
        assert blocked_shape(shape, info)[-1] == want_in
        found.setdefault(info.role, []).append(info)
    if family in ("gpt_oss", "llama4"):  # stored fused [E, in, out]
        assert set(found) == {"gate_up", "down"}
        assert all(i.in_dim == 1 and i.expert_dim == 0 and i.expert is None for v in found.values() for i in v)
        assert found["gate_up"][0].glu == ("interleaved" if family == "gpt_oss" else "concat")
    else:  # save_pretrained converts transformers-v5's fused experts back to per-expert nn.Linear
        assert set(found) == {"gate", "up", "down"} and all(len(v) == 4 for v in found.values())
        assert all(i.in_dim == 1 and i.expert_dim is None for v in found.values() for i in v)
        assert sorted(i.expert for i in found["gate"]) == [0, 1, 2, 3]


@pytest.mark.parametrize("family", _tiny_hf.FAMILIES)
def test_hf_expert_names_are_the_saved_names(saved, family):
    directory, _ = saved[family]
    stored = _stored(directory)
    names = hf_expert_names(family, 0)
    for role, template in names.items():
        expanded = [template.format(E=e) for e in range(4)] if "{E}" in template else [template]
        for n in expanded:
            assert n in stored, (role, n)
            assert classify(n, stored[n], family).role == role


def _run_fused(family, model, x, e, gate_up, down):
    """The expert MLP of expert ``e`` computed from the layout table alone (F.linear on blocked_view)."""
    experts = model.model.layers[0].mlp.experts if family != "llama4" else model.model.layers[0].feed_forward.experts
    gu_info = classify("model.layers.0.mlp.experts.gate_up_proj", tuple(gate_up.shape), family)
    dn_info = classify("model.layers.0.mlp.experts.down_proj", tuple(down.shape), family)
    h = F.linear(x, blocked_view(gate_up, gu_info)[e])
    if family == "gpt_oss":
        h = h + experts.gate_up_proj_bias[e]
    gate, up = (h[..., 0::2], h[..., 1::2]) if gu_info.glu == "interleaved" else h.chunk(2, dim=-1)
    if family == "gpt_oss":  # GptOssExperts._apply_gate, written out
        gate, up = gate.clamp(max=experts.limit), up.clamp(-experts.limit, experts.limit)
        act = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
        return F.linear(act, blocked_view(down, dn_info)[e]) + experts.down_proj_bias[e]
    return F.linear(experts.act_fn(gate) * up, blocked_view(down, dn_info)[e])


@pytest.mark.parametrize("family", ["gpt_oss", "llama4", "qwen3_moe", "mixtral"])
def test_fused_layout_reproduces_the_real_expert_forward(saved, family):
    """The table's in_dim and gate/up rule, applied to the model's own fused parameters, give what
    transformers' expert module computes (fp32 model; a layout check, not a bit-exact claim)."""
    _, model = saved[family]
    model = model.float()
    experts = model.model.layers[0].mlp.experts if family != "llama4" else model.model.layers[0].feed_forward.experts
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    torch.manual_seed(1)
    e, tokens = 2, 3
    x = torch.randn(tokens, _tiny_hf.HIDDEN)
    with torch.no_grad():
        if family == "llama4":  # bmm over [E, tokens, H]: expert e sees its own slice
            xs = torch.zeros(4 * tokens, _tiny_hf.HIDDEN)
            xs[e * tokens : (e + 1) * tokens] = x
            want = experts(xs)[e * tokens : (e + 1) * tokens]
        elif family == "gpt_oss":
            want = experts(x, torch.full((tokens, 1), e), torch.ones(tokens, 1))
        else:
            want = experts(x, torch.full((tokens, 1), e), torch.ones(tokens, 1))
        got = _run_fused(family, model, x, e, gate_up, down)
    torch.testing.assert_close(got, want)
    model.to(torch.bfloat16)


def test_v5_fused_state_dict_is_out_in_and_concat(saved):
    """transformers-v5 Qwen3-MoE keeps experts fused [E, 2I, H] in memory; a raw state_dict dump
    stores that, and save_pretrained's per-expert tensors are its concat halves."""
    directory, model = saved["qwen3_moe"]
    sd = model.state_dict()
    gate_up, down = sd["model.layers.0.mlp.experts.gate_up_proj"], sd["model.layers.0.mlp.experts.down_proj"]
    info = classify("model.layers.0.mlp.experts.gate_up_proj", tuple(gate_up.shape), "qwen3_moe")
    assert (info.in_dim, info.out_dim, info.glu) == (2, 1, "concat") and gate_up.shape[2] == _tiny_hf.HIDDEN
    assert classify("model.layers.0.mlp.experts.down_proj", tuple(down.shape), "qwen3_moe").in_dim == 2
    with safe_open(str(directory / "model.safetensors"), "pt") as h:
        for e in range(4):
            both = torch.cat([h.get_tensor(f"model.layers.0.mlp.experts.{e}.gate_proj.weight"), h.get_tensor(f"model.layers.0.mlp.experts.{e}.up_proj.weight")])
            assert torch.equal(both.view(torch.int16), blocked_view(gate_up, info)[e].contiguous().view(torch.int16))


def test_same_fused_name_means_different_axes_per_family():
    name, shape = "model.layers.0.mlp.experts.gate_up_proj", (4, 64, 192)
    assert classify(name, shape, "gpt_oss").in_dim == 1
    assert classify(name, shape, "qwen3_moe").in_dim == 2
    t = torch.arange(4 * 64 * 192, dtype=torch.float32).reshape(shape)
    bv = blocked_view(t, classify(name, shape, "gpt_oss"))
    assert bv.shape == (4, 192, 64) and torch.equal(bv, t.transpose(1, 2))


def test_fused_tensor_without_family_is_refused_naming_layout():
    with pytest.raises(LayoutError, match="--layout") as exc:
        classify("model.layers.0.mlp.experts.gate_up_proj", (4, 64, 192), None)
    assert "gpt_oss" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(LayoutError, match="--layout"):
        classify("model.layers.0.mlp.experts.down_proj", (4, 96, 64), "megatron")
    with pytest.raises(LayoutError, match="DBRX"):
        classify("transformer.blocks.0.ffn.experts.mlp.w1", (256, 64), "mixtral")
    with pytest.raises(LayoutError, match="3-D"):
        classify("model.layers.0.mlp.experts.gate_up_proj", (192, 64), "gpt_oss")
    with pytest.raises(LayoutError, match="even"):
        classify("model.layers.0.mlp.experts.gate_up_proj", (4, 64, 191), "gpt_oss")
    with pytest.raises(LayoutError, match="accepted"):
        classify("x.experts.0.up_proj.weight", (8, 32), "qwen4")


def test_per_expert_and_megatron_need_no_family():
    info = classify("model.layers.3.mlp.experts.7.down_proj.weight", (64, 32), None)
    assert (info.family, info.role, info.layer, info.expert, info.in_dim) == (None, "down", 3, 7, 1)
    assert classify("model.layers.0.block_sparse_moe.experts.1.w3.weight", (96, 64), None).role == "up"
    te = classify("model.decoder.layers.2.mlp.experts.linear_fc1.weight5", (64, 32), "qwen3_moe")
    assert (te.family, te.role, te.layer, te.expert, te.in_dim, te.glu) == ("megatron", "fc1", 2, 5, 1, "concat")
    grouped = classify("decoder.layers.0.mlp.experts.linear_fc2.weight", (4, 32, 64), None)
    assert (grouped.in_dim, grouped.expert_dim, grouped.expert, grouped.glu) == (2, 0, None, None)
    seq = classify("decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight", (32, 64), None)
    assert (seq.role, seq.expert, seq.in_dim) == ("fc2", 3, 1)
    for name in ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj_bias", "model.layers.0.mlp.experts.gate_up_proj_blocks",
                 "model.layers.0.mlp.shared_experts.gate_proj.weight", "decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.router.weight"):
        assert classify(name, (8, 64), None) is None, name


def test_family_from_config_refuses_unknown_and_conflicting():
    assert family_from_config({"architectures": ["GptOssForCausalLM"]}) == "gpt_oss"
    assert family_from_config({"model_type": "llama4_text"}) == "llama4"
    for bad, match in [({"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"]}, "not a known"),
                       ({"model_type": "qwen3_moe", "architectures": ["GptOssForCausalLM"]}, "architectures"),
                       ([], "JSON object")]:
        with pytest.raises(LayoutError, match=match) as exc:
            family_from_config(bad)
        assert "--layout" in str(exc.value) and ", ".join(FAMILIES) in str(exc.value)


def test_layouts_import_is_torch_free():
    code = "import sys, megatron_qat.layouts; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
