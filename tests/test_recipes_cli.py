"""Issue 15 item 5 in the command-line tools: the recipe (``--recipe``, default ``MEGATRON_QAT_RECIPE``).

- ``megatron-qat parity --recipe R`` checks ours under R's WEIGHT rule against the golden model of
  that rule (NumPy, independent of megatron_qat.mxfp4); FlashInfer's ``fp4_quantize`` serves only
  ``flashinfer-mxfp4``. R's MXFP8 activation rule is compared with ``flashinfer.mxfp8_quantize``
  on sm_100+ only: here (no GPU) the run says so and is INCOMPLETE; the adapter and its canary are
  checked against an independent NumPy-free MXFP8 stand-in on a pretend sm_100 / sm_90 GPU.
- ``megatron-qat export --recipe R`` ships bytes made under R's weight rule and names the rule in
  its provenance; ``parity DST --source SRC`` checks them under that rule, and a ``--recipe`` whose
  weight rule is another is refused.
- the live export follows the running fake-QAT's recipe: the decoded bytes are the weights the
  patched forward used.
"""

from __future__ import annotations

import json
import os
import types

import pytest
import torch

import _tiny_hf
from _helpers import bits, one_line_error
from megatron_qat import mxfp4
from megatron_qat.cli import main
from megatron_qat.numerics import families
from megatron_qat.numerics.rules import (
    FLASHINFER_MXFP4,
    FLASHINFER_MXFP8,
    RECIPES,
    TIES_DOWN_MXFP4,
    VLLM_ONLINE_MXFP4,
)
from megatron_qat.parity import activations, compare
from megatron_qat.parity import references as refs
from megatron_qat.parity.errors import ParityError

WEIGHT_RECIPES = ("flashinfer-w4a16", "vllm-online-w4a16", "modelopt-w4a16", "vllm-online-w4a4")


def _parity(tmp_path, capsys, *argv):
    report = tmp_path / "r.json"
    code = main(["parity", "--quiet", "--json", str(report), *argv])
    return code, json.loads(report.read_text()), capsys.readouterr()


@pytest.mark.parametrize("recipe", WEIGHT_RECIPES)
def test_parity_checks_the_recipes_weight_rule_against_its_golden_model(recipe, tmp_path, capsys):
    code, doc, out = _parity(tmp_path, capsys, "--recipe", recipe)
    rule = RECIPES[recipe].weights.name
    assert code == 0, out.out[-2000:]
    assert (doc["recipe"], doc["rule"], doc["reference"]["name"], doc["reference"]["rule"], doc["ours"]["rule"]) == (
        recipe, rule, "golden", rule, rule)
    assert f"under rule {rule}" in out.out.strip().splitlines()[-1]
    if recipe == "vllm-online-w4a4":  # activations under the weight rule itself: covered by the weight check
        assert doc["activations"]["status"] == "equal" and doc["activations"]["rule"] == rule


def test_the_environments_recipe_is_the_default(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEGATRON_QAT_RECIPE", "modelopt-w4a16")
    code, doc, _ = _parity(tmp_path, capsys)
    assert code == 0 and (doc["recipe"], doc["rule"]) == ("modelopt-w4a16", TIES_DOWN_MXFP4.name)


@pytest.mark.parametrize("ours_rule,golden_rule", [(TIES_DOWN_MXFP4, FLASHINFER_MXFP4), (FLASHINFER_MXFP4, VLLM_ONLINE_MXFP4),
                                                    (VLLM_ONLINE_MXFP4, TIES_DOWN_MXFP4)], ids=str)
def test_the_rules_are_told_apart(ours_rule, golden_rule):
    """The check has teeth: ours under one rule against the golden model of another differs."""
    x = torch.cat([families.make(f, (64, 256), torch.bfloat16, seed=1) for f in ("ties", "amax_1p75x2k_pm_ulp", "subnormal")])
    ref = refs.GoldenReference("test", golden_rule).quantize(x)
    ours = refs.Ours("cpu", None, 32, ours_rule).run(x)
    result = compare.TensorResult("t", None, list(x.shape), "bfloat16", x.numel())
    compare.compare_batch(result, compare.BatchInput(x, torch.arange(x.shape[0]), tuple(x.shape)), ref, ours, False)
    assert result.code_mismatches + result.scale_mismatches > 0


def test_flashinfer_reference_is_refused_for_another_weight_rule(capsys):
    assert main(["parity", "--quiet", "--recipe", "vllm-online-w4a16", "--reference", "flashinfer"]) == 2
    one_line_error(capsys.readouterr().err, "parity", "fp4_quantize makes rule flashinfer-mxfp4", "vllm-online-mxfp4", "--reference golden")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a GPU")
def test_mxfp8_activation_rule_without_a_gpu_is_incomplete_never_ok(tmp_path, capsys):
    code, doc, out = _parity(tmp_path, capsys, "--recipe", "flashinfer-trtllm-w4a8")
    assert code == 3 and doc["status"] == "incomplete" and doc["activations"]["status"] == "not compared"
    assert any("activation rule flashinfer-mxfp8 not compared" in r for r in doc["incomplete"])
    assert out.out.strip().splitlines()[-1].startswith("PARITY INCOMPLETE")
    code, doc, out = _parity(tmp_path, capsys, "--recipe", "flashinfer-trtllm-w4a8", "--allow-incomplete")
    assert code == 0 and out.out.strip().splitlines()[-1].startswith("PARITY OK (INCOMPLETE")


# ------------------------------------------------------------------ the MXFP8 activation adapter
def _mxfp8_standin(garbage: bool = False):
    """FlashInfer's MXFP8 rule from its definition (rules.py docstring), with torch's own float8 cast
    for the RNE satfinite step: p = amax * fp32(1/448); byte = ceil(log2 p) + 127 (frexp); elements
    x * 2**(127 - byte) (0 for bytes 0 and 254) clamped to +-448. Scales come back flat, rows padded to 128, as FlashInfer's
    linear layout does."""
    def mxfp8_quantize(x, is_sf_swizzled_layout=True, alignment=32, enable_pdl=None, backend="cuda"):
        assert (is_sf_swizzled_layout, alignment, backend) == (False, x.shape[-1], "cute-dsl")
        rows, k = x.shape
        blocks = x.float().reshape(rows, k // 32, 32)
        p = blocks.abs().amax(-1) * torch.tensor(1 / 448, dtype=torch.float32)
        mant, expo = torch.frexp(p)
        byte = torch.where(p > 0, expo - 1 + (mant != 0.5).int() + 127, torch.zeros_like(expo)).clamp(0, 254)
        mult = torch.where((byte > 0) & (byte < 254), torch.pow(2.0, 127 - byte.double()), 0.0).float()  # bytes 0, 254: 0
        v = (blocks * mult[..., None]).clamp(-448, 448)
        codes = v.reshape(rows, k).to(torch.float8_e4m3fn)
        flat = torch.full((((rows + 127) // 128) * 128 * k // 32,), 0x77, dtype=torch.uint8)
        flat[: rows * k // 32] = byte.to(torch.uint8).reshape(-1)
        if garbage:
            codes = torch.full((rows, k), 0xA5, dtype=torch.uint8).view(torch.float8_e4m3fn)
        return codes, flat

    def mxfp8_dequantize_host(codes, scales, is_sf_swizzled_layout=True):
        rows, k = codes.shape
        scale = torch.pow(2.0, scales.reshape(rows, k // 32).double() - 127)
        return (codes.double().reshape(rows, k // 32, 32) * scale[..., None]).float().reshape(rows, k)

    return types.SimpleNamespace(mxfp8_quantize=mxfp8_quantize, mxfp8_dequantize_host=mxfp8_dequantize_host)


def _pretend_gpu(monkeypatch, cap, fake):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Pretend GPU")
    monkeypatch.setattr(activations, "FLASHINFER_DEVICE", "cpu")
    monkeypatch.setattr(refs, "_import_flashinfer", lambda: fake)


W4A8 = RECIPES["flashinfer-trtllm-w4a8"]


def test_hand_built_mxfp8_canary_is_what_our_rule_gives():
    x, codes, scales = activations.canary()
    got_codes, got_scales = mxfp4.quantize(x, 32, rule=FLASHINFER_MXFP8)
    assert torch.equal(got_codes, codes) and torch.equal(got_scales, scales)


def test_mxfp8_activations_against_the_flashinfer_adapter_on_sm100(monkeypatch):
    _pretend_gpu(monkeypatch, (10, 0), _mxfp8_standin())
    result = activations.check_activations(W4A8, "auto", False, "cpu", None)
    assert result["status"] == "equal", {k: v for k, v in result.items() if k != "tensors"}
    assert result["rule"] == FLASHINFER_MXFP8.name and "canary passed" in result["reason"]
    assert len(result["tensors"]) == len(families.FINITE_FAMILIES) * len(families.SYNTHETIC_DTYPES)


def test_mxfp8_canary_refuses_garbage_and_sm90_is_refused_or_not_compared(monkeypatch):
    _pretend_gpu(monkeypatch, (10, 0), _mxfp8_standin(garbage=True))
    with pytest.raises(ParityError, match="MXFP8 canary failed"):
        activations.check_activations(W4A8, "auto", False, "cpu", None)
    _pretend_gpu(monkeypatch, (9, 0), _mxfp8_standin(garbage=True))
    result = activations.check_activations(W4A8, "auto", False, "cpu", None)
    assert result["status"] == "not compared" and "compute capability >= 10.0" in result["reason"]
    with pytest.raises(ParityError, match=r"9\.0 < 10\.0"):
        activations.check_activations(W4A8, "flashinfer", False, "cpu", None)
    with pytest.raises(ParityError, match="MXFP8 canary failed"):  # --allow-unsupported-gpu: the canary refuses sm_90
        activations.check_activations(W4A8, "flashinfer", True, "cpu", None)


# ------------------------------------------------------------------ export under the recipe's weight rule
@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    src = tmp_path_factory.mktemp("qwen3") / "bf16"
    _tiny_hf.write_per_expert(src, experts=2, hidden=128, inter=64)
    return src


def _export(src, out, *extra, env=None):
    return main(["export", str(src), "--format", "compressed-tensors", "--out", str(out), "--no-progress", *extra])


def test_export_ships_the_recipes_weight_rule_and_names_it(qwen3, tmp_path, capsys):
    from safetensors.torch import load_file

    assert _export(qwen3, tmp_path / "vllm", "--recipe", "vllm-online-w4a16") == 0
    assert _export(qwen3, tmp_path / "fi") == 0
    prov = json.loads((tmp_path / "vllm" / "config.json").read_text())["megatron_qat"]
    assert (prov["recipe"], prov["rule"]) == ("vllm-online-w4a16", VLLM_ONLINE_MXFP4.name) and "vLLM" in prov["numerics"]
    assert json.loads((tmp_path / "fi" / "config.json").read_text())["megatron_qat"]["rule"] == FLASHINFER_MXFP4.name
    src, shipped, default = (load_file(str(d / "model.safetensors")) for d in (qwen3, tmp_path / "vllm", tmp_path / "fi"))
    name = "model.layers.0.mlp.experts.1.down_proj.weight"
    decoded = mxfp4.dequantize(shipped[name + "_packed"], shipped[name.replace("weight", "weight_scale")], torch.bfloat16,
                               rule=VLLM_ONLINE_MXFP4)
    assert torch.equal(bits(decoded), bits(mxfp4.fake_quantize(src[name], rule=VLLM_ONLINE_MXFP4)))
    assert not torch.equal(shipped[name.replace("weight", "weight_scale")], default[name.replace("weight", "weight_scale")])
    capsys.readouterr()
    assert main(["parity", str(tmp_path / "vllm"), "--source", str(qwen3)]) == 0
    assert "rule vllm-online-mxfp4" in capsys.readouterr().out
    assert main(["parity", str(tmp_path / "vllm"), "--source", str(qwen3), "--recipe", "vllm-online-w4a4"]) == 0
    assert main(["export", "--verify", str(tmp_path / "vllm"), "--source", str(qwen3), "--recipe", "flashinfer-w4a16"]) == 2
    one_line_error(capsys.readouterr().err, "export", "--recipe flashinfer-w4a16", "contradicts", "vllm-online-mxfp4")


def test_export_default_recipe_comes_from_the_environment(qwen3, tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_QAT_RECIPE", "modelopt-w4a16")
    assert _export(qwen3, tmp_path / "o") == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["megatron_qat"]["rule"] == TIES_DOWN_MXFP4.name
    assert main(["parity", str(tmp_path / "o"), "--source", str(qwen3)]) == 0


def test_an_export_whose_record_names_no_rule_is_checked_under_the_recipe(qwen3, tmp_path, capsys):
    """Exports written before rules existed carry no ``megatron_qat.rule``: --recipe (default the
    environment's) says which rule; the wrong one is a mismatch, not a pass."""
    assert _export(qwen3, tmp_path / "o", "--recipe", "modelopt-w4a16") == 0
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    del config["megatron_qat"]["rule"]
    (tmp_path / "o" / "config.json").write_text(json.dumps(config))
    assert main(["parity", str(tmp_path / "o"), "--source", str(qwen3), "--recipe", "modelopt-w4a16"]) == 0
    assert main(["parity", str(tmp_path / "o"), "--source", str(qwen3)]) == 1
    assert "EXPORT PARITY MISMATCH" in capsys.readouterr().out


def test_live_export_follows_the_running_recipe_and_decodes_to_the_forwards_weights(monkeypatch):
    """With fake-QAT on under ``modelopt-w4a16`` (real megatron-core TEGroupedMLP, TE stand-in), the
    raw export decodes to exactly what the patched ``_get_weight_tensors`` hands TE."""
    import megatron_qat.megatron as mm
    from test_export_live import MegatronGroupedLinear, build_chunk, global_weights, make_config, pg_collection

    from _helpers import require
    from megatron_qat.export import ExpertGroups, export_mxfp4

    require("megatron.core", "megatron-core is a test dependency ([megatron] extra)")
    import megatron.core.extensions.transformer_engine as ext

    monkeypatch.setattr(ext, "TEGroupedLinear", MegatronGroupedLinear)
    w = global_weights(0, 4, True)
    chunk = build_chunk([1], make_config(), pg_collection(), lambda k: w)
    experts = chunk.decoder.layers[0].mlp.experts
    mm.disable()
    mm.enable(block_size=32, recipe="modelopt-w4a16")
    try:
        got = dict(export_mxfp4(chunk, "raw", groups=ExpertGroups()))
        for role in ("fc1", "fc2"):
            used = getattr(experts, f"linear_{role}")._get_weight_tensors()
            for e, u in enumerate(used):
                name = f"decoder.layers.0.mlp.experts.linear_{role}.weight{e}"
                dec = mxfp4.dequantize(got[name + ".mxfp4_codes"], got[name + ".mxfp4_scales"], torch.bfloat16, rule=TIES_DOWN_MXFP4)
                assert torch.equal(bits(dec), bits(u)), name
                assert torch.equal(bits(dec), bits(mxfp4.fake_quantize(w[role][e], rule=TIES_DOWN_MXFP4))), name
    finally:
        mm.disable()
    assert os.environ.get("MEGATRON_QAT_RECIPE") is None


def test_a_malformed_recipe_variable_is_one_line_and_recorded(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEGATRON_QAT_RECIPE", "flashinfer-w4a4")
    report = tmp_path / "r.json"
    assert main(["parity", "--quiet", "--json", str(report)]) == 2
    one_line_error(capsys.readouterr().err, "parity", "MEGATRON_QAT_RECIPE='flashinfer-w4a4'", "flashinfer-w4a16")
    doc = json.loads(report.read_text())
    assert (doc["status"], doc["exit_code"], doc["recipe"]) == ("error", 2, None)
