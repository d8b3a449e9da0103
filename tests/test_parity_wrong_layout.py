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

from megatron_qat import layouts
from megatron_qat.cli import main

pytest.importorskip("transformers", minversion="5.0")

import _tiny_hf  # noqa: E402


@pytest.fixture(scope="module")
def gpt_oss_no_config(tmp_path_factory):
    src = tmp_path_factory.mktemp("gpt_oss_src")
    _tiny_hf.build("gpt_oss", src)
    bare = tmp_path_factory.mktemp("gpt_oss_bare")
    shutil.copy(src / "model.safetensors", bare / "model.safetensors")
    return str(src), str(bare)


def _one_line(capsys, prefix, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(prefix), err
    for n in needles:
        assert n in err[0], (n, err[0])


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_parity_refuses_an_out_in_layout_on_a_gpt_oss_checkpoint(gpt_oss_no_config, family, capsys):
    _, bare = gpt_oss_no_config
    assert main(["parity", "--quiet", "--reference", "golden", "--layout", family, bare]) == 2
    _one_line(capsys, "megatron-qat parity: error: ", "experts.gate_up_proj [4, 64, 192]", "experts.down_proj [4, 96, 64]",
              f"not {family}", "--layout")


def test_parity_with_the_right_layout_still_passes(gpt_oss_no_config, capsys):
    _, bare = gpt_oss_no_config
    assert main(["parity", "--quiet", "--reference", "golden", "--layout", "gpt_oss", bare]) == 0


def test_export_refuses_a_wrong_layout_before_writing(gpt_oss_no_config, tmp_path, capsys):
    src, _ = gpt_oss_no_config
    out = tmp_path / "ct"
    assert main(["export", src, "--layout", "qwen3_moe", "--format", "compressed-tensors", "--out", str(out), "--no-progress"]) == 2
    _one_line(capsys, "megatron-qat export: error: ", "not qwen3_moe", "--layout")
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def test_check_fused_pairs_square_gpt_oss_120b_shapes():
    """gpt-oss-120b has H == I == 2880: the swap is still caught (2I != I)."""
    gu, dn = ("model.layers.0.mlp.experts.gate_up_proj", (128, 2880, 5760)), ("model.layers.0.mlp.experts.down_proj", (128, 2880, 2880))
    layouts.check_fused_pairs([gu, dn], "gpt_oss")
    with pytest.raises(layouts.LayoutError, match="contradict family qwen3_moe"):
        layouts.check_fused_pairs([gu, dn], "qwen3_moe")
    layouts.check_fused_pairs([gu], "qwen3_moe")  # one tensor alone: nothing to cross-check
