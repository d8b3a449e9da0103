"""megatron_qat.numerics.rules: the four named rules, the five recipes, the registry, and that the
module is importable without torch (config.py reads the recipe names at interpreter start)."""

import subprocess
import sys

import pytest

from megatron_qat.numerics import constants
from megatron_qat.numerics.rules import (
    DEFAULT_RECIPE,
    FLASHINFER_MXFP4,
    FLASHINFER_MXFP8,
    RECIPES,
    RULES,
    TIES_DOWN_MXFP4,
    VLLM_ONLINE_MXFP4,
    Element,
    Rule,
    ScaleRounding,
    Ties,
    rule_by_name,
)


def test_rules_module_imports_without_torch():
    code = "import sys; import megatron_qat.numerics.rules; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_named_rules():
    assert (FLASHINFER_MXFP4.element, FLASHINFER_MXFP4.scale, FLASHINFER_MXFP4.ties, FLASHINFER_MXFP4.ftz) == (
        Element.E2M1, ScaleRounding.CEIL, Ties.EVEN, True)  # fmt: skip
    assert (VLLM_ONLINE_MXFP4.scale, VLLM_ONLINE_MXFP4.ties, VLLM_ONLINE_MXFP4.ftz) == (ScaleRounding.EVEN, Ties.EVEN, False)
    assert (TIES_DOWN_MXFP4.scale, TIES_DOWN_MXFP4.ties, TIES_DOWN_MXFP4.ftz) == (ScaleRounding.CEIL, Ties.TOWARD_ZERO, True)
    assert (FLASHINFER_MXFP8.element, FLASHINFER_MXFP8.scale, FLASHINFER_MXFP8.ftz) == (Element.E4M3, ScaleRounding.CEIL, False)
    assert FLASHINFER_MXFP4.rcp_bits == constants.RCP_SIX_BITS and FLASHINFER_MXFP8.rcp_bits == constants.RCP_448_BITS
    assert [FLASHINFER_MXFP4.codes_per_byte, FLASHINFER_MXFP8.codes_per_byte] == [2, 1]
    assert all(rule_by_name(n) is r for n, r in RULES.items()) and len(RULES) == 4
    for rule in RULES.values():
        assert rule.mimics and str(rule) == rule.name


def test_unknown_rule_and_bad_combinations_are_refused():
    with pytest.raises(ValueError, match="unknown quantization rule 'x'; known rules: flashinfer-mxfp4, vllm-online-mxfp4"):
        rule_by_name("x")
    with pytest.raises(ValueError, match="EVEN scale rule is defined for E2M1 elements only"):
        Rule("bad", Element.E4M3, ScaleRounding.EVEN, Ties.EVEN, False, "-")
    with pytest.raises(ValueError, match="ties toward zero are defined for E2M1 elements only"):
        Rule("bad", Element.E4M3, ScaleRounding.CEIL, Ties.TOWARD_ZERO, False, "-")


def test_recipes():
    assert list(RECIPES) == [
        "flashinfer-w4a16", "flashinfer-trtllm-w4a8", "vllm-online-w4a4", "vllm-online-w4a16", "modelopt-w4a16"]  # fmt: skip
    assert DEFAULT_RECIPE == "flashinfer-w4a16"
    pairs = {n: (r.weights, r.activations) for n, r in RECIPES.items()}
    assert pairs == {
        "flashinfer-w4a16": (FLASHINFER_MXFP4, None),
        "flashinfer-trtllm-w4a8": (FLASHINFER_MXFP4, FLASHINFER_MXFP8),
        "vllm-online-w4a4": (VLLM_ONLINE_MXFP4, VLLM_ONLINE_MXFP4),  # docs/engines.md: vLLM's W4A4 activations use EVEN
        "vllm-online-w4a16": (VLLM_ONLINE_MXFP4, None),
        "modelopt-w4a16": (TIES_DOWN_MXFP4, None),
    }
    assert all(r.engines and r.name == n for n, r in RECIPES.items())
