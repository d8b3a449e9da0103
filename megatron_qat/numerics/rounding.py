"""The steps of every :class:`~megatron_qat.numerics.rules.Rule`, vectorised in PyTorch (any device).

Per block of ``block_size`` elements along the last dim (rules.py states each rule and its source):

a. ``amax = max |x|`` in float32 (exact for bf16/fp16/float32 input);
b./c. the E8M0 scale byte: :func:`scale_bytes` (``CEIL``: :func:`e8m0_ceil_from_float32` of
   ``amax * RN(1/max)``; ``EVEN``: :func:`e8m0_even_from_amax`);
d. ``v = x * multiplier(byte)`` (:func:`multipliers`: an exact power of two, or 0), with the rule's
   flush-to-zero of subnormal inputs (:func:`scaled_elements`);
e. the element code of ``v`` (:func:`round_elements`: E2M1 RNE or ties toward zero, saturating at
   +-6; E4M3 RNE with its subnormals, clamped at +-448), the sign bit from the sign of ``v``.

Every function here is exact on the float32 bit patterns (integer adds and shifts, power-of-two
multiplies, ``torch.round`` of values exact in float32); no host sync and no host-to-device copy.
Inputs of :func:`round_elements` must be NaN-free (callers zero the non-finite blocks first).
"""

from __future__ import annotations

import torch

from .constants import E4M3_MAX, EVEN_ROUND_BITS
from .format import FLT_MIN_NORMAL, float32_from_bits
from .rules import Element, Rule, ScaleRounding, Ties

# E2M1 decision points on |v|, in order; a magnitude passes a threshold when it is above it (or on
# it, for the round-to-nearest-even ties that go UP to the even code). The code is the count passed.
#   RNE: tie 0.25 -> 0 (code 0), 0.75 -> 1.0 (2), 1.25 -> 1.0 (2), 1.75 -> 2.0 (4), 2.5 -> 2.0 (4),
#        3.5 -> 4.0 (6), 5 -> 4.0 (6); above 5 (incl. > 6 and inf) saturates to code 7 (6.0).
#   toward zero: every tie goes to the smaller magnitude (all comparisons strict).
_E2M1_THRESHOLDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_RNE_TIE_UP = (False, True, False, True, False, True, False)
_E4M3_MIN_NORMAL_EXP = 121  # float32 exponent field of 2**-6, E4M3's smallest normal


def e8m0_ceil_from_float32(p: torch.Tensor, *, ftz: bool = True) -> torch.Tensor:
    """Step c of ``CEIL``: float32 ``p >= 0`` -> int32 byte ``ceil(log2 p) + 127`` in [0, 254].

    Read off the bits: the exponent field, plus one when any mantissa bit is set; saturated at 254
    (``+inf`` -> 254). A zero or subnormal ``p``: 0 with ``ftz`` (FlashInfer's fast-math multiply
    flushes it); without ``ftz`` 1 for ``p`` in (2**-127, 2**-126) and 0 for ``p <= 2**-127``
    (FlashInfer CuTe-DSL ``float_to_ue8m0_fast``), which is again ``ceil(log2 p) + 127`` clamped.
    """
    bits = p.contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    byte = exponent + (mantissa != 0).to(torch.int32)
    subnormal_byte = torch.zeros_like(byte) if ftz else (mantissa > 0x400000).to(torch.int32)
    byte = torch.where(exponent == 0, subnormal_byte, byte)
    return byte.clamp_(max=254)


def e8m0_even_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Steps b-c of ``EVEN`` (vLLM 0.33 ``_compute_quant_and_scale``): float32 ``amax`` (finite)
    -> int32 byte: ``r = (bits(amax) + 0x200000) >> 23`` (the exponent field of the amax rounded
    up to a power of two at mantissa >= 1.75), byte ``max(r - 2, 0)``, or 254 when ``r`` is 255
    (the rounded amax is +inf: ``log2`` gives inf and vLLM's clamp gives scale 2**127)."""
    r = ((amax.contiguous().view(torch.int32) + EVEN_ROUND_BITS) >> 23) & 0xFF
    return torch.where(r == 255, torch.full_like(r, 254), (r - 2).clamp_(min=0))


def scale_bytes(amax: torch.Tensor, rule: Rule) -> torch.Tensor:
    """Steps b-c: float32 block maxima -> int32 scale bytes under ``rule``. Non-finite maxima give
    a meaningless byte (callers mask those blocks)."""
    if rule.scale is ScaleRounding.EVEN:
        return e8m0_even_from_amax(amax)
    # b. one float32 multiply by RN(1/max), round to nearest (the Python float is exactly that float32)
    p = amax * float32_from_bits(rule.rcp_bits)
    return e8m0_ceil_from_float32(p, ftz=rule.ftz)


def multipliers(byte: torch.Tensor, rule: Rule) -> torch.Tensor:
    """Step d's multiplier, float32 ``2**(127 - byte)`` built from bits (exact).

    Bytes 1..253: exact. ``EVEN``: byte 0 -> ``2**127``, byte 254 -> the subnormal ``2**-127``
    (vLLM's ``1 / exp2(s)`` read as IEEE). Other rules: bytes 0 and 254 -> 0.0 (FlashInfer:
    ``SFValue != 0 ? rcp : 0`` and a flushed ``2**-127``; CuTe-DSL ``ue8m0_to_inv_scale_fast``)."""
    inv_bits = (254 - byte) << 23
    if rule.scale is ScaleRounding.EVEN:
        inv_bits = torch.where(byte == 254, torch.full_like(inv_bits, 0x00400000), inv_bits)
        return inv_bits.view(torch.float32)
    inv = inv_bits.view(torch.float32)
    return torch.where((byte > 0) & (byte < 254), inv, torch.zeros_like(inv))


def scaled_elements(blocks: torch.Tensor, byte: torch.Tensor, rule: Rule) -> torch.Tensor:
    """Step d: float32 ``[..., nb, bs]`` blocks, int32 ``[..., nb]`` bytes -> float32 ``v``.
    With ``rule.ftz`` a float32-subnormal element becomes a zero of its sign before scaling."""
    v = blocks * multipliers(byte, rule).unsqueeze(-1)
    if rule.ftz:
        v = torch.where(blocks.abs() < FLT_MIN_NORMAL, blocks * 0.0, v)  # keeps the sign of zero
    return v


def e2m1_round_codes(v: torch.Tensor, ties: Ties = Ties.EVEN) -> torch.Tensor:
    """Step e for E2M1: float32 ``v`` -> uint8 code (bit 3 = sign of ``v``), saturating at +-6
    (``|v| > 6`` and inf -> magnitude code 7). ``ties``: RNE (``cvt.rn.satfinite.e2m1``) or toward
    zero. ``v`` must be NaN-free."""
    a = v.abs()
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for threshold, tie_up in zip(_E2M1_THRESHOLDS, _E2M1_RNE_TIE_UP):
        code += (a >= threshold) if (tie_up and ties is Ties.EVEN) else (a > threshold)
    code |= torch.signbit(v).to(torch.uint8) << 3
    return code


def e4m3_round_magnitudes(a: torch.Tensor) -> torch.Tensor:
    """float32 ``a`` in [0, 448] -> the nearest E4M3 magnitude (ties to even), float32.

    The E4M3 quantum in ``a``'s binade is ``2**(E - 3)`` (``E`` = exponent of ``a``, at least -6:
    below 2**-6 the subnormal quantum 2**-9); ``a / quantum`` is exact and ``torch.round`` rounds
    half to even, which is the even E4M3 code. A carry into the next binade (1.9375 -> 2) is a
    correct E4M3 value; nothing exceeds 448 because 448 is on the grid."""
    exp = ((a.contiguous().view(torch.int32) >> 23) & 0xFF).clamp(min=_E4M3_MIN_NORMAL_EXP)
    quantum = ((exp - 3) << 23).view(torch.float32)
    inv_quantum = ((254 - (exp - 3)) << 23).view(torch.float32)
    return torch.round(a * inv_quantum) * quantum


def e4m3_code_of_magnitude(r: torch.Tensor) -> torch.Tensor:
    """An E4M3 magnitude ``r`` (float32 on the grid, <= 448) -> its 7-bit code, int32: normal
    ``(E + 7) << 3 | mantissa``, subnormal ``r / 2**-9``."""
    bits = r.contiguous().view(torch.int32)
    exp = (bits >> 23) & 0xFF
    normal = ((exp - (_E4M3_MIN_NORMAL_EXP - 1)) << 3) | ((bits >> 20) & 7)
    return torch.where(exp >= _E4M3_MIN_NORMAL_EXP, normal, (r * 512.0).to(torch.int32))


def e4m3_round_codes(v: torch.Tensor) -> torch.Tensor:
    """Step e for E4M3: float32 ``v`` -> uint8 E4M3 byte: clamp to +-448, then round to nearest
    even (``cvt.rn.satfinite.e4m3x2.f32``), sign bit 7 from the sign of ``v``. NaN-free ``v``."""
    r = e4m3_round_magnitudes(v.abs().clamp(max=float(E4M3_MAX)))
    code = e4m3_code_of_magnitude(r) | (torch.signbit(v).to(torch.int32) << 7)
    return code.to(torch.uint8)


def round_elements(v: torch.Tensor, rule: Rule) -> torch.Tensor:
    """Step e under ``rule``: uint8 codes (E2M1: 0..15, one per element, unpacked; E4M3: bytes)."""
    if rule.element is Element.E4M3:
        return e4m3_round_codes(v)
    return e2m1_round_codes(v, rule.ties)


def quantize_blocks(blocks: torch.Tensor, rule: Rule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 ``[..., nb, bs]`` -> (codes uint8 ``[..., nb, bs]``, bytes int32 ``[..., nb]``,
    non-finite mask bool ``[..., nb]``). Codes of non-finite blocks are those of a zero block."""
    amax = blocks.abs().amax(dim=-1)  # NaN propagates through amax: the block is marked non-finite
    nonfinite = ~torch.isfinite(amax)
    byte = scale_bytes(amax, rule)
    v = scaled_elements(blocks, byte, rule)
    v = torch.where(nonfinite.unsqueeze(-1), torch.zeros_like(v), v)  # keep the codes NaN-free
    return round_elements(v, rule), byte, nonfinite
