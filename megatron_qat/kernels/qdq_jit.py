"""Triton device code of the MXFP4 quantize / fake-quantize kernel (host side: ``triton_qdq``).

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
# Canonical quiet NaN written for non-finite blocks (see docs/kernel.md, "NaN bits").
NAN_BF16 = tl.constexpr(constants.NAN_BITS_BF16)
NAN_FP16 = tl.constexpr(constants.NAN_BITS_FP16)
NAN_FP32 = tl.constexpr(constants.NAN_BITS_FP32)
# float32 field masks (IEEE 754 layout, not MXFP4 facts).
INF_BITS = tl.constexpr(0x7F800000)
SIGN32 = tl.constexpr(-(2**31))


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
):
    """Quantize blocks ``blk0 .. blk0 + NB - 1`` (those ``< n_blocks``) of one tensor.

    ``x_ptr``/``out_ptr`` point at element 0 of the tensor's input / fake-quantized output,
    ``codes_ptr`` at its packed codes (``BS // 2`` bytes per block), ``scales_ptr`` at its scale
    bytes (one per block). ``BS_P2`` is ``BS`` rounded up to a power of two (padding lanes are
    masked and read as 0, which leaves the block max unchanged).
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

    # float32 bits of x (exact widening).
    if KIND == 0:
        bits = x.to(tl.int32) << 16
    elif KIND == 1:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    else:
        bits = x
    mag = bits & 0x7FFFFFFF

    # a. amax per block on magnitude bits (monotone for non-negative floats; NaN > inf).
    amax_bits = tl.max(mag, axis=1)
    nonfinite = amax_bits >= INF_BITS
    # b. p = amax * RN(1/6): one IEEE float32 multiply.
    rcp6 = tl.full([NB], RCP_SIX_BITS, tl.int32).to(tl.float32, bitcast=True)
    p_bits = (amax_bits.to(tl.float32, bitcast=True) * rcp6).to(tl.int32, bitcast=True)
    # c. byte = ceil(log2 p) + 127 from the exponent field, satfinite 254; subnormal/zero p -> 0.
    p_exp = (p_bits >> 23) & 0xFF
    byte = p_exp + ((p_bits & 0x7FFFFF) != 0).to(tl.int32)
    byte = tl.where(p_exp == 0, 0, tl.minimum(byte, 254))

    if WRITE_CODES:
        # d. (codes, integer pipe) v = x * 2**(127 - byte) by moving the exponent field; FTZ for
        # subnormal x; a v below 2**-126 can only round to code 0, so it is 0 here too. Byte 0 and
        # 254 use multiplier 0.
        shift = (127 - byte)[:, None]
        x_exp = mag >> 23
        v_zero = (x_exp == 0) | (x_exp + shift <= 0)
        v_zero = v_zero | ((byte == 0) | (byte >= 254) | nonfinite)[:, None]
        vmag = tl.where(v_zero, 0, mag + (shift << 23))
        c3 = _e2m1_magnitude_code(vmag)
        code = c3 | tl.where(bits < 0, 8, 0)
        pairs = tl.reshape(code, [NB, BS_P2 // 2, 2])
        even, odd = tl.split(pairs)
        packed = (even | (odd << 4)).to(tl.uint8)
        prow = tl.arange(0, BS_P2 // 2)
        pmask = row_ok[:, None]
        if BS_P2 != BS:
            pmask = pmask & (prow < BS // 2)[None, :]
        poffs = rows[:, None] * (BS // 2) + prow[None, :]
        tl.store(codes_ptr + blk0 * (BS // 2) + poffs, packed, mask=pmask)
        tl.store(scales_ptr + blk0 + rows, byte.to(tl.uint8), mask=row_ok)

    if WRITE_VALUES:
        # Values on the fp32 pipe (Hopper issues fp32 at twice the int32 rate; the integer code path
        # above is only taken when codes are asked for). Every multiply is by an exact power of two.
        #   a = |x| * 2**(127 - byte)          exact; FTZ: a float32-subnormal x gives 0
        #   The E2M1 grid step in a's binade 2**E is 2**(E-1), with E clamped to [0, 2] (step 0.5
        #   below 2, 1 below 4, 2 above). Adding M = 1.5 * 2**(E+22), whose ulp is that step, rounds
        #   a half-to-even onto the grid in one IEEE add: r = (a + M) - M. Even multiples of the step
        #   are the even E2M1 codes, so ties go where cvt.rn.satfinite.e2m1 sends them. Then
        #   saturate at 6.
        #   value = r * 2**(byte - 127), exact or +inf past float32's range (bf16 max -> 2**128).
        inv = tl.where((byte > 0) & (byte < 254), (254 - byte) << 23, 0).to(tl.float32, bitcast=True)
        scale = (byte << 23).to(tl.float32, bitcast=True)
        a = mag.to(tl.float32, bitcast=True) * inv[:, None]
        a = tl.where(mag < 0x00800000, 0.0, a)
        a_exp = tl.minimum(tl.maximum(a.to(tl.int32, bitcast=True) & 0x7F800000, 127 << 23), 129 << 23)
        magic = (a_exp + ((22 << 23) | 0x00400000)).to(tl.float32, bitcast=True)
        q = tl.minimum((a + magic) - magic, 6.0)
        vbits = (q * scale[:, None]).to(tl.int32, bitcast=True) | (bits & SIGN32)
        bad = nonfinite[:, None]
        if KIND == 0:
            out = tl.where(bad, NAN_BF16, vbits >> 16).to(tl.int16)  # exact: 2 significant bits
        elif KIND == 1:
            half_bits = vbits.to(tl.float32, bitcast=True).to(tl.float16).to(tl.int16, bitcast=True)
            out = tl.where(bad, NAN_FP16, half_bits.to(tl.int32)).to(tl.int16)
        else:
            out = tl.where(bad, NAN_FP32, vbits)
        tl.store(out_ptr + blk0 * BS + offs, out, mask=mask)


@triton.jit
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
):
    """One contiguous tensor of ``n_blocks`` blocks; program ``i`` does blocks ``[i*NB, (i+1)*NB)``."""
    blk0 = tl.program_id(0).to(tl.int64) * NB
    qdq_tile(x_ptr, out_ptr, codes_ptr, scales_ptr, blk0, n_blocks, KIND, BS, BS_P2, NB, WRITE_VALUES, WRITE_CODES)


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
):
    """Many contiguous tensors of one dtype in one launch.

    ``table_ptr`` (int64) holds three numbers per program: the element offset of its first input
    element from ``base_ptr`` (>= 0, a multiple of ``IN_ALIGN``), the index of its first block in
    the flat outputs (values: ``BS`` elements a block, codes ``BS // 2`` bytes, scales 1 byte), and
    how many of its ``NB`` blocks exist. Three independent loads, no search.
    """
    row = table_ptr + tl.program_id(0).to(tl.int64) * 3
    in_off = tl.multiple_of(tl.load(row), IN_ALIGN)
    out_blk = tl.load(row + 1)
    n_valid = tl.load(row + 2)
    qdq_tile(
        base_ptr + in_off,
        out_ptr + out_blk * BS,
        codes_ptr + out_blk * (BS // 2),
        scales_ptr + out_blk,
        n_valid * 0,  # the program's first block is at offset 0 of the shifted pointers
        n_valid,
        KIND,
        BS,
        BS_P2,
        NB,
        WRITE_VALUES,
        WRITE_CODES,
    )
