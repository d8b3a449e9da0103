"""MXFP4 reference numerics: hand tables, the scale rule, input families, packing, errors.

Every bit-exact claim is checked on integer views. The independent oracle is tests/scalar_oracle.py.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import scalar_oracle
from megatron_qat import mxfp4
from megatron_qat.numerics import families
from megatron_qat.numerics.format import INT_VIEW_DTYPES as INT_VIEW
from megatron_qat.numerics.reference import e2m1_round_codes, e8m0_ceil_from_float32
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def codes_of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c, s = mxfp4.quantize(x)
    return mxfp4.unpack_nibbles(c), s


def block_with(values, fill=0.0, amax=6.0) -> torch.Tensor:
    """One 32-element float32 block: ``values`` first, then a +amax element, then ``fill``."""
    vals = list(values) + [amax]
    return torch.tensor(vals + [fill] * (32 - len(vals)), dtype=torch.float32).reshape(1, 32)


# --- E2M1 element rounding: hand-written table (block amax 6 -> scale byte 127, v == x) --------------
F32_NEXT_ABOVE_QUARTER = float(np.nextafter(np.float32(0.25), np.float32(1)))
E2M1_TABLE = [
    # (v, code)  every tie, its neighbours, both zeros, saturation
    (0.0, 0x0),
    (-0.0, 0x8),
    (0.1, 0x0),
    (-0.1, 0x8),
    (0.25, 0x0),  # tie 0 | 0.5 -> even code 0
    (F32_NEXT_ABOVE_QUARTER, 0x1),
    (0.5, 0x1),
    (0.75, 0x2),  # tie 0.5 | 1 -> code 2 (1.0)
    (0.74, 0x1),
    (1.0, 0x2),
    (1.25, 0x2),  # tie 1 | 1.5 -> code 2 (1.0)
    (1.26, 0x3),
    (1.5, 0x3),
    (1.75, 0x4),  # tie 1.5 | 2 -> code 4 (2.0)
    (2.0, 0x4),
    (2.5, 0x4),  # tie 2 | 3 -> code 4 (2.0)
    (2.51, 0x5),
    (3.0, 0x5),
    (3.5, 0x6),  # tie 3 | 4 -> code 6 (4.0)
    (4.0, 0x6),
    (5.0, 0x6),  # tie 4 | 6 -> code 6 (4.0)
    (5.01, 0x7),
    (6.0, 0x7),
    (-0.25, 0x8),
    (-0.75, 0xA),
    (-1.25, 0xA),
    (-1.75, 0xC),
    (-2.5, 0xC),
    (-3.5, 0xE),
    (-5.0, 0xE),
    (-6.0, 0xF),
]


@pytest.mark.parametrize("v,code", E2M1_TABLE)
def test_e2m1_hand_table(v, code):
    x = block_with([v])
    c, s = codes_of(x)
    assert s.tolist() == [[127]]
    assert int(c[0, 0]) == code, f"{v!r} -> {int(c[0, 0]):#x}, want {code:#x}"


def test_e2m1_saturates_above_six():
    # Direct element step (the block rule never produces |v| > 6 for finite input, but the
    # converter saturates like cvt.rn.satfinite.e2m1x2.f32).
    v = torch.tensor([6.5, 7.0, 1e30, float("inf"), -6.5, -float("inf")])
    assert e2m1_round_codes(v).tolist() == [0x7, 0x7, 0x7, 0x7, 0xF, 0xF]


def test_e2m1_step_matches_ml_dtypes_exhaustively():
    """Every bf16 value in [-16, 16] as float32, and every float32 tie neighbour, against
    ml_dtypes.float4_e2m1fn (RNE, satfinite). ml_dtypes and we agree except NaN, excluded here."""
    all_bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    v = all_bf16[torch.isfinite(all_bf16) & (all_bf16.abs() <= 16)]
    ties = torch.tensor(families.TIES, dtype=torch.float32)
    near = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])
    v = torch.cat([v, near, -near])
    ours = e2m1_round_codes(v).numpy()
    theirs = v.numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    mismatch = np.nonzero(ours != theirs)[0]
    assert mismatch.size == 0, f"{mismatch.size} differ, first v={v[mismatch[0]].item()!r}"


# --- E8M0 scale rule ---------------------------------------------------------------------------------
SCALE_TABLE = [
    # (amax, byte)
    (0.0, 0),
    (6.0, 127),  # p = 6 * RN(1/6) rounds to exactly 1.0
    (6.0 * 2.0**10, 137),
    (6.0 * 2.0**-10, 117),
    (6.0 * (1 + 2.0**-7), 128),  # next bf16 above 6 -> p just above 1 -> rounds up
    (1.5, 125),  # p = 0.25 exactly
    (3.0, 126),  # p = 0.5
    (1.0, 125),  # p = 1/6 -> ceil(log2) = -2
    (6.0 * 2.0**-126, 1),  # p = 2^-126, the smallest normal
    (6.0 * 2.0**-127, 0),  # p subnormal -> flushed -> 0
    (1e-40, 0),
    (torch.finfo(torch.bfloat16).max, 253),
    (65504.0, 141),  # fp16 max
    (torch.finfo(torch.float32).max, 253),
]


@pytest.mark.parametrize("amax,byte", SCALE_TABLE)
def test_scale_edge_table(amax, byte):
    x = torch.zeros(1, 32, dtype=torch.float32)
    x[0, 17] = amax
    _, s = codes_of(x)
    assert int(s[0, 0]) == byte
    assert scalar_oracle.scale_byte(amax) == byte


def test_scale_rule_every_positive_bf16_amax():
    """All 32,639 positive finite bf16 values as amax, against the frexp-based oracle."""
    a = torch.arange(1, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    ours = e8m0_ceil_from_float32(a * torch.tensor(scalar_oracle.RCP_SIX).item()).tolist()
    want = [scalar_oracle.scale_byte(v) for v in a.tolist()]
    assert ours == want


def test_scale_amax_over_six_one_ulp_each_side():
    base = torch.tensor([6.0 * 2.0**e for e in range(-20, 21)], dtype=torch.float32)
    for amax in torch.cat([base, torch.nextafter(base, base * 2), torch.nextafter(base, base * 0)]).tolist():
        x = torch.zeros(1, 32)
        x[0, 0] = amax
        _, s = codes_of(x)
        assert int(s[0, 0]) == scalar_oracle.scale_byte(amax), amax


# --- input families against the independent oracle ---------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("family", families.FINITE_FAMILIES)
def test_family_matches_oracle(family, dtype):
    x = families.make(family, (4, 64), dtype, seed=len(family))
    codes, scales = mxfp4.quantize(x)
    want_codes, want_scales = scalar_oracle.quantize_rows(x.float().numpy())
    assert torch.equal(scales, torch.from_numpy(want_scales))
    assert torch.equal(mxfp4.unpack_nibbles(codes), torch.from_numpy(want_codes))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("family", families.FINITE_FAMILIES)
def test_fake_quantize_is_dequantize_of_quantize(family, dtype):
    x = families.make(family, (8, 128), dtype, seed=1)
    fq = mxfp4.fake_quantize(x)
    assert fq.dtype == dtype and fq.shape == x.shape and fq.is_contiguous()
    ref = mxfp4.dequantize(*mxfp4.quantize(x), dtype=dtype)
    assert torch.equal(bits(fq), bits(ref))


def test_zeros_keep_their_sign():
    x = torch.where(torch.rand(2, 64) < 0.5, -0.0, 0.0).to(torch.bfloat16)
    c, s = codes_of(x)
    assert s.eq(0).all()
    assert torch.equal(c, torch.signbit(x).to(torch.uint8) << 3)
    assert torch.equal(bits(mxfp4.fake_quantize(x)), bits(x))  # +0 -> +0, -0 -> -0


def test_subnormals_are_flushed():
    # bf16 subnormals only: p < 2^-126 -> byte 0, every code a signed zero
    x = torch.tensor([0x0001, 0x8003, 0x0005, 0x807F] * 8, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = x.reshape(1, 32)
    c, s = codes_of(x)
    assert s.tolist() == [[0]] and c.tolist() == [[0, 8, 0, 8] * 8]
    # a subnormal next to a normal amax of 6*2^-126 (byte 1, multiplier 2^126): the subnormal input
    # is flushed before scaling (without FTZ 2^-127 * 2^126 = 0.5 would give code 1)
    y = torch.zeros(1, 32, dtype=torch.float32)
    y[0, 0] = 6.0 * 2.0**-126
    y[0, 1] = 2.0**-127
    y[0, 2] = -(2.0**-127)
    c, s = codes_of(y)
    assert s.tolist() == [[1]] and c[0, :3].tolist() == [0x7, 0x0, 0x8]


def test_fp16_subnormal_inputs_are_normal_in_float32():
    # fp16 subnormals become normal float32 values: no flush; 2^-24 alone -> byte 101, code 6 (4.0)
    x = torch.zeros(1, 32, dtype=torch.float16)
    x[0, 0] = 2.0**-24
    c, s = codes_of(x)
    assert s.tolist() == [[101]] and int(c[0, 0]) == 0x6
    assert mxfp4.fake_quantize(x)[0, 0].item() == 2.0**-24


def test_maxima_dequantize_beyond_dtype_range():
    """bf16 max -> byte 253, code 0x6 (3.98 rounds to 4), value 2^128 which overflows to inf in
    bf16 (and float32); fp16 max -> byte 141, value 65536 -> inf in fp16. Documented behaviour."""
    for dtype, byte in ((torch.bfloat16, 253), (torch.float16, 141)):
        m = torch.finfo(dtype).max
        x = torch.zeros(1, 32, dtype=dtype)
        x[0, 0], x[0, 1] = m, -m
        c, s = codes_of(x)
        assert s.tolist() == [[byte]] and c[0, :2].tolist() == [0x6, 0xE]
        fq = mxfp4.fake_quantize(x)
        assert fq[0, 0].item() == math.inf and fq[0, 1].item() == -math.inf


def test_one_nonzero_per_block_gives_code_five_six_or_seven():
    x = families.make("one_nonzero", (4, 128), torch.bfloat16)
    c, _ = codes_of(x)
    nz = x != 0
    # the lone element is the amax: |x| / 2^ceil(log2(amax/6)) lies in (3, 6] -> code 5, 6 or 7
    assert ((c[nz] & 0x7) >= 5).all() and (c[~nz] & 0x7).eq(0).all()


def test_three_dimensional_expert_tensor_equals_rows():
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    c3, s3 = mxfp4.quantize(x)
    c2, s2 = mxfp4.quantize(x.reshape(15, 64))
    assert c3.shape == (3, 5, 32) and s3.shape == (3, 5, 2)
    assert torch.equal(c3.reshape(15, 32), c2) and torch.equal(s3.reshape(15, 2), s2)
    assert torch.equal(bits(mxfp4.fake_quantize(x)).reshape(15, 64), bits(mxfp4.fake_quantize(x.reshape(15, 64))))


def test_non_contiguous_input_blocks_along_logical_last_dim():
    w = torch.randn(64, 96, dtype=torch.bfloat16)
    wt = w.t()  # [96, 64], non-contiguous
    assert not wt.is_contiguous()
    assert torch.equal(bits(mxfp4.fake_quantize(wt)), bits(mxfp4.fake_quantize(wt.contiguous())))


def test_chunked_rows_match_unchunked(monkeypatch):
    from megatron_qat.numerics import reference

    x = torch.randn(37, 96, dtype=torch.bfloat16)
    whole = mxfp4.fake_quantize(x)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 96 * 5)  # 5 rows per chunk, ragged tail
    assert torch.equal(bits(mxfp4.fake_quantize(x)), bits(whole))
    c, s = mxfp4.quantize(x)
    monkeypatch.undo()
    c0, s0 = mxfp4.quantize(x)
    assert torch.equal(c, c0) and torch.equal(s, s0)


def test_block_size_ablation():
    x = torch.randn(4, 64)
    c, s = mxfp4.quantize(x, block_size=16)
    assert s.shape == (4, 4)
    # a 16-block is the oracle's rule on 16 elements
    want_c, want_s = scalar_oracle.quantize_rows(x.numpy(), block_size=16)
    assert torch.equal(s, torch.from_numpy(want_s)) and torch.equal(mxfp4.unpack_nibbles(c), torch.from_numpy(want_c))


# --- packing -----------------------------------------------------------------------------------------
def test_packing_order_binary_literals():
    # element 0 = 1.0 (code 0b0010) -> low nibble; element 1 = -6 (0b1111) -> high nibble
    x = block_with([1.0, -6.0, 0.5, -0.0])
    c, s = mxfp4.quantize(x)
    assert c.shape == (1, 16) and s.tolist() == [[127]]
    assert int(c[0, 0]) == 0b1111_0010
    assert int(c[0, 1]) == 0b1000_0001  # elements 2 (0.5 -> 0b0001) and 3 (-0 -> 0b1000)
    assert int(c[0, 2]) == 0b0000_0111  # element 4 is the +6 amax, element 5 is +0


def test_pack_unpack_roundtrip():
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = mxfp4.pack_nibbles(codes)
    assert packed.shape == (3, 32)
    assert torch.equal(mxfp4.unpack_nibbles(packed), codes)


# --- dequantize --------------------------------------------------------------------------------------
def test_dequantize_code_eight_is_negative_zero():
    codes = torch.tensor([[0x80] + [0] * 15], dtype=torch.uint8)  # element 1 = code 0x8
    out = mxfp4.dequantize(codes, torch.tensor([[127]], dtype=torch.uint8), dtype=torch.bfloat16)
    assert out.view(torch.uint16)[0, 1].item() == 0x8000 and out.view(torch.uint16)[0, 0].item() == 0


def test_dequantize_scale_bytes_and_nan():
    codes = torch.full((1, 16), 0x77, dtype=torch.uint8)  # all +6
    out = mxfp4.dequantize(codes.repeat(3, 1), torch.tensor([[0], [127], [255]], dtype=torch.uint8), torch.float32)
    assert out[0, 0].item() == 6.0 * 2.0**-127 and out[1, 0].item() == 6.0 and math.isnan(out[2, 0].item())


def test_dequantize_bad_input():
    c = torch.zeros(2, 16, dtype=torch.uint8)
    with pytest.raises(TypeError, match="codes must be a uint8"):
        mxfp4.dequantize(c.to(torch.int8), torch.zeros(2, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"scales has shape \(2, 2\)"):
        mxfp4.dequantize(c, torch.zeros(2, 2, dtype=torch.uint8))


# --- errors ------------------------------------------------------------------------------------------
def test_k_not_multiple_of_block_size():
    with pytest.raises(ValueError, match=r"shape \(4, 48\).*K=48.*block size 32"):
        mxfp4.quantize(torch.zeros(4, 48, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"K=48.*block size 32"):
        mxfp4.fake_quantize(torch.zeros(4, 48, dtype=torch.bfloat16))


def test_bad_dtype_and_block_size():
    with pytest.raises(TypeError, match="float16, torch.bfloat16 or torch.float32"):
        mxfp4.quantize(torch.zeros(4, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive even integer"):
        mxfp4.fake_quantize(torch.zeros(4, 32), block_size=7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_refuses_non_finite_and_says_where(bad):
    x = torch.zeros(3, 64, dtype=torch.bfloat16)
    x[2, 40] = bad
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\) \(first at index \(2, 40\)"):
        mxfp4.quantize(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_fake_quantize_keeps_non_finite_blocks_non_finite(bad):
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    x[1, 40] = bad
    fq = mxfp4.fake_quantize(x)
    assert torch.isnan(fq[1, 32:64]).all()  # the whole block: its scale is undefined
    finite = torch.ones_like(x, dtype=torch.bool)
    finite[1, 32:64] = False
    assert torch.isfinite(fq[finite]).all()
    clean = x.clone()
    clean[1, 32:64] = 0
    assert torch.equal(bits(fq)[finite], bits(mxfp4.fake_quantize(clean))[finite])
