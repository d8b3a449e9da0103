"""A wrong ``--layout`` is refused, not obeyed into blocking along out_features (issue 8 item 5).

gpt-oss stores ``gate_up_proj [E, H, 2I]`` / ``down_proj [E, I, H]`` (``[E, in, out]``); read as
transformers-v5 qwen3_moe (``[E, out, in]``) the 32-blocks would run along out_features and, on a
checkpoint without config.json, nothing would say so. The layer's gate_up and down shapes then
contradict each other (gate_up's in_features != down's out_features), which
:func:`megatron_qat.layouts.check_fused_pairs` refuses in parity and in export alike. Checkpoints
are tiny real models saved by transformers 5.x (tests/_tiny_hf.py).
"""

import os
import shutil

import pytest

from _helpers import one_line_error, require
from megatron_qat import layouts
from megatron_qat.cli import main

require("transformers", "transformers>=5 is a test dependency ([export] extra)", minversion="5.0")

import _tiny_hf  # noqa: E402


@pytest.fixture(scope="module")
def gpt_oss_no_config(tmp_path_factory):
    src = tmp_path_factory.mktemp("gpt_oss_src")
    _tiny_hf.build("gpt_oss", src)
    bare = tmp_path_factory.mktemp("gpt_oss_bare")
    shutil.copy(src / "model.safetensors", bare / "model.safetensors")
    return str(src), str(bare)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_parity_refuses_an_out_in_layout_on_a_gpt_oss_checkpoint(gpt_oss_no_config, family, capsys):
    _, bare = gpt_oss_no_config
    assert main(["parity", "--quiet", "--reference", "golden", "--layout", family, bare]) == 2
    one_line_error(capsys.readouterr().err, "parity", "experts.gate_up_proj [4, 64, 192]", "experts.down_proj [4, 96, 64]",
              f"not {family}", "--layout")


def test_parity_with_the_right_layout_still_passes(gpt_oss_no_config, capsys):
    _, bare = gpt_oss_no_config
    assert main(["parity", "--quiet", "--reference", "golden", "--layout", "gpt_oss", bare]) == 0


def test_export_refuses_a_wrong_layout_before_writing(gpt_oss_no_config, tmp_path, capsys):
    src, _ = gpt_oss_no_config
    out = tmp_path / "ct"
    assert main(["export", src, "--layout", "qwen3_moe", "--format", "compressed-tensors", "--out", str(out), "--no-progress"]) == 2
    one_line_error(capsys.readouterr().err, "export", "not qwen3_moe", "--layout")
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def test_check_fused_pairs_square_gpt_oss_120b_shapes():
    """gpt-oss-120b has H == I == 2880: the swap is still caught (2I != I)."""
    gu, dn = ("model.layers.0.mlp.experts.gate_up_proj", (128, 2880, 5760)), ("model.layers.0.mlp.experts.down_proj", (128, 2880, 2880))
    layouts.check_fused_pairs([gu, dn], "gpt_oss")
    with pytest.raises(layouts.LayoutError, match="contradict family qwen3_moe"):
        layouts.check_fused_pairs([gu, dn], "qwen3_moe")
    layouts.check_fused_pairs([gu], "qwen3_moe")  # one tensor alone: nothing to cross-check


# ------------------------------------------------------------------ Llama-4 is no gpt-oss (issue 17)
# Llama-4 stores fused experts as gpt-oss does ([E, in, out]), but its gate/up halves are
# CONCATENATED where gpt-oss INTERLEAVES them, so no shape check can tell them apart: the config's
# family decides (layouts.check_override), and the gpt-oss writer refuses a fused tensor that is
# not where a gpt-oss checkpoint keeps it (feed_forward.experts vs mlp.experts).


def _gpt_oss_style_export(src, dst):
    """What the exporter used to write for ``export LLAMA4 --format gpt-oss --layout gpt_oss``:
    each fused expert tensor encoded along in_features under the gpt-oss name, the rest copied."""
    import json
    import re

    from safetensors.torch import load_file, save_file

    from megatron_qat import mxfp4

    out = {}
    for name, w in load_file(os.path.join(src, "model.safetensors")).items():
        m = re.match(r"model\.layers\.(\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)$", name)
        if m is None:
            out[name] = w
            continue
        codes, scales = mxfp4.quantize(w.transpose(1, 2).contiguous(), 32)
        base = f"model.layers.{m.group(1)}.mlp.experts.{m.group(2)}"
        out[base + "_blocks"], out[base + "_scales"] = codes.reshape(*codes.shape[:-1], -1, 16).contiguous(), scales
    os.makedirs(dst)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(src, "config.json")))
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    json.dump(config, open(os.path.join(dst, "config.json"), "w"))


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    src = tmp_path_factory.mktemp("llama4") / "bf16"
    _tiny_hf.build("llama4", src)
    dst = tmp_path_factory.mktemp("llama4") / "as_gpt_oss"
    _gpt_oss_style_export(str(src), str(dst))
    return str(src), str(dst)


def test_export_refuses_llama4_as_gpt_oss(llama4, tmp_path, capsys):
    src, _ = llama4
    capsys.readouterr()
    out = tmp_path / "o"
    assert main(["export", src, "--format", "gpt-oss", "--layout", "gpt_oss", "--out", str(out), "--no-progress"]) == 2
    one_line_error(capsys.readouterr().err, "export", "--layout gpt_oss contradicts", "llama4", "concatenated", "interleaved")
    assert os.listdir(tmp_path) == []


def test_parity_source_refuses_llama4_as_gpt_oss_never_ok(llama4, capsys):
    src, dst = llama4
    capsys.readouterr()
    assert main(["parity", dst, "--source", src, "--layout", "gpt_oss"]) == 2
    one_line_error(capsys.readouterr().err, "parity", "--layout gpt_oss contradicts", "llama4")
    assert main(["export", "--verify", dst, "--source", src, "--layout", "gpt_oss"]) == 2
    one_line_error(capsys.readouterr().err, "export", "--layout gpt_oss contradicts")


def test_llama4_whose_config_claims_gpt_oss_is_refused_by_where_its_experts_are(llama4, tmp_path, capsys):
    import json

    src, _ = llama4
    capsys.readouterr()
    lying = tmp_path / "lying"
    shutil.copytree(src, lying)
    config = json.loads((lying / "config.json").read_text())
    config.update(model_type="gpt_oss", architectures=["GptOssForCausalLM"])
    (lying / "config.json").write_text(json.dumps(config))
    assert main(["export", str(lying), "--format", "gpt-oss", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    one_line_error(capsys.readouterr().err, "export", "model.layers.0.feed_forward.experts.", "model.layers.0.mlp.experts.", "no gpt_oss")
    assert sorted(os.listdir(tmp_path)) == ["lying"]
