"""The golden NumPy model: hand-checked vectors, independence from megatron_qat.mxfp4, and
bit-exact agreement with megatron_qat.mxfp4 on every synthetic family (integer views)."""

import pathlib

import numpy as np
import pytest
import torch

from _helpers import imports
from megatron_qat import mxfp4
from megatron_qat.numerics import families
from megatron_qat.numerics.families import synthetic_tensors
from megatron_qat.numerics.rules import RULES, Element
from megatron_qat.parity import golden
from megatron_qat.parity.references import golden_arguments

SYNTHETIC = dict(synthetic_tensors())


def _block(values, scale_exp=0):
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, : len(values)] = np.array(values, dtype=np.float64) * 2.0**scale_exp
    return x


def _codes(packed):
    return golden.unpack(packed)[0]


def test_golden_imports_nothing_from_megatron_qat():
    imported = {module for _, _, module in imports(pathlib.Path(golden.__file__))}
    assert imported == {"__future__", "numpy"}, imported


@pytest.mark.parametrize("e", [-100, -3, 0, 5, 100])
def test_ties_round_to_even_codes(e):
    ties = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -5.0, 7.0 / 8 * 6]
    packed, scales = golden.quantize(_block(ties, e))
    assert int(scales[0, 0]) == 127 + e
    assert _codes(packed)[:11].tolist() == [7, 0, 2, 2, 4, 4, 6, 6, 0xA, 0xE, 7]


def test_values_just_off_ties_round_to_nearest():
    up = np.nextafter(np.float32(0.25), np.float32(1))
    down = np.nextafter(np.float32(5.0), np.float32(0))
    packed, _ = golden.quantize(_block([6.0, up, down, 5.5]))
    assert _codes(packed)[:4].tolist() == [7, 1, 6, 7]


def test_scale_is_ceil_log2_of_amax_times_rcp_six():
    # amax 6 * 2**e -> p exactly 2**e; one fp32 ulp above amax 6 rounds p up past 1 -> byte 128
    assert golden.scale_bytes(np.array([6.0], np.float32)).tolist() == [127]
    assert golden.scale_bytes(np.array([np.nextafter(np.float32(6), np.float32(7))], np.float32)).tolist() == [128]
    assert golden.scale_bytes(np.array([1.5], np.float32)).tolist() == [125]  # fp32(1.5 * RN(1/6)) rounds to exactly 0.25
    assert golden.scale_bytes(np.array([0.0, 2.0**-126, 3.4e38], np.float32)).tolist() == [0, 0, 253]


def test_signed_zeros_subnormals_and_decode():
    x = _block([-0.0, 0.0, -1e-40, 1e-40])  # fp32 subnormals flush to signed zeros; amax -> byte 0
    packed, scales = golden.quantize(x)
    assert int(scales[0, 0]) == 0
    assert _codes(packed)[:4].tolist() == [8, 0, 8, 0]
    decoded = golden.decode(packed, scales)
    assert decoded.view(np.uint32)[0, :2].tolist() == [0x80000000, 0]
    assert np.isnan(golden.decode(packed, np.full_like(scales, 255))).all()


def test_rejects_non_finite_and_bad_shapes():
    with pytest.raises(ValueError, match="finite"):
        golden.quantize(_block([np.inf]))
    with pytest.raises(ValueError, match="K % 32"):
        golden.quantize(np.zeros((1, 48), np.float32))


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_golden_matches_megatron_qat_on_every_family(name):
    t = SYNTHETIC[name]
    x = t.reshape(-1, t.shape[-1])
    g_codes, g_scales = golden.quantize(x.float().numpy())
    g_values = golden.decode(g_codes, g_scales)
    codes, scales = mxfp4.quantize(x)
    assert np.array_equal(codes.view(torch.uint8).numpy(), g_codes)
    assert np.array_equal(scales.view(torch.uint8).numpy(), g_scales)
    ours32 = mxfp4.dequantize(codes, scales, torch.float32)
    assert np.array_equal(ours32.view(torch.int32).numpy(), g_values.view(np.int32))
    fake = mxfp4.fake_quantize(x)
    assert torch.equal(fake.view(torch.int16), torch.from_numpy(g_values).to(x.dtype).view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_golden_matches_on_random_wide_range(dtype):
    g = torch.Generator().manual_seed(1)
    lo, hi = (-20, 12) if dtype == torch.float16 else (-60, 60)
    x = torch.randn(64, 512, generator=g) * 2.0 ** torch.randint(lo, hi, (64, 1), generator=g).float()
    x = x.to(dtype)
    g_codes, g_scales = golden.quantize(x.float().numpy())
    codes, scales = mxfp4.quantize(x)
    assert np.array_equal(codes.numpy(), g_codes) and np.array_equal(scales.numpy(), g_scales)


def test_a_broken_golden_is_caught():
    """Mutation check: a golden that rounds ties away from zero disagrees with mxfp4 on the tie family."""
    x = SYNTHETIC["synthetic/bf16/ties"]
    flat = np.minimum(np.abs(x.float().numpy()), 6.0)
    up = np.searchsorted(golden.TABLE, flat)  # always the upper neighbour: not RNE
    assert not np.array_equal(up, golden.nearest_e2m1(flat))


# every E2M1 rule of numerics/rules.py: the golden model's plain arguments for it (references.golden_arguments)
E2M1_RULES = [rule for rule in RULES.values() if rule.element is Element.E2M1]


@pytest.mark.parametrize("rule", E2M1_RULES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("family", families.FINITE_FAMILIES)
def test_golden_matches_megatron_qat_under_every_e2m1_rule(rule, dtype, family):
    """Issue 15 item 5: ``parity --recipe R`` compares ours under R's weight rule with this model."""
    x = families.make(family, (32, 256), dtype, seed=2)
    g_codes, g_scales = golden.quantize(x.float().numpy(), **golden_arguments(rule))
    codes, scales = mxfp4.quantize(x, rule=rule)
    assert np.array_equal(codes.numpy(), g_codes) and np.array_equal(scales.numpy(), g_scales)
    values = golden.decode(g_codes, g_scales)
    assert np.array_equal(mxfp4.dequantize(codes, scales, torch.float32, rule=rule).numpy().view(np.int32), values.view(np.int32))


def test_golden_rules_differ_where_the_rules_do():
    """The EVEN scale takes half FlashInfer's scale where the amax significand is in [1.5, 1.75) ...
    and a tie goes down under ties-toward-zero (0.75 -> 0.5 instead of 1.0)."""
    amax = np.array([1.6 * 8, 1.8 * 8, 1.2 * 8], dtype=np.float32)  # significands 1.6, 1.8, 1.2 times 2**3
    assert golden.scale_bytes(amax).tolist() == [129, 129, 128]  # ceil(log2(amax / 6)) + 127
    assert golden.even_scale_bytes(amax).tolist() == [128, 129, 128]  # 12.8 -> 8, 14.4 -> 16, 9.6 -> 8; exponent - 2 + 127
    assert golden.nearest_e2m1(np.array([0.75, 1.75, 3.5])).tolist() == [2, 4, 6]
    assert golden.nearest_e2m1(np.array([0.75, 1.75, 3.5]), "toward-zero").tolist() == [1, 3, 5]
    with pytest.raises(ValueError, match="no E2M1 rule"):
        golden.quantize(np.zeros((1, 32), np.float32), scale="even", ftz=True)
