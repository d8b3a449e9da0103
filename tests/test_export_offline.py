"""Offline ``megatron-qat export`` against REAL loaders (no decoder of ours in the loop):

- transformers 5.x ``GptOssForCausalLM.from_pretrained(dst, quantization_config=Mxfp4Config(
  dequantize=True))`` on CPU loads our gpt-oss MXFP4 output; every expert weight equals our
  ``fake_quantize`` of the BF16 source bit for bit (int16 views), every other weight is unchanged;
- compressed-tensors 0.20 (``CompressedTensorsDequantizer`` + ``convert_checkpoint``, which read
  our ``config.json`` ``quantization_config``) decompresses our ``mxfp4-pack-quantized`` Qwen3-MoE
  tensors to the same bits.

Sources are tiny real models (transformers classes, tiny configs, ``save_pretrained``) whose expert
weights are drawn from the adversarial input families (megatron_qat.numerics.families), so the
loaders see ties, scale ceilings, subnormals and extreme magnitudes, not only Gaussian noise.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from _helpers import bits, one_line_error, require

transformers = require("transformers", "transformers>=5 is a test dependency ([export] extra)", minversion="5.0")
require("compressed_tensors", "compressed-tensors>=0.20 is a test dependency ([export] extra)")

from safetensors.torch import load_file, save_file  # noqa: E402

from megatron_qat import mxfp4  # noqa: E402
from megatron_qat.cli import main  # noqa: E402
from megatron_qat.numerics import families  # noqa: E402

H, I, E, LAYERS = 64, 64, 4, 2


def _fill(shape, seed):
    """A [..., out, in] BF16 tensor, each row-block of experts from another finite family."""
    fams = families.FINITE_FAMILIES
    return families.make(fams[seed % len(fams)], shape, torch.bfloat16, seed=seed)


@pytest.fixture(scope="module")
def gpt_oss_src(tmp_path_factory):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=128, hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=32, num_local_experts=E, num_experts_per_tok=2,
                       layer_types=["sliding_attention", "full_attention"])
    model = GptOssForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for L, layer in enumerate(model.model.layers):
            ex = layer.mlp.experts  # gate_up_proj [E, H, 2I] (in = H), down_proj [E, I, H] (in = I)
            ex.gate_up_proj.copy_(_fill((E, 2 * I, H), 10 * L).transpose(1, 2))
            ex.down_proj.copy_(_fill((E, H, I), 10 * L + 1).transpose(1, 2))
    path = tmp_path_factory.mktemp("gpt_oss_bf16")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def qwen3_src(tmp_path_factory):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=H, intermediate_size=128, moe_intermediate_size=I, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=E, num_experts_per_tok=2,
                         decoder_sparse_step=1, mlp_only_layers=[])
    model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for L, layer in enumerate(model.model.layers):
            ex = layer.mlp.experts  # transformers-v5 in memory: gate_up_proj [E, 2I, H], down_proj [E, H, I]
            ex.gate_up_proj.copy_(_fill((E, 2 * I, H), 10 * L + 2))
            ex.down_proj.copy_(_fill((E, H, I), 10 * L + 3))
    path = tmp_path_factory.mktemp("qwen3_bf16")
    model.save_pretrained(path)  # writes per-expert experts.N.{gate,up,down}_proj.weight
    return str(path)


def _export(src, fmt, dst, *extra):
    return main(["export", src, "--format", fmt, "--out", str(dst), "--no-progress", *extra])


@pytest.fixture(scope="module")
def gpt_oss_dst(gpt_oss_src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "gpt_oss_mxfp4"
    assert _export(gpt_oss_src, "gpt-oss", dst, "--max-shard-gib", str(40e3 / 2**30)) == 0
    return str(dst)


@pytest.fixture(scope="module")
def qwen3_dst(qwen3_src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "qwen3_ct"
    assert _export(qwen3_src, "compressed-tensors", dst) == 0
    return str(dst)


def test_transformers_loads_gpt_oss_mxfp4_bit_exact(gpt_oss_src, gpt_oss_dst):
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(gpt_oss_dst, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16)
    src = load_file(os.path.join(gpt_oss_src, "model.safetensors"))
    checked = 0
    for name, p in model.named_parameters():
        s = src[name]
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out]; blocks run along in
            s = mxfp4.fake_quantize(s.transpose(1, 2).contiguous()).transpose(1, 2)
            checked += 1
        assert p.dtype == s.dtype and p.shape == s.shape, name
        assert torch.equal(bits(p), bits(s)), name
    assert checked == 2 * LAYERS


def test_gpt_oss_output_layout_config_index_and_provenance(gpt_oss_dst):
    cfg = json.load(open(os.path.join(gpt_oss_dst, "config.json")))
    assert cfg["quantization_config"] == {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    prov = cfg["megatron_qat"]
    assert prov["block_size"] == 32 and prov["format"] == "gpt-oss" and "FlashInfer" in prov["numerics"] and prov["version"]
    index = json.load(open(os.path.join(gpt_oss_dst, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)  # small --max-shard-gib
    tensors = {}
    for s in shards:
        tensors.update(load_file(os.path.join(gpt_oss_dst, s)))
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    b = tensors["model.layers.1.mlp.experts.gate_up_proj_blocks"]
    assert b.dtype == torch.uint8 and tuple(b.shape) == (E, 2 * I, H // 32, 16)
    assert tuple(tensors["model.layers.1.mlp.experts.gate_up_proj_scales"].shape) == (E, 2 * I, H // 32)
    assert tuple(tensors["model.layers.1.mlp.experts.down_proj_blocks"].shape) == (E, H, I // 32, 16)
    assert tensors["model.layers.1.mlp.experts.gate_up_proj_bias"].dtype == torch.bfloat16  # copied unchanged
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in tensors)
    assert not [n for n in os.listdir(os.path.dirname(gpt_oss_dst)) if ".partial-" in n]


def test_compressed_tensors_decompresses_to_fake_quantize_bits(qwen3_src, qwen3_dst, tmp_path):
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer, convert_checkpoint

    out = tmp_path / "dequantized"
    convert_checkpoint(qwen3_dst, str(out), CompressedTensorsDequantizer(qwen3_dst), device="cpu", max_workers=1)
    got = load_file(str(out / "model.safetensors"))
    src = load_file(os.path.join(qwen3_src, "model.safetensors"))
    assert set(got) == set(src)
    experts = [n for n in src if ".mlp.experts." in n]
    assert len(experts) == 3 * E * LAYERS
    for name, s in src.items():
        want = mxfp4.fake_quantize(s) if name in experts else s
        assert got[name].dtype == want.dtype and torch.equal(bits(got[name]), bits(want)), name


def test_transformers_loads_the_compressed_tensors_export_bit_exact(qwen3_src, qwen3_dst):
    """README's loader line: transformers 5.x decompresses our ``mxfp4-pack-quantized`` experts on
    load into its fused ``[E, 2I, H]`` / ``[E, H, I]`` parameters, equal to fake_quantize(source)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen3_dst, dtype=torch.bfloat16)
    src = load_file(os.path.join(qwen3_src, "model.safetensors"))
    for L, layer in enumerate(model.model.layers):
        for e in range(E):
            name = f"model.layers.{L}.mlp.experts.{e}.{{}}_proj.weight"
            gate_up = torch.cat([src[name.format("gate")], src[name.format("up")]])
            assert torch.equal(bits(layer.mlp.experts.gate_up_proj[e]), bits(mxfp4.fake_quantize(gate_up))), (L, e)
            assert torch.equal(bits(layer.mlp.experts.down_proj[e]), bits(mxfp4.fake_quantize(src[name.format("down")]))), (L, e)
    assert torch.equal(bits(model.model.layers[0].self_attn.q_proj.weight), bits(src["model.layers.0.self_attn.q_proj.weight"]))


def test_compressed_tensors_config_is_the_mxfp4a16_preset(qwen3_dst):
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.quant_scheme import MXFP4A16

    cfg = json.load(open(os.path.join(qwen3_dst, "config.json")))
    qc = QuantizationConfig.model_validate(cfg["quantization_config"])
    assert qc.format == "mxfp4-pack-quantized" and qc.quantization_status == "compressed"
    (scheme,) = qc.config_groups.values()
    assert scheme.weights == MXFP4A16["weights"] and scheme.input_activations is None
    assert "lm_head" in qc.ignore and "model.layers.0.mlp.gate" in qc.ignore and "model.layers.1.self_attn.q_proj" in qc.ignore
    assert not any(".experts." in n for n in qc.ignore)
    t = load_file(os.path.join(qwen3_dst, "model.safetensors"))
    assert t["model.layers.0.mlp.experts.3.gate_proj.weight_packed"].dtype == torch.uint8
    assert tuple(t["model.layers.0.mlp.experts.3.gate_proj.weight_packed"].shape) == (I, H // 2)
    assert tuple(t["model.layers.0.mlp.experts.3.down_proj.weight_scale"].shape) == (H, I // 32)


def test_fused_transformers_v5_dump_converts_to_the_same_bytes(qwen3_src, qwen3_dst, tmp_path):
    """A raw transformers-v5 ``state_dict()`` dump (fused ``gate_up_proj [E, 2I, H]`` CONCAT) gives the
    same per-expert compressed-tensors bytes as the per-expert checkpoint."""
    from transformers import Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM.from_pretrained(qwen3_src, dtype=torch.bfloat16)
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings},
              str(fused / "model.safetensors"))
    (fused / "config.json").write_text(open(os.path.join(qwen3_src, "config.json")).read())
    assert _export(str(fused), "compressed-tensors", tmp_path / "ct") == 0
    a = load_file(str(tmp_path / "ct" / "model.safetensors"))
    b = load_file(os.path.join(qwen3_dst, "model.safetensors"))
    assert set(a) == set(b)
    for k in b:
        assert torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8)), k


def test_verify_passes_and_catches_one_flipped_byte(gpt_oss_src, gpt_oss_dst, qwen3_src, qwen3_dst, tmp_path, capsys):
    assert main(["export", "--verify", gpt_oss_dst, "--source", gpt_oss_src]) == 0
    assert main(["export", "--verify", qwen3_dst, "--source", qwen3_src]) == 0
    assert "EXPORT PARITY OK" in capsys.readouterr().out
    bad = tmp_path / "bad"
    bad.mkdir()
    for n in os.listdir(qwen3_dst):
        data = open(os.path.join(qwen3_dst, n), "rb").read()
        (bad / n).write_bytes(data)
    t = load_file(str(bad / "model.safetensors"))
    t["model.layers.1.mlp.experts.2.up_proj.weight_scale"][5, 1] += 1
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert main(["export", "--verify", str(bad), "--source", qwen3_src]) == 1
    out = capsys.readouterr().out
    assert "EXPORT PARITY MISMATCH" in out and "experts.2.up_proj.weight_packed" in out and "[5, " in out


def test_parity_source_checks_the_shipped_bytes(gpt_oss_src, gpt_oss_dst, qwen3_src, qwen3_dst, tmp_path, capsys):
    """Issue 10 item 4's spelling: ``megatron-qat parity DST --source SRC`` (same check as --verify,
    parity's exit codes and --json)."""
    report = tmp_path / "r.json"
    assert main(["parity", gpt_oss_dst, "--source", gpt_oss_src, "--json", str(report)]) == 0
    doc = json.loads(report.read_text())
    assert doc["status"] == "equal" and doc["exit_code"] == 0 and doc["expert_tensors"] > 0
    bad = tmp_path / "bad"
    bad.mkdir()
    for n in os.listdir(qwen3_dst):
        (bad / n).write_bytes(open(os.path.join(qwen3_dst, n), "rb").read())
    t = load_file(str(bad / "model.safetensors"))
    t["model.layers.0.mlp.experts.1.down_proj.weight_packed"][0, 0] ^= 0x01
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert main(["parity", str(bad), "--source", qwen3_src]) == 1
    assert "EXPORT PARITY MISMATCH" in capsys.readouterr().out
    assert main(["parity", str(bad), qwen3_dst, "--source", qwen3_src]) == 2
    assert "exactly one PATH" in capsys.readouterr().err


def test_refuses_already_quantized_source(gpt_oss_dst, tmp_path, capsys):
    assert _export(gpt_oss_dst, "gpt-oss", tmp_path / "x") == 2
    one_line_error(capsys.readouterr().err, "export", "already quantized", "mxfp4")
    assert not (tmp_path / "x").exists()


def _copy_with(src, dst, edit):
    os.makedirs(dst)
    t = load_file(os.path.join(src, "model.safetensors"))
    edit(t)
    save_file(t, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(open(os.path.join(src, "config.json")).read())


def test_refuses_nonfinite_weight_naming_tensor_and_row(qwen3_src, tmp_path, capsys):
    def poison(t):
        t["model.layers.1.mlp.experts.3.down_proj.weight"][17, 4] = float("nan")

    _copy_with(qwen3_src, tmp_path / "nan", poison)
    assert _export(str(tmp_path / "nan"), "compressed-tensors", tmp_path / "x") == 2
    one_line_error(capsys.readouterr().err, "export", "model.layers.1.mlp.experts.3.down_proj.weight", "row 17", "non-finite")
    assert not (tmp_path / "x").exists() and not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def test_refuses_in_features_not_multiple_of_32(qwen3_src, tmp_path, capsys):
    def narrow(t):
        t["model.layers.0.mlp.experts.1.down_proj.weight"] = t["model.layers.0.mlp.experts.1.down_proj.weight"][:, :48].contiguous()

    _copy_with(qwen3_src, tmp_path / "k48", narrow)
    assert _export(str(tmp_path / "k48"), "compressed-tensors", tmp_path / "x") == 2
    one_line_error(capsys.readouterr().err, "export", "experts.1.down_proj.weight", "in_features = 48", "multiple of the MXFP4 block size 32")
    assert not (tmp_path / "x").exists()


def test_refuses_format_family_mismatch_and_existing_out(gpt_oss_src, qwen3_src, tmp_path, capsys):
    assert _export(qwen3_src, "gpt-oss", tmp_path / "x") == 2
    one_line_error(capsys.readouterr().err, "export", "needs a gpt_oss checkpoint", "qwen3_moe")
    assert _export(gpt_oss_src, "compressed-tensors", tmp_path / "x") == 2
    one_line_error(capsys.readouterr().err, "export", "use --format gpt-oss")
    (tmp_path / "exists").mkdir()
    assert _export(qwen3_src, "compressed-tensors", tmp_path / "exists") == 2
    one_line_error(capsys.readouterr().err, "export", "already exists")
    assert _export(str(tmp_path / "nowhere"), "compressed-tensors", tmp_path / "y") == 2
    one_line_error(capsys.readouterr().err, "export", "nowhere: no such file or directory")


def test_progress_line_on_stderr(qwen3_src, tmp_path, capsys):
    assert main(["export", qwen3_src, "--format", "compressed-tensors", "--out", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert "export: " in err and "tensors" in err and "(100%)" in err


def test_side_files_copied_but_not_other_weight_files(qwen3_src, tmp_path):
    _copy_with(qwen3_src, tmp_path / "src", lambda t: None)
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(b"stale bf16 weights")
    assert _export(str(tmp_path / "src"), "compressed-tensors", tmp_path / "out") == 0
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json"]
