"""Triton device code of the MX quantize / fake-quantize kernels (host side: ``triton_qdq``).

One tile function (:func:`qdq_tile`) serves every rule of :mod:`megatron_qat.numerics.rules`
through constexprs: ``ELEM`` (0 = E2M1, 1 = E4M3), ``SCALE`` (0 = CEIL, 1 = EVEN), ``TIES``
(0 = to even, 1 = toward zero), ``FTZ`` (flush float32-subnormal inputs; CEIL: a subnormal ``p``
gives byte 0). ``FLASHINFER_MXFP4`` (0, 0, 0, True) compiles to exactly the code it always had;
the other rules go through the per-block pieces below, which are also the building blocks of
other kernels (e.g. a statistics kernel):

- :func:`scale_byte` ``amax bits [NB] -> int32 E8M0 byte [NB]``
- :func:`scaled_magnitude` ``|x| bits [NB, BS], byte [NB] -> float32 |x| * multiplier(byte)``
- :func:`round_magnitude` ``float32 a >= 0 -> the nearest element magnitude (saturated), float32``
- :func:`element_code` ``rounded magnitude, sign -> int32 code`` (E2M1 0..15 / E4M3 byte)
- :func:`fake_value_bits` ``rounded magnitude, byte, sign -> float32 bits of the dequantized value``

Every step of the rule (docs/numerics.md, :mod:`megatron_qat.numerics.reference`) is done on the
float32 BIT PATTERN with integer adds, shifts and compares, so no approximate instruction,
FMA contraction or flush-to-zero mode can change a result. The one floating-point operation is
``p = amax * RN(1/6)``: a single IEEE round-to-nearest float32 multiply (``mul.f32`` on the GPU,
numpy float32 in the interpreter); a subnormal ``p`` gives scale byte 0 whether the hardware
flushes it or not. The fp16 output uses the IEEE round-to-nearest-even conversion of the exact
float32 value (``cvt.rn.f16.f32``), the same rounding ``torch.Tensor.to(torch.float16)`` does.

Memory layout: a contiguous tensor ``[..., K]`` with ``K % BS == 0`` is a flat run of whole
blocks (a block never straddles two rows), so a program handles ``NB`` consecutive blocks as an
``[NB, BS_P2]`` tile: each element is read once and written once with 16-byte vector accesses.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..numerics import constants

# Input / output element encodings (host passes bf16 as an int16 view, fp32 as an int32 view).
KIND_BF16 = 0
KIND_FP16 = 1
KIND_FP32 = 2

# tl.constexpr wrappers of the one definition in megatron_qat.numerics.constants (compiled kernels
# may read only constexpr globals).
RCP_SIX_BITS = tl.constexpr(constants.RCP_SIX_BITS)  # RN(1/6) = rcp.approx.ftz(6.0) on sm_90
RCP_448_BITS = tl.constexpr(constants.RCP_448_BITS)  # RN(1/448), FlashInfer's INV_FLOAT8_E4M3_MAX
EVEN_ROUND_BITS = tl.constexpr(constants.EVEN_ROUND_BITS)  # vLLM's amax rounding add
E2M1_MAX = tl.constexpr(float(constants.E2M1_MAX))
E4M3_MAX = tl.constexpr(float(constants.E4M3_MAX))
# Canonical quiet NaN written for non-finite blocks (see docs/kernel.md, "NaN bits").
NAN_BF16 = tl.constexpr(constants.NAN_BITS_BF16)
NAN_FP16 = tl.constexpr(constants.NAN_BITS_FP16)
NAN_FP32 = tl.constexpr(constants.NAN_BITS_FP32)
# float32 field masks (IEEE 754 layout, not MXFP4 facts).
INF_BITS = tl.constexpr(0x7F800000)
SIGN32 = tl.constexpr(-(2**31))
MIN_NORMAL_BITS = tl.constexpr(0x00800000)  # 2**-126
HALF_MIN_NORMAL_BITS = tl.constexpr(0x00400000)  # 2**-127, the subnormal E8M0 byte 0 / EVEN byte 254


@triton.jit
def _e2m1_magnitude_code(vmag):
    """int32 bits of |v| (float32, >= 0) -> E2M1 magnitude index 0..7, RNE with satfinite.

    Ties: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4; above 5 -> 6. ``>`` where the
    tie rounds down to the even code, ``>=`` where it rounds up to it.
    """
    c = (vmag > 0x3E800000).to(tl.int32)  # 0.25
    c += (vmag >= 0x3F400000).to(tl.int32)  # 0.75
    c += (vmag > 0x3FA00000).to(tl.int32)  # 1.25
    c += (vmag >= 0x3FE00000).to(tl.int32)  # 1.75
    c += (vmag > 0x40200000).to(tl.int32)  # 2.5
    c += (vmag >= 0x40600000).to(tl.int32)  # 3.5
    c += (vmag > 0x40A00000).to(tl.int32)  # 5.0
    return c


@triton.jit
def scale_byte(amax_bits, ELEM: tl.constexpr, SCALE: tl.constexpr, FTZ: tl.constexpr):
    """int32 bits of the block amax (``|x|`` max, >= 0, finite) -> int32 E8M0 scale byte.

    ``SCALE == 0`` (CEIL): ``p = amax * RN(1/max)`` (one IEEE float32 multiply; RN(1/6) for
    ``ELEM == 0``, RN(1/448) for ``ELEM == 1``), byte = exponent field of ``p`` + (mantissa != 0),
    at most 254; a subnormal ``p`` gives 0 with ``FTZ``, else 1 when ``p > 2**-127``.
    ``SCALE == 1`` (EVEN, vLLM): ``r`` = exponent field of ``amax_bits + 0x200000``; byte
    ``max(r - 2, 0)``, 254 when ``r`` is 255. Non-finite amax: a meaningless byte (mask the block).
    """
    if SCALE == 1:
        r = ((amax_bits + EVEN_ROUND_BITS) >> 23) & 0xFF
        return tl.where(r == 255, 254, tl.maximum(r - 2, 0))
    if ELEM == 0:
        rcp = tl.full(amax_bits.shape, RCP_SIX_BITS, tl.int32).to(tl.float32, bitcast=True)
    else:
        rcp = tl.full(amax_bits.shape, RCP_448_BITS, tl.int32).to(tl.float32, bitcast=True)
    p_bits = (amax_bits.to(tl.float32, bitcast=True) * rcp).to(tl.int32, bitcast=True)
    p_exp = (p_bits >> 23) & 0xFF
    p_mant = p_bits & 0x7FFFFF
    byte = tl.minimum(p_exp + (p_mant != 0).to(tl.int32), 254)
    if FTZ:
        return tl.where(p_exp == 0, 0, byte)
    return tl.where(p_exp == 0, (p_mant > HALF_MIN_NORMAL_BITS).to(tl.int32), byte)


@triton.jit
def scaled_magnitude(mag, byte, SCALE: tl.constexpr, FTZ: tl.constexpr):
    """``mag`` int32 ``|x|`` bits ``[NB, BS]``, ``byte`` int32 ``[NB]`` -> float32 ``a = |x| *
    2**(127 - byte)`` (exact: a power-of-two multiply; IEEE rounding only for subnormal results,
    which round to element 0 anyway). EVEN: bytes 0 / 254 multiply by ``2**127`` / ``2**-127``;
    CEIL: by 0. ``FTZ``: a float32-subnormal ``|x|`` gives 0."""
    if SCALE == 1:
        inv = tl.where(byte == 254, HALF_MIN_NORMAL_BITS, (254 - byte) << 23)
    else:
        inv = tl.where((byte > 0) & (byte < 254), (254 - byte) << 23, 0)
    a = mag.to(tl.float32, bitcast=True) * inv.to(tl.float32, bitcast=True)[:, None]
    if FTZ:
        a = tl.where(mag < MIN_NORMAL_BITS, 0.0, a)
    return a


@triton.jit
def round_magnitude(a, ELEM: tl.constexpr, TIES: tl.constexpr):
    """float32 ``a >= 0`` -> the nearest element magnitude, float32 (exactly on the grid).

    E2M1 (``ELEM == 0``), ties to even: ``(a + M) - M`` with ``M = 1.5 * 2**(E + 22)`` (``E`` = the
    exponent of ``a`` clamped to [0, 2], so the ulp of ``M`` is the grid step 0.5 / 1 / 2), then
    ``min(., 6)``. Ties toward zero (``TIES == 1``): ``ceil(a / step - 0.5) * step`` with the same
    step (the fp32 pipe, as ties to even; the integer-pipe form it replaced, counting the decision
    points below ``a``, ran at 65% of copy bandwidth on an H100 on 2026-12-07), then ``min(., 6)``. E4M3 (``ELEM == 1``): ``min(a, 448)``,
    then the same add with ``M = 1.5 * 2**(E + 20)``, ``E`` at least -6 (subnormal step 2**-9)."""
    if ELEM == 1:
        a = tl.minimum(a, E4M3_MAX)
        a_exp = tl.maximum(a.to(tl.int32, bitcast=True) & 0x7F800000, 121 << 23)
        magic = (a_exp + (20 << 23)) | 0x00400000
        return (a + magic.to(tl.float32, bitcast=True)) - magic.to(tl.float32, bitcast=True)
    a_exp = tl.minimum(tl.maximum(a.to(tl.int32, bitcast=True) & 0x7F800000, 127 << 23), 129 << 23)
    if TIES == 1:
        # k = ceil(a / step - 0.5), r = k * step: a tie (a / step - 0.5 an integer) keeps the lower
        # point. 1 / step and step are powers of two; the subtraction is exact wherever the result
        # can reach 0 or above (a / step >= 0.25, so Sterbenz or a common ulp); below, k <= 0 gives 0
        # (a +0, never ceil's -0).
        inv_step = ((255 << 23) - a_exp).to(tl.float32, bitcast=True)  # 2**(1 - E)
        step = (a_exp - (1 << 23)).to(tl.float32, bitcast=True)  # 2**(E - 1)
        k = tl.math.ceil(a * inv_step - 0.5)
        return tl.minimum(tl.where(k > 0.0, k * step, 0.0), E2M1_MAX)
    magic = (a_exp + ((22 << 23) | 0x00400000)).to(tl.float32, bitcast=True)
    return tl.minimum((a + magic) - magic, E2M1_MAX)


@triton.jit
def element_code(r, negative, ELEM: tl.constexpr):
    """A rounded magnitude ``r`` (from :func:`round_magnitude`) and a bool sign -> int32 code:
    E2M1 ``0..15`` (bit 3 the sign), E4M3 byte (bit 7 the sign; subnormals ``r / 2**-9``)."""
    rb = r.to(tl.int32, bitcast=True)
    r_exp = (rb >> 23) & 0xFF
    if ELEM == 1:
        code = tl.where(r_exp >= 121, ((r_exp - 120) << 3) | ((rb >> 20) & 7), (r * 512.0).to(tl.int32))
        return code | tl.where(negative, 0x80, 0)
    code = tl.where(r_exp < 127, (r * 2.0).to(tl.int32), ((r_exp - 126) << 1) | ((rb >> 22) & 1))
    return code | tl.where(negative, 8, 0)


@triton.jit
def fake_value_bits(r, byte, sign_bits):
    """float32 bits of ``r * 2**(byte - 127)`` with the sign bit ``sign_bits`` (int32, 0 or
    ``-2**31``): exact, or +-inf past float32's range; byte 0 is the subnormal ``2**-127``."""
    scale = tl.where(byte == 0, HALF_MIN_NORMAL_BITS, byte << 23).to(tl.float32, bitcast=True)
    return (r * scale[:, None]).to(tl.int32, bitcast=True) | sign_bits


@triton.jit
def float32_bits(x, KIND: tl.constexpr):
    """Loaded elements (bf16 as int16 bits, fp16 as fp16, fp32 as int32 bits) -> int32 float32 bits
    (exact widening)."""
    if KIND == 0:
        bits = x.to(tl.int32) << 16
    elif KIND == 1:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    else:
        bits = x
    return bits


@triton.jit
def qdq_tile(
    x_ptr,
    out_ptr,
    codes_ptr,
    scales_ptr,
    blk0,
    n_blocks,
    KIND: tl.constexpr,
    BS: tl.constexpr,
    BS_P2: tl.constexpr,
    NB: tl.constexpr,
    WRITE_VALUES: tl.constexpr,
    WRITE_CODES: tl.constexpr,
    ELEM: tl.constexpr,
    SCALE: tl.constexpr,
    TIES: tl.constexpr,
    FTZ: tl.constexpr,
):
    """Quantize blocks ``blk0 .. blk0 + NB - 1`` (those ``< n_blocks``) of one tensor.

    ``x_ptr``/``out_ptr`` point at element 0 of the tensor's input / fake-quantized output,
    ``codes_ptr`` at its codes (E2M1: ``BS // 2`` packed bytes per block; E4M3: ``BS`` bytes),
    ``scales_ptr`` at its scale bytes (one per block). ``BS_P2`` is ``BS`` rounded up to a power of
    two (padding lanes are masked and read as 0, which leaves the block max unchanged).
    ``ELEM``/``SCALE``/``TIES``/``FTZ`` select the rule (module docstring).
    """
    blk0 = blk0.to(tl.int64)
    rows = tl.arange(0, NB)
    cols = tl.arange(0, BS_P2)
    row_ok = (blk0 + rows) < n_blocks
    mask = row_ok[:, None]
    if BS_P2 != BS:
        mask = mask & (cols < BS)[None, :]
    offs = rows[:, None] * BS + cols[None, :]
    x = tl.load(x_ptr + blk0 * BS + offs, mask=mask, other=0)

    bits = float32_bits(x, KIND)
    mag = bits & 0x7FFFFFFF

    # a. amax per block on magnitude bits (monotone for non-negative floats; NaN > inf).
    amax_bits = tl.max(mag, axis=1)
    nonfinite = amax_bits >= INF_BITS
    # b./c. the scale byte (FLASHINFER_MXFP4: p = amax * RN(1/6), ceil from the exponent field of
    # p, satfinite 254, subnormal/zero p -> 0).
    byte = scale_byte(amax_bits, ELEM, SCALE, FTZ)

    if WRITE_CODES:
        if (ELEM == 0) and (SCALE == 0) and (TIES == 0) and FTZ:  # FLASHINFER_MXFP4
            # d. (codes, integer pipe) v = x * 2**(127 - byte) by moving the exponent field; FTZ for
            # subnormal x; a v below 2**-126 can only round to code 0, so it is 0 here too. Byte 0 and
            # 254 use multiplier 0.
            shift = (127 - byte)[:, None]
            x_exp = mag >> 23
            v_zero = (x_exp == 0) | (x_exp + shift <= 0)
            v_zero = v_zero | ((byte == 0) | (byte >= 254) | nonfinite)[:, None]
            vmag = tl.where(v_zero, 0, mag + (shift << 23))
            code = _e2m1_magnitude_code(vmag) | tl.where(bits < 0, 8, 0)
        else:
            a = tl.where(nonfinite[:, None], 0.0, scaled_magnitude(mag, byte, SCALE, FTZ))
            code = element_code(round_magnitude(a, ELEM, TIES), bits < 0, ELEM)
        if ELEM == 0:
            pairs = tl.reshape(code, [NB, BS_P2 // 2, 2])
            even, odd = tl.split(pairs)
            packed = (even | (odd << 4)).to(tl.uint8)
            prow = tl.arange(0, BS_P2 // 2)
            pmask = row_ok[:, None]
            if BS_P2 != BS:
                pmask = pmask & (prow < BS // 2)[None, :]
            poffs = rows[:, None] * (BS // 2) + prow[None, :]
            tl.store(codes_ptr + blk0 * (BS // 2) + poffs, packed, mask=pmask)
        else:
            tl.store(codes_ptr + blk0 * BS + offs, code.to(tl.uint8), mask=mask)
        tl.store(scales_ptr + blk0 + rows, byte.to(tl.uint8), mask=row_ok)

    if WRITE_VALUES:
        if (ELEM == 0) and (SCALE == 0) and (TIES == 0) and FTZ:  # FLASHINFER_MXFP4
            # Values on the fp32 pipe (Hopper issues fp32 at twice the int32 rate; the integer code
            # path above is only taken when codes are asked for). Every multiply is by an exact power
            # of two.
            #   a = |x| * 2**(127 - byte)          exact; FTZ: a float32-subnormal x gives 0
            #   The E2M1 grid step in a's binade 2**E is 2**(E-1), with E clamped to [0, 2] (step 0.5
            #   below 2, 1 below 4, 2 above). Adding M = 1.5 * 2**(E+22), whose ulp is that step,
            #   rounds a half-to-even onto the grid in one IEEE add: r = (a + M) - M. Even multiples
            #   of the step are the even E2M1 codes, so ties go where cvt.rn.satfinite.e2m1 sends
            #   them. Then saturate at 6.
            #   value = r * 2**(byte - 127), exact or +inf past float32's range (bf16 max -> 2**128).
            inv = tl.where((byte > 0) & (byte < 254), (254 - byte) << 23, 0).to(tl.float32, bitcast=True)
            scale = (byte << 23).to(tl.float32, bitcast=True)
            a = mag.to(tl.float32, bitcast=True) * inv[:, None]
            a = tl.where(mag < 0x00800000, 0.0, a)
            a_exp = tl.minimum(tl.maximum(a.to(tl.int32, bitcast=True) & 0x7F800000, 127 << 23), 129 << 23)
            magic = (a_exp + ((22 << 23) | 0x00400000)).to(tl.float32, bitcast=True)
            q = tl.minimum((a + magic) - magic, 6.0)
            vbits = (q * scale[:, None]).to(tl.int32, bitcast=True) | (bits & SIGN32)
        else:
            r = round_magnitude(scaled_magnitude(mag, byte, SCALE, FTZ), ELEM, TIES)
            vbits = fake_value_bits(r, byte, bits & SIGN32)
        bad = nonfinite[:, None]
        if KIND == 0:
            out = tl.where(bad, NAN_BF16, vbits >> 16).to(tl.int16)  # exact: <= 4 significant bits
        elif KIND == 1:
            half_bits = vbits.to(tl.float32, bitcast=True).to(tl.float16).to(tl.int16, bitcast=True)
            out = tl.where(bad, NAN_FP16, half_bits.to(tl.int32)).to(tl.int16)
        else:
            out = tl.where(bad, NAN_FP32, vbits)
        tl.store(out_ptr + blk0 * BS + offs, out, mask=mask)


@triton.jit(do_not_specialize=["n_blocks"])
def qdq_single_kernel(
    x_ptr,
    out_ptr,
    codes_ptr,
    scales_ptr,
    n_blocks,
    KIND: tl.constexpr,
    BS: tl.constexpr,
    BS_P2: tl.constexpr,
    NB: tl.constexpr,
    WRITE_VALUES: tl.constexpr,
    WRITE_CODES: tl.constexpr,
    ELEM: tl.constexpr,
    SCALE: tl.constexpr,
    TIES: tl.constexpr,
    FTZ: tl.constexpr,
):
    """One contiguous tensor of ``n_blocks`` blocks; program ``i`` does blocks ``[i*NB, (i+1)*NB)``.
    ``n_blocks`` is not specialised (a prepared launch reuses the compiled kernel for any count)."""
    blk0 = tl.program_id(0).to(tl.int64) * NB
    qdq_tile(
        x_ptr, out_ptr, codes_ptr, scales_ptr, blk0, n_blocks, KIND, BS, BS_P2, NB, WRITE_VALUES, WRITE_CODES,
        ELEM, SCALE, TIES, FTZ,
    )  # fmt: skip


@triton.jit
def qdq_grouped_kernel(
    base_ptr,
    table_ptr,
    out_ptr,
    codes_ptr,
    scales_ptr,
    KIND: tl.constexpr,
    BS: tl.constexpr,
    BS_P2: tl.constexpr,
    NB: tl.constexpr,
    IN_ALIGN: tl.constexpr,
    WRITE_VALUES: tl.constexpr,
    WRITE_CODES: tl.constexpr,
    ELEM: tl.constexpr,
    SCALE: tl.constexpr,
    TIES: tl.constexpr,
    FTZ: tl.constexpr,
):
    """Many contiguous tensors of one dtype in one launch.

    ``table_ptr`` (int64) holds three numbers per program: the element offset of its first input
    element from ``base_ptr`` (>= 0, a multiple of ``IN_ALIGN``), the index of its first block in
    the flat outputs (values: ``BS`` elements a block, codes ``BS // 2`` (E2M1) or ``BS`` (E4M3)
    bytes, scales 1 byte), and
    how many of its ``NB`` blocks exist. Three independent loads, no search.
    """
    row = table_ptr + tl.program_id(0).to(tl.int64) * 3
    in_off = tl.multiple_of(tl.load(row), IN_ALIGN)
    out_blk = tl.load(row + 1)
    n_valid = tl.load(row + 2)
    if ELEM == 0:
        codes_blk = codes_ptr + out_blk * (BS // 2)
    else:
        codes_blk = codes_ptr + out_blk * BS
    qdq_tile(
        base_ptr + in_off,
        out_ptr + out_blk * BS,
        codes_blk,
        scales_ptr + out_blk,
        n_valid * 0,  # the program's first block is at offset 0 of the shifted pointers
        n_valid,
        KIND,
        BS,
        BS_P2,
        NB,
        WRITE_VALUES,
        WRITE_CODES,
        ELEM,
        SCALE,
        TIES,
        FTZ,
    )
