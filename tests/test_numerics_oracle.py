"""Issue 15, item 4: the PyTorch reference of every rule (megatron_qat.numerics.reference /
rounding) against the independent scalar oracle (tests/scalar_oracle.py), bit for bit on integer
views, on every finite input family in bf16, fp16 and float32; hand tables of each rule's edges;
the E4M3 element rounding against ml_dtypes and torch ``float8_e4m3fn`` casts where their rules
agree (|v| <= 448, i.e. after the clamp every MXFP8 quantizer applies first).

Where the casts disagree (not tested, documented in docs/numerics.md): beyond 448 torch 2.13 on
CPU saturates finite values and +-inf to +-448 (older torch returned NaN from 464 up), ml_dtypes
0.7 rounds (448, 464] to 448 and returns NaN above 464 and for +-inf; FlashInfer clamps to +-448
before ``cvt.rn.satfinite`` (so all of these give 448 there, and NaN gives +448).
"""

import ml_dtypes
import numpy as np
import pytest
import torch

from megatron_qat.numerics import rounding
from megatron_qat.numerics.families import ALL_FAMILIES, FINITE_FAMILIES, compare_bits, make
from megatron_qat.numerics.format import CANONICAL_NAN_BITS, INT_VIEW_DTYPES, unpack_nibbles
from megatron_qat.numerics.reference import dequantize_reference, fake_quantize_reference, quantize_reference
from megatron_qat.numerics.rules import (
    FLASHINFER_MXFP4,
    FLASHINFER_MXFP8,
    RULES,
    TIES_DOWN_MXFP4,
    VLLM_ONLINE_MXFP4,
    Element,
)

import scalar_oracle as oracle

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
RULE_LIST = tuple(RULES.values())
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def _unpacked_codes(x, rule):
    codes, scales = quantize_reference(x, rule=rule)
    return (unpack_nibbles(codes) if rule.element is Element.E2M1 else codes), scales


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FINITE_FAMILIES)
@pytest.mark.parametrize("rule", RULE_LIST, ids=str)
def test_reference_equals_the_scalar_oracle(rule, family, dtype):
    x = make(family, (4, 64), dtype, seed=11)
    codes, scales = _unpacked_codes(x, rule)
    want_codes, want_scales = oracle.quantize_rows(x.float().numpy(), 32, rule)
    assert compare_bits(scales, torch.from_numpy(want_scales)) is None, compare_bits(scales, torch.from_numpy(want_scales))
    assert compare_bits(codes, torch.from_numpy(want_codes)) is None, compare_bits(codes, torch.from_numpy(want_codes))
    want = torch.from_numpy(oracle.fake_values(want_codes, want_scales, 32, rule)).to(dtype)
    got = fake_quantize_reference(x, rule=rule)
    assert compare_bits(got, want) is None, compare_bits(got, want)


@pytest.mark.parametrize("rule", RULE_LIST, ids=str)
def test_fake_quantize_is_dequantize_of_quantize_and_nonfinite_blocks_are_nan(rule):
    x = make("random_extreme", (3, 2, 96), torch.bfloat16, seed=2)
    deq = dequantize_reference(*quantize_reference(x, rule=rule), dtype=x.dtype, rule=rule)
    assert compare_bits(fake_quantize_reference(x, rule=rule), deq) is None
    y = make("nan_inf_blocks", (4, 64), torch.float16, seed=1)
    out = fake_quantize_reference(y, rule=rule).view(torch.int16).reshape(-1, 32)
    bad = ~torch.isfinite(y.float().reshape(-1, 32)).all(-1)
    assert bool((out[bad] == CANONICAL_NAN_BITS[torch.float16]).all()) and bool(bad.any())
    assert bool(torch.isfinite(out[~bad].view(torch.float16)).all())
    with pytest.raises(ValueError, match="non-finite"):
        quantize_reference(y, rule=rule)


def test_storage_shapes():
    x = make("random_1", (2, 3, 64), torch.bfloat16)
    for rule, kc in ((FLASHINFER_MXFP4, 32), (FLASHINFER_MXFP8, 64)):
        codes, scales = quantize_reference(x, rule=rule)
        assert codes.shape == (2, 3, kc) and scales.shape == (2, 3, 2) and codes.dtype == scales.dtype == torch.uint8
        assert dequantize_reference(codes, scales, torch.float32, rule=rule).shape == x.shape
    with pytest.raises(TypeError, match="rule must be a megatron_qat.numerics.rules.Rule"):
        quantize_reference(x, rule="flashinfer-mxfp4")


# --- hand tables of each rule's edges -------------------------------------------------------------
def _byte(amax, rule, dtype=torch.float32):
    blk = torch.zeros(1, 32, dtype=dtype)
    blk[0, 0] = amax
    return int(quantize_reference(blk, rule=rule)[1][0, 0])


@pytest.mark.parametrize(
    "amax, rule, byte",
    [
        (0.0, VLLM_ONLINE_MXFP4, 0),
        (1.0, VLLM_ONLINE_MXFP4, 125),  # r = 1 -> s = -2
        (1.7421875, VLLM_ONLINE_MXFP4, 125),  # mantissa below 1.75: r = 1 (|x|/s up to 6.97 -> saturates)
        (1.75, VLLM_ONLINE_MXFP4, 126),  # mantissa 1.75 rounds the amax up to 2
        (6.0, VLLM_ONLINE_MXFP4, 127),
        (7.0, VLLM_ONLINE_MXFP4, 128),  # 7 = 1.75 * 4 -> 8
        (1.75 * 2.0**-125, VLLM_ONLINE_MXFP4, 1),  # rounded up to r = 2**-124 -> s = -126
        (1.5 * 2.0**-125, VLLM_ONLINE_MXFP4, 0),  # r = 2**-125 -> s = -127 (clamp) -> byte 0
        (2.0**-124, VLLM_ONLINE_MXFP4, 1),
        (1.5 * 2.0**-127, VLLM_ONLINE_MXFP4, 0),  # subnormal amax
        (3.3895313892515355e38, VLLM_ONLINE_MXFP4, 254),  # bf16 max: rounded amax is inf -> s = 127
        (1.5 * 2.0**127, VLLM_ONLINE_MXFP4, 252),
        (0.0, FLASHINFER_MXFP8, 0),
        (448.0, FLASHINFER_MXFP8, 127),  # 448 * RN(1/448) rounds to exactly 1.0
        (450.0, FLASHINFER_MXFP8, 128),  # next bf16 above 448
        (1.0, FLASHINFER_MXFP8, 119),  # p = 1/448 -> ceil(log2) = -8
        (448.0 * 2.0**-126, FLASHINFER_MXFP8, 1),  # p = 2**-126: normal
        (448.0 * 1.5 * 2.0**-127, FLASHINFER_MXFP8, 1),  # p subnormal in (2**-127, 2**-126): no FTZ -> 1
        (448.0 * 2.0**-127, FLASHINFER_MXFP8, 0),  # p = 2**-127 exactly -> 0
        (6.0 * 1.5 * 2.0**-127, FLASHINFER_MXFP4, 0),  # the same edge with FTZ (FlashInfer CUDA MXFP4) -> 0
        (6.0 * 1.5 * 2.0**-127, TIES_DOWN_MXFP4, 0),
        (3.3895313892515355e38, FLASHINFER_MXFP8, 247),
    ],
)
def test_scale_byte_table(amax, rule, byte):
    assert _byte(amax, rule) == byte == oracle.scale_byte(amax, rule)


@pytest.mark.parametrize(
    "v, rne, down",
    [
        (0.25, 0x0, 0x0), (0.75, 0x2, 0x1), (1.25, 0x2, 0x2), (1.75, 0x4, 0x3), (2.5, 0x4, 0x4),
        (3.5, 0x6, 0x5), (5.0, 0x6, 0x6), (5.5, 0x7, 0x7), (-0.75, 0xA, 0x9), (-0.0, 0x8, 0x8), (7.0, 0x7, 0x7),
    ],
)  # fmt: skip
def test_e2m1_ties_even_and_toward_zero(v, rne, down):
    t = torch.tensor([v])
    assert int(rounding.e2m1_round_codes(t)[0]) == rne == oracle.e2m1_code(v)
    assert int(rounding.e2m1_round_codes(t, TIES_DOWN_MXFP4.ties)[0]) == down == oracle.e2m1_code(v, TIES_DOWN_MXFP4.ties)


@pytest.mark.parametrize(
    "v, code",
    [
        (1.0, 0x38), (1.0625, 0x38), (1.1875, 0x3A), (1.9375, 0x40), (-1.0625, 0xB8),  # ties between neighbours
        (448.0, 0x7E), (432.0, 0x7E), (431.9, 0x7D), (460.0, 0x7E), (1e6, 0x7E), (-1e6, 0xFE),  # top, saturation
        (2.0**-6, 0x08), (2.0**-9, 0x01), (2.0**-10, 0x00), (3 * 2.0**-10, 0x02), (5 * 2.0**-10, 0x02),  # subnormals
        (2.0**-10 * 1.001, 0x01), (15 * 2.0**-10, 0x08), (-(2.0**-12), 0x80), (-0.0, 0x80), (0.0, 0x00),
    ],
)  # fmt: skip
def test_e4m3_element_table(v, code):
    assert int(rounding.e4m3_round_codes(torch.tensor([v]))[0]) == code == oracle.e4m3_code(v)


def test_mxfp8_block_worked_example():
    """amax 448 * 2**-3 = 56 pins the scale to 2**-3 (byte 124); 1.0625 * 2**-3 is a tie -> 1.0 * 2**-3;
    a subnormal-after-scaling 3 * 2**-13 is a tie -> 2**-11 (E4M3 0x02 at the scale)."""
    x = torch.zeros(1, 32, dtype=torch.bfloat16)
    x[0, :4] = torch.tensor([56.0, 1.0625 / 8, 3 * 2.0**-13, -0.0])
    codes, scales = quantize_reference(x, rule=FLASHINFER_MXFP8)
    assert scales.tolist() == [[124]] and codes[0, :4].tolist() == [0x7E, 0x38, 0x02, 0x80]
    assert fake_quantize_reference(x, rule=FLASHINFER_MXFP8)[0, :4].float().tolist() == [56.0, 0.125, 2.0**-11, -0.0]


def test_vllm_keeps_subnormal_blocks_that_flashinfer_flushes():
    x = torch.zeros(1, 32, dtype=torch.bfloat16)
    x.view(torch.int16)[0, 0] = 0x0040  # 2**-127, a bf16 subnormal; the amax
    fi_codes, fi_scales = quantize_reference(x, rule=FLASHINFER_MXFP4)
    v_codes, v_scales = quantize_reference(x, rule=VLLM_ONLINE_MXFP4)
    assert (fi_scales.item(), fi_codes[0, 0].item()) == (0, 0x00)  # FTZ: zero
    assert (v_scales.item(), v_codes[0, 0].item()) == (0, 0x02)  # byte 0 scales by 2**127: 1.0
    assert fake_quantize_reference(x, rule=VLLM_ONLINE_MXFP4).view(torch.int16)[0, 0] == 0x0040


# --- E4M3 against ml_dtypes and torch casts, where their rules agree ---------------------------------
def _every_bf16_in(lo, hi):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    v = bits.view(torch.bfloat16).float()
    return v[torch.isfinite(v) & (v.abs() <= hi) & (v.abs() >= lo)]


def test_e4m3_rounding_equals_torch_cast_on_every_bf16_up_to_448():
    v = _every_bf16_in(0.0, 448.0)
    ours = rounding.e4m3_round_codes(v)
    assert compare_bits(ours, v.to(torch.float8_e4m3fn).view(torch.uint8)) is None


def test_e4m3_rounding_equals_ml_dtypes_on_every_bf16_and_random_fp32_up_to_448():
    g = torch.Generator().manual_seed(0)
    v = torch.cat([_every_bf16_in(0.0, 448.0), (torch.rand(200_000, generator=g) * 2 - 1) * torch.exp2(torch.randint(-14, 9, (200_000,), generator=g).float())])
    v = v[v.abs() <= 448.0]
    theirs = torch.from_numpy(v.numpy().astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    assert compare_bits(rounding.e4m3_round_codes(v), theirs) is None


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_runs_every_rule(family):
    x = make(family, (2, 64), torch.float32, seed=5)
    for rule in RULE_LIST:
        out = fake_quantize_reference(x, rule=rule)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.view(INT_VIEW_DTYPES[x.dtype]).shape == x.shape
