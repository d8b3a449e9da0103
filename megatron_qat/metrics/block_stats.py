"""The statistics pass: per-module MXFP4 statistics of a list of master weights, on device, no sync.

Run on logging steps only, as a separate pass over the master weights (the bit-exact QDQ kernel
is not touched, and other steps pay nothing). The statistics describe the fake quantization of the
weights under one E2M1 weight rule (:mod:`megatron_qat.numerics.rules`: ``FLASHINFER_MXFP4``, the
default, ``VLLM_ONLINE_MXFP4``, ``TIES_DOWN_MXFP4``). Per module, accumulated over all experts
(:class:`LocalStats`, device tensors):

- float64 ``sq_err = sum (fake - x)**2`` and ``sq_master = sum x**2`` over finite blocks, where
  ``fake`` is the fake-quantized element in the weight's dtype, exactly as training uses it;
- int64 counts: finite blocks and their elements, flushed blocks (finite, scale byte 0 under a
  ``CEIL`` rule, whose byte 0 multiplies every element by 0; none under ``EVEN``), flushed blocks
  that were not all zero, elements at the E2M1 maximum (magnitude code 7, i.e. +-6 * scale),
  elements that were exact ties (``|v|`` on a decision point of the E2M1 rounding: the midpoints
  of adjacent E2M1 magnitudes, where the rule's tie direction decides), and non-finite blocks
  (a NaN or +-inf in the block);
- int64 ``[256]`` histogram of the scale bytes of finite blocks;
- int64 ``[n_experts]`` non-finite blocks per expert (for the first-occurrence warning).

One definition, two executions, chosen like every numerics call (:mod:`megatron_qat.mxfp4.dispatch`:
``impl`` argument, else ``MEGATRON_QAT_KERNEL``, else the kernel for CUDA tensors when Triton is
installed):

- ``"triton"``: :mod:`megatron_qat.kernels.triton_stats`, ONE launch per module that reads each
  element once, built on the QDQ kernel's per-block rule pieces (docs/metrics.md gives its cost).
  :class:`GroupedStats` keeps its pointer table across calls (one per module).
- ``"reference"``: the torch pass below (CPU tensors, no Triton), built from the rule's steps in
  :mod:`megatron_qat.numerics.rounding` (``scale_bytes``, ``scaled_elements``,
  ``e2m1_round_codes``); one expert at a time, in row chunks of at most ``_CHUNK_ELEMENTS``
  elements (float64 temporaries of 16 MiB each).

``tests/test_metrics_values.py`` and ``tests/test_metrics_kernel.py`` pin the per-element scale
bytes, codes and fake values of both executions to ``quantize_reference`` /
``fake_quantize_reference`` of the rule bit for bit on every adversarial family, their counters and
histograms to each other and to a float64 oracle exactly, and their float64 sums to the oracle
within 1e-12 (the summation order differs; docs/metrics.md). Neither calls ``.item()``, boolean
indexing, ``nonzero`` or ``bincount``: nothing here waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..mxfp4.dispatch import resolve_impl
from ..numerics.format import E2M1_MAGNITUDES, check_block_size, e2m1_lut, e8m0_to_float32
from ..numerics.reference import check_rule
from ..numerics.rounding import e2m1_round_codes, scale_bytes, scaled_elements
from ..numerics.rules import FLASHINFER_MXFP4, Element, Rule, ScaleRounding

_CHUNK_ELEMENTS = 1 << 21

# E2M1 round-to-nearest decision points on |v|: the midpoints of adjacent magnitudes
# (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0). An element whose scaled value sits exactly on one is a tie.
TIE_POINTS = tuple((a + b) / 2 for a, b in zip(E2M1_MAGNITUDES, E2M1_MAGNITUDES[1:]))
MAX_MAGNITUDE_CODE = E2M1_MAGNITUDES.index(max(E2M1_MAGNITUDES))  # 7 (+-6)

# Order of the int64 counters in LocalStats.counts.
COUNT_FIELDS = (
    "finite_blocks",
    "finite_elements",
    "flushed_blocks",
    "flushed_nonzero_blocks",
    "at_max",
    "ties",
    "nonfinite_blocks",
)
SCALE_BINS = 256


@dataclass
class LocalStats:
    """One module's (or one rank's share of one module's) statistics, still on the device."""

    sums: torch.Tensor  # float64 [2]: sq_err, sq_master
    counts: torch.Tensor  # int64 [len(COUNT_FIELDS)]
    scale_hist: torch.Tensor  # int64 [256]
    nonfinite_per_expert: torch.Tensor  # int64 [n_experts]
    block_size: int
    expert_ids: tuple[int, ...]  # global expert id of each entry of nonfinite_per_expert

    def merged(self, other: "LocalStats") -> "LocalStats":
        """Both modules' statistics added (same label observed twice, e.g. two model chunks)."""
        if other.block_size != self.block_size:
            raise ValueError(f"cannot merge statistics of block size {self.block_size} and {other.block_size}")
        return LocalStats(
            self.sums + other.sums.to(self.sums.device),
            self.counts + other.counts.to(self.counts.device),
            self.scale_hist + other.scale_hist.to(self.scale_hist.device),
            torch.cat([self.nonfinite_per_expert, other.nonfinite_per_expert.to(self.sums.device)]),
            self.block_size,
            self.expert_ids + other.expert_ids,
        )


def quantize_for_stats(rows: torch.Tensor, block_size: int, rule: Rule = FLASHINFER_MXFP4):
    """``[R, K]`` float16/bfloat16/float32 -> (codes uint8 ``[R, nb, bs]``, bytes int32 ``[R, nb]``,
    finite bool ``[R, nb]``, v float32 ``[R, nb, bs]``, fake ``rows.dtype`` ``[R, nb, bs]``) under the
    E2M1 ``rule``, from the steps of :mod:`megatron_qat.numerics.rounding`. Codes, v and fake values
    of non-finite blocks are those of an all-zero block (ignored)."""
    r, k = rows.shape
    blocks = rows.float().reshape(r, k // block_size, block_size)
    amax = blocks.abs().amax(dim=-1)
    finite = torch.isfinite(amax)
    byte = scale_bytes(amax, rule)
    v = scaled_elements(blocks, byte, rule)
    v = torch.where(finite.unsqueeze(-1), v, torch.zeros_like(v))
    codes = e2m1_round_codes(v, rule.ties)
    lut = e2m1_lut(rows.device)
    fake = (lut[codes.long()] * e8m0_to_float32(byte).unsqueeze(-1)).to(rows.dtype)
    return codes, byte, finite, v, fake


def _chunk_stats(rows: torch.Tensor, block_size: int, rule: Rule):
    codes, byte, finite, v, fake = quantize_for_stats(rows, block_size, rule)
    x = rows.reshape(fake.shape)
    fm = finite.unsqueeze(-1)
    err = torch.where(fm, fake.double() - x.double(), 0.0)
    master = torch.where(fm, x.double(), 0.0)
    sums = torch.stack([err.square().sum(), master.square().sum()])
    a = v.abs()
    tie = torch.zeros(a.shape, dtype=torch.bool, device=a.device)
    for t in TIE_POINTS:
        tie |= a == t
    # flushed: the scale alone zeroes the block (byte 0 multiplies by 0 under CEIL; not under EVEN)
    flushed = finite & (byte == 0) & (rule.scale is ScaleRounding.CEIL)
    nonzero = x.abs().amax(dim=-1) > 0
    nonfinite = (~finite).sum()
    counts = torch.stack(
        [
            finite.sum(),
            finite.sum() * block_size,
            flushed.sum(),
            (flushed & nonzero).sum(),
            (((codes & 0x7) == MAX_MAGNITUDE_CODE) & fm).sum(),
            (tie & fm).sum(),
            nonfinite,
        ]
    )
    bins = torch.where(finite, byte, SCALE_BINS).long().flatten()  # bin 256 collects non-finite blocks
    hist = torch.zeros(SCALE_BINS + 1, dtype=torch.int64, device=rows.device)
    hist.scatter_add_(0, bins, torch.ones_like(bins))
    return sums, counts, hist[:SCALE_BINS], nonfinite


def split_experts(weights) -> list[torch.Tensor]:
    """Each expert's weight ``[out, in]``: a list of per-expert tensors, or one grouped ``[N, out, in]``."""
    out = []
    for w in weights:
        if w.dim() == 3:
            out.extend(w.unbind(0))
        else:
            out.append(w)
    return out


def measure(weights, block_size: int, expert_ids=None, *, rule: Rule = FLASHINFER_MXFP4,
            impl: str | None = None) -> LocalStats:
    """Statistics of the master ``weights`` (each ``[out, in]``, or one ``[N, out, in]``; K along the
    last dim, ``K % block_size == 0``; float16/bfloat16/float32; all on one device) fake-quantized
    under the E2M1 weight ``rule`` (:mod:`megatron_qat.numerics.rules`; the recipe's weight rule).

    ``expert_ids``: the global expert id of each expert (default ``0..n-1``). ``impl``: see the
    module docstring. Returns device tensors without synchronising. A module measured again and
    again should use its own :class:`GroupedStats` (no table rebuild, CUDA-graph capturable)."""
    return _measure(weights, block_size, expert_ids, check_weight_rule(rule), impl, None)


def check_weight_rule(rule) -> Rule:
    """``rule`` must be a Rule with E2M1 elements (the statistics name E2M1 facts: +-6, its ties)."""
    check_rule(rule)
    if rule.element is not Element.E2M1:
        raise ValueError(
            f"megatron_qat.metrics: rule {rule.name} has {rule.element.value} elements; the statistics are "
            "defined for E2M1 (MXFP4) weight rules"
        )
    return rule


class GroupedStats:
    """:func:`measure` of one module's expert weights, step after step: ``GroupedStats(block_size,
    rule=FLASHINFER_MXFP4, impl=None)(weights, expert_ids=None) -> LocalStats``, the same values as
    :func:`measure`.

    One instance per module (like :class:`megatron_qat.mxfp4.GroupedFakeQuantizer`). With the
    Triton kernel it keeps the launch's pointer table (a
    :class:`megatron_qat.kernels.triton_stats.StatsTableSlot`) while the weights' pointers and sizes
    stay the same, so a call after the first makes no host-to-device copy and can be captured in a
    CUDA graph; ``table_builds`` counts the builds. Nothing is global: the table dies with the owner."""

    def __init__(self, block_size: int, *, rule: Rule = FLASHINFER_MXFP4, impl: str | None = None):
        self.block_size = check_block_size(block_size)
        self.rule = check_weight_rule(rule)
        self.impl = impl
        self._tables = None  # StatsTableSlot, created by the first call that runs the kernel

    @property
    def table_builds(self) -> int:
        return 0 if self._tables is None else self._tables.builds

    def _slot(self):
        if self._tables is None:
            from ..kernels import triton_stats

            self._tables = triton_stats.StatsTableSlot()
        return self._tables

    def __call__(self, weights, expert_ids=None) -> LocalStats:
        return _measure(weights, self.block_size, expert_ids, self.rule, self.impl, self)


def _measure(weights, block_size: int, expert_ids, rule: Rule, impl: str | None,
             owner: GroupedStats | None) -> LocalStats:  # fmt: skip
    experts = split_experts(list(weights))
    if not experts:
        raise ValueError("megatron_qat.metrics: no weights to measure")
    ids = tuple(range(len(experts))) if expert_ids is None else tuple(int(i) for i in expert_ids)
    if len(ids) != len(experts):
        raise ValueError(f"megatron_qat.metrics: {len(experts)} expert weights but {len(ids)} expert ids")
    for i, w in enumerate(experts):
        k = w.shape[-1]
        if k % block_size:
            raise ValueError(
                f"megatron_qat.metrics: expert weight {i} has shape {tuple(w.shape)}; K={k} is not a "
                f"multiple of the block size {block_size}"
            )
    if resolve_impl(experts[0], impl) == "triton":
        return _measure_triton(experts, block_size, ids, rule, owner)
    return _measure_torch(experts, block_size, ids, rule)


def _measure_triton(experts, block_size: int, ids, rule: Rule, owner: GroupedStats | None) -> LocalStats:
    from ..kernels import triton_stats

    first = experts[0]
    for i, w in enumerate(experts):
        if w.dtype != first.dtype or w.device != first.device:
            raise ValueError(
                f"megatron_qat.metrics: expert weight {i} is {w.dtype} on {w.device} but expert weight 0 is "
                f"{first.dtype} on {first.device}; one module's experts share one dtype and device"
            )
    xs = [w if w.is_contiguous() else w.detach().contiguous() for w in experts]  # the kernel only reads
    sums, ints = triton_stats.module_stats(xs, block_size, rule, tables=owner._slot() if owner is not None else None)
    n_counts = len(COUNT_FIELDS)
    hist_end = n_counts + SCALE_BINS
    return LocalStats(sums, ints[:n_counts], ints[n_counts:hist_end], ints[hist_end:], block_size, ids)


def _measure_torch(experts, block_size: int, ids, rule: Rule) -> LocalStats:
    device = experts[0].device
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    counts = torch.zeros(len(COUNT_FIELDS), dtype=torch.int64, device=device)
    hist = torch.zeros(SCALE_BINS, dtype=torch.int64, device=device)
    per_expert = torch.zeros(len(experts), dtype=torch.int64, device=device)
    with torch.no_grad():
        for i, w in enumerate(experts):
            k = w.shape[-1]
            rows = w.detach().reshape(-1, k)
            step = max(1, _CHUNK_ELEMENTS // max(k, 1))
            for start in range(0, rows.shape[0], step):
                s, c, h, nf = _chunk_stats(rows[start : start + step], block_size, rule)
                sums += s
                counts += c
                hist += h
                per_expert[i] += nf
    return LocalStats(sums, counts, hist, per_expert, block_size, ids)
