"""Triton device code of the MXFP4 statistics pass (host side: :mod:`.triton_stats`).

Two parts:

- :func:`quantize_tile`, the ONE call that applies the weight rule to a tile of blocks and
  returns everything the statistics need per block (scale byte, amax) and per element (``a = |v|``,
  its rounded grid magnitude ``q``, the fake value in the weight's dtype). It is built from the
  QDQ kernel's per-block pieces (``qdq_jit.scale_byte``, ``scaled_magnitude``, ``round_magnitude``,
  ``fake_value_bits``), selected by the same rule constexprs (``SCALE``, ``TIES``, ``FTZ``; E2M1
  elements), so the statistics describe exactly what ``fake_quantize`` computes under that rule.
- :func:`stats_kernel`, one launch per module: program ``(c, e)`` walks the tiles ``c, c + C,
  c + 2C, ...`` of expert ``e`` (``C`` programs per expert), reads each element once, keeps its
  partial results in registers and writes them once at the end: float64 partial sums to its own
  slot (reduced on the device afterwards in a fixed order, so the sums are deterministic), int64
  counters, scale-byte histogram and the expert's non-finite block count by atomic adds (integer
  atomics: order-independent, exact). The statistics never look at the rule, only at what
  :func:`quantize_tile` returns.

Per element the statistics cost: the rule (integer + fp32 pipe), two float32 -> float64
conversions and three float64 operations for ``(fake - x)**2`` and ``x**2``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .qdq_jit import (E2M1_MAX, INF_BITS, SIGN32, fake_value_bits, float32_bits, round_magnitude, scale_byte,
                      scaled_magnitude)

# An element is a tie when |v| is the midpoint of two adjacent E2M1 magnitudes (0.25, 0.75, 1.25,
# 1.75, 2.5, 3.5, 5): the rounding rule, not the value, decides where it goes. Within the binade
# of |v| (exponent E clamped to [0, 2], as in the rounding) the grid step is 2**(E-1), so the
# midpoints are exactly the |v| at distance 2**(E-2) from the grid value they round to. Checked
# against the midpoints of E2M1_MAGNITUDES by tests/test_metrics_kernel.py.
HALF_STEP_OFFSET = tl.constexpr(2 << 23)  # exponent field of 2**(E-2) = that of 2**E minus 2

# The int64 counters the kernel writes, in the order of megatron_qat.metrics.block_stats.COUNT_FIELDS:
# finite blocks, finite elements, flushed blocks, flushed blocks not all zero, elements at +-6,
# ties, non-finite blocks.
N_COUNTERS = tl.constexpr(7)
SCALE_BINS = tl.constexpr(256)


@triton.jit
def quantize_tile(bits, KIND: tl.constexpr, SCALE: tl.constexpr, TIES: tl.constexpr, FTZ: tl.constexpr):
    """The E2M1 weight rule (``SCALE``, ``TIES``, ``FTZ``: ``triton_qdq.rule_constexprs``) on a tile
    ``bits`` (int32 float32 bit patterns ``[NB, BS_P2]``, one block per row; padding lanes hold 0).

    Returns ``(byte, amax_bits, a, q, fake)``:
    - ``byte`` int32 ``[NB]``: E8M0 scale byte (meaningless for a non-finite block);
    - ``amax_bits`` int32 ``[NB]``: float32 bits of the block's max ``|x|``; ``>= INF_BITS`` marks a
      block holding NaN or inf, 0 an all-zero block;
    - ``a`` float32 ``[NB, BS_P2]``: ``|v| = |x| * multiplier(byte)`` (with the rule's FTZ);
    - ``q`` float32: ``a`` rounded onto the E2M1 magnitudes by the rule's ties, saturated at 6 (the
      magnitude of the element's code);
    - ``fake`` float32: the fake-quantized element in the weight's dtype (``KIND``), i.e.
      ``sign(x) * q * 2**(byte - 127)`` rounded to that dtype, as ``fake_quantize`` writes it
      (exact in float32 or +inf past its range, exact in bf16; fp16 rounds it, IEEE RNE).
    """
    mag = bits & 0x7FFFFFFF
    amax_bits = tl.max(mag, axis=1)  # NaN bits sort above inf
    byte = scale_byte(amax_bits, 0, SCALE, FTZ)
    a = scaled_magnitude(mag, byte, SCALE, FTZ)
    q = round_magnitude(a, 0, TIES)
    fake = fake_value_bits(q, byte, bits & SIGN32).to(tl.float32, bitcast=True)
    if KIND == 1:
        fake = fake.to(tl.float16).to(tl.float32)
    return byte, amax_bits, a, q, fake


@triton.jit
def is_tie(a, q):
    """``a`` (``|v|``, rounded to its nearest E2M1 magnitude ``q`` by any tie rule) sits exactly on
    an E2M1 decision point: its distance to ``q`` is half the grid step of its binade (see
    ``HALF_STEP_OFFSET``). ``a - q`` is exact."""
    a_exp = tl.minimum(tl.maximum(a.to(tl.int32, bitcast=True) & 0x7F800000, 127 << 23), 129 << 23)
    dist = (a - q).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return dist == a_exp - HALF_STEP_OFFSET


@triton.jit
def stats_kernel(
    base_ptr,
    table_ptr,
    partial_ptr,
    ints_ptr,
    KIND: tl.constexpr,
    BS: tl.constexpr,
    BS_P2: tl.constexpr,
    NB: tl.constexpr,
    IN_ALIGN: tl.constexpr,
    ELEM: tl.constexpr,
    SCALE: tl.constexpr,
    TIES: tl.constexpr,
    FTZ: tl.constexpr,
):
    """Statistics of the experts of one module under an E2M1 rule (``ELEM == 0``), grid ``(C, n_experts)``.

    ``table_ptr`` (int64 ``[n_experts, 2]``): per expert, the element offset of its first element
    from ``base_ptr`` (a multiple of ``IN_ALIGN``) and its number of blocks. A tile is ``NB``
    consecutive blocks (``NB * BS`` elements, one block per row, padded to ``BS_P2`` lanes).

    Writes ``partial_ptr[(e * C + c) * 2 + {0, 1}]`` (float64: sum of ``(fake - x)**2`` and of
    ``x**2`` over the program's finite blocks) and adds into ``ints_ptr`` (int64, zeroed by the
    caller): ``[0, 7)`` the counters (``N_COUNTERS``, in ``COUNT_FIELDS`` order), ``[7, 263)`` the scale-byte histogram
    of finite blocks, ``263 + e`` expert ``e``'s non-finite blocks.
    """
    tl.static_assert(ELEM == 0, "the statistics are defined for E2M1 weight rules")
    c = tl.program_id(0).to(tl.int64)
    n_prog = tl.num_programs(0).to(tl.int64)
    e = tl.program_id(1).to(tl.int64)
    in_off = tl.load(table_ptr + e * 2)
    n_blocks = tl.load(table_ptr + e * 2 + 1)
    n_tiles = (n_blocks + NB - 1) // NB

    rows = tl.arange(0, NB)
    cols = tl.arange(0, BS_P2)
    offs = rows[:, None] * BS + cols[None, :]
    col_ok = (cols < BS)[None, :]

    # Per-row accumulators (row i of every tile): one cross-lane reduction at the end, not per tile.
    sq_err = tl.zeros([NB], tl.float64)
    sq_master = tl.zeros([NB], tl.float64)
    finite_n = tl.zeros([NB], tl.int32)
    flushed_n = tl.zeros([NB], tl.int32)
    flushed_nz_n = tl.zeros([NB], tl.int32)
    nonfinite_n = tl.zeros([NB], tl.int32)
    at_max_n = tl.zeros([NB], tl.int32)
    ties_n = tl.zeros([NB], tl.int32)
    hist = tl.zeros([SCALE_BINS], tl.int32)
    rows_seen = n_blocks * 0

    for t in range(c, n_tiles, n_prog):
        blk0 = t * NB
        start = tl.multiple_of(in_off + blk0 * BS, IN_ALIGN)
        row_ok = (blk0 + rows) < n_blocks
        mask = row_ok[:, None]
        if BS_P2 != BS:
            mask = mask & col_ok
        x = tl.load(base_ptr + start + offs, mask=mask, other=0)
        bits = float32_bits(x, KIND)
        byte, amax_bits, a, q, fake = quantize_tile(bits, KIND, SCALE, TIES, FTZ)

        finite = amax_bits < INF_BITS
        ok = finite & row_ok
        okm = ok[:, None]
        # non-finite blocks are zeroed before the (quarter-rate) float64 conversions
        x64 = tl.where(okm, bits.to(tl.float32, bitcast=True), 0.0).to(tl.float64)
        err = tl.where(okm, fake, 0.0).to(tl.float64) - x64
        sq_err += tl.sum(err * err, axis=1)
        sq_master += tl.sum(x64 * x64, axis=1)
        at_max_n += tl.sum((okm & (q == E2M1_MAX)).to(tl.int32), axis=1)
        ties_n += tl.sum((okm & is_tie(a, q)).to(tl.int32), axis=1)

        # flushed: the scale alone zeroes the block (byte 0 multiplies by 0 under CEIL; not under EVEN)
        flushed = ok & (byte == 0) & (SCALE == 0)
        finite_n += ok.to(tl.int32)
        flushed_n += flushed.to(tl.int32)
        flushed_nz_n += (flushed & (amax_bits > 0)).to(tl.int32)
        nonfinite_n += (row_ok & (amax_bits >= INF_BITS)).to(tl.int32)
        # blocks that are not counted (non-finite, past the end) go to bin 0 and are taken out below
        hist += tl.histogram(tl.where(ok, byte, 0), SCALE_BINS)
        rows_seen += NB

    slot = partial_ptr + (e * n_prog + c) * 2
    tl.store(slot, tl.sum(sq_err, axis=0))
    tl.store(slot + 1, tl.sum(sq_master, axis=0))

    finite_blocks = tl.sum(finite_n.to(tl.int64), axis=0)
    nonfinite_blocks = tl.sum(nonfinite_n.to(tl.int64), axis=0)
    idx = tl.arange(0, 8)
    counts = tl.where(idx == 0, finite_blocks, 0)
    counts = tl.where(idx == 1, finite_blocks * BS, counts)
    counts = tl.where(idx == 2, tl.sum(flushed_n.to(tl.int64), axis=0), counts)
    counts = tl.where(idx == 3, tl.sum(flushed_nz_n.to(tl.int64), axis=0), counts)
    counts = tl.where(idx == 4, tl.sum(at_max_n.to(tl.int64), axis=0), counts)
    counts = tl.where(idx == 5, tl.sum(ties_n.to(tl.int64), axis=0), counts)
    counts = tl.where(idx == 6, nonfinite_blocks, counts)
    tl.atomic_add(ints_ptr + idx, counts, mask=(idx < N_COUNTERS) & (counts != 0))

    bins = tl.arange(0, SCALE_BINS)
    hist64 = hist.to(tl.int64) - tl.where(bins == 0, rows_seen - finite_blocks, 0)
    tl.atomic_add(ints_ptr + N_COUNTERS + bins, hist64, mask=hist64 != 0)
    tl.atomic_add(ints_ptr + N_COUNTERS + SCALE_BINS + e, nonfinite_blocks, mask=nonfinite_blocks != 0)
