"""Host side of the MXFP4 statistics kernel (:mod:`.stats_jit`): the statistics of one module's
expert weights under one E2M1 weight rule, in ONE launch, no host synchronisation.

:func:`module_stats` ``(xs, block_size, rule)`` -> ``(sums, ints)`` on the tensors' device:

- ``sums`` float64 ``[2]``: sum of ``(fake - x)**2`` and of ``x**2`` over the finite blocks;
- ``ints`` int64 ``[7 + 256 + len(xs)]``: the counters (``megatron_qat.metrics.block_stats.COUNT_FIELDS``
  order), the scale-byte histogram of finite blocks, the non-finite blocks of each tensor.

``xs`` are contiguous tensors of one dtype (bf16, fp16, fp32) and device, each ``[..., K]`` with
``K % block_size == 0`` (the caller validates). Blocks run along the last dim, so a tensor is a flat
run of whole blocks. Runs on CUDA and, with ``TRITON_INTERPRET=1`` set before Triton is imported,
on CPU tensors in Triton's interpreter.

Launch: grid ``(C, n_experts)``; the ``C`` programs of an expert take its tiles of ``NB`` blocks in
turn (``c, c + C, ...``), about ``PROGRAMS_PER_SM`` programs per SM in all. The device reads an
int64 table of two numbers per expert (element offset from the lowest-addressed tensor, number of
blocks). A :class:`StatsTableSlot` kept by the caller holds it across calls, so that a call with
the same tensors makes no host-to-device copy (and can be captured in a CUDA graph); without one
the table is built per call (a pinned, non-blocking copy; refused during a capture).

Determinism: integer results are exact atomic sums. Each program adds its float64 terms in a fixed
order (per block row, then across its tiles), writes its two partial sums to its own slot, and the
slots are summed by ``torch.sum`` (a fixed-order tree on a fixed shape): the same weights and launch
shape give the same float64 bits on every run. docs/metrics.md says what is bit-identical to what.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from ..numerics.format import INT_VIEW_DTYPES
from ..numerics.rules import FLASHINFER_MXFP4, Rule
from . import qdq_jit, stats_jit
from .triton_qdq import rule_constexprs

ELEMS_PER_TILE = 4096  # elements per tile (NB blocks); 8 KiB of bf16 per load
PROGRAMS_PER_SM = 4  # persistent-style grid: 32 resident warps per SM keep tiles in flight
INTERPRETER_PROGRAMS = 8  # CPU (Triton interpreter): programs in all; several per expert in tests
MAX_EXPERTS = 65535  # the grid's second dimension: one per expert
NUM_WARPS = 8  # 16 elements per thread: room for the float64 temporaries
N_INTS_BEFORE_EXPERTS = stats_jit.N_COUNTERS.value + stats_jit.SCALE_BINS.value  # then one per expert

_KIND = {torch.bfloat16: qdq_jit.KIND_BF16, torch.float16: qdq_jit.KIND_FP16, torch.float32: qdq_jit.KIND_FP32}

CAPTURE_ERROR = (
    "megatron_qat metrics: the statistics kernel's pointer table of these {n} tensors must be (re)built "
    "(first call, or their data_ptr / size / dtype / device changed), which needs a pinned allocation "
    "and a host-to-device copy: not allowed during CUDA graph capture. Measure once eagerly with the "
    "same weights and the same StatsTableSlot (megatron_qat.metrics.block_stats.GroupedStats) before capturing"
)


def tile_config(max_blocks: int, block_size: int, elems_per_tile: int | None = None) -> tuple[int, int]:
    """``(NB, BS_P2)``: blocks per tile (a power of two, ``NB * BS_P2 ~= elems_per_tile``, smaller
    for tensors of fewer blocks) and the block width padded to a power of two."""
    bs_p2 = triton.next_power_of_2(block_size)
    nb = max(1, (elems_per_tile or ELEMS_PER_TILE) // bs_p2)
    return min(nb, triton.next_power_of_2(max(1, max_blocks))), bs_p2


def _load_view(x: torch.Tensor) -> torch.Tensor:
    """What the kernel loads (``stats_jit.float32_bits``): bf16 / fp32 as their integer bits, fp16 as is."""
    return x if x.dtype == torch.float16 else x.view(INT_VIEW_DTYPES[x.dtype])


def _capturing(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class StatsTable:
    """The launch of one fixed list of tensors: the device ``table`` (int64 ``[n, 2]``), the index
    of the tensor whose pointer is the base, the alignment of the offsets (elements), the grid.
    ``captured``: a CUDA graph captured a launch that reads it (it must outlive that graph)."""

    __slots__ = ("key", "table", "base_index", "align", "grid", "captured")

    def __init__(self, key, table, base_index, align, grid):
        self.key, self.table, self.base_index, self.align, self.grid = key, table, base_index, align, grid
        self.captured = False


def _table_key(xs, block_size: int, nb: int, programs: int | None) -> tuple:
    return (xs[0].device, xs[0].dtype, block_size, nb, programs, tuple(t.data_ptr() for t in xs),
            tuple(t.numel() for t in xs))  # fmt: skip


def build_stats_table(xs, block_size: int, nb: int, programs: int | None) -> StatsTable:
    """The :class:`StatsTable` of ``xs`` (at least one tensor with elements). On CUDA the table is
    one pinned, non-blocking host-to-device copy; during a CUDA graph capture this raises
    RuntimeError before allocating anything."""
    if _capturing(xs[0]):
        raise RuntimeError(CAPTURE_ERROR.format(n=len(xs)))
    if len(xs) > MAX_EXPERTS:
        raise ValueError(
            f"megatron_qat metrics: {len(xs)} expert weights in one module; the launch takes at most {MAX_EXPERTS}"
        )
    key = _table_key(xs, block_size, nb, programs)
    ptrs, numels = key[5], key[6]
    esize = xs[0].element_size()
    live = [i for i, n in enumerate(numels) if n]
    base_index = min(live, key=lambda i: ptrs[i])
    base = ptrs[base_index]
    rows = []
    for p, n in zip(ptrs, numels):
        if n and (p - base) % esize:
            raise ValueError(
                f"megatron_qat metrics: tensor at {p:#x} is not {esize}-byte aligned with the one at {base:#x}"
            )
        rows.append(((p - base) // esize if n else 0, n // block_size))
    aligned = all(ptrs[i] % 16 == 0 for i in live) and (nb * block_size * esize) % 16 == 0
    align = max(1, 16 // esize) if aligned else 1
    table = torch.tensor(rows, dtype=torch.int64)
    if xs[0].device.type == "cuda":
        target = torch.cuda.get_device_properties(xs[0].device).multi_processor_count * PROGRAMS_PER_SM
        table = table.pin_memory().to(xs[0].device, non_blocking=True)  # no host sync
    else:
        target = INTERPRETER_PROGRAMS
    max_tiles = triton.cdiv(max(numels) // block_size, nb)
    per_expert = max(1, min(max_tiles, triton.cdiv(programs or target, len(xs))))
    return StatsTable(key, table, base_index, align, (per_expert, len(xs)))


class StatsTableSlot:
    """The current :class:`StatsTable` of one fixed list of tensors (one module's expert weights),
    kept by its owner (:class:`megatron_qat.metrics.block_stats.GroupedStats`): reused while the
    tensors' pointers, sizes, dtype and device and the launch shape stay the same, rebuilt otherwise
    (never during a CUDA graph capture). Tables read by a captured graph stay alive with the slot.
    ``builds`` counts the builds."""

    def __init__(self):
        self.current: StatsTable | None = None
        self.graph_tables: list[StatsTable] = []
        self.builds = 0

    def get(self, xs, block_size: int, nb: int, programs: int | None) -> StatsTable:
        cur = self.current
        if cur is not None and cur.key == _table_key(xs, block_size, nb, programs):
            cur.captured = cur.captured or _capturing(xs[0])
            return cur
        new = build_stats_table(xs, block_size, nb, programs)
        if cur is not None and cur.captured:
            self.graph_tables.append(cur)
        self.current = new
        self.builds += 1
        return new


def module_stats(xs, block_size: int, rule: Rule = FLASHINFER_MXFP4, *, tables: StatsTableSlot | None = None,
                 elems_per_tile: int | None = None, programs: int | None = None,
                 num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Statistics of the tensors ``xs`` under ``rule`` (an E2M1 rule: the kernel refuses others at
    compile time) in one launch; see the module docstring. ``tables``: the caller's slot for this
    list (else a table for this call only).
    ``elems_per_tile``, ``programs`` (programs in all) and ``num_warps`` override the launch
    heuristic (benchmarks, tests)."""
    dev = xs[0].device
    max_blocks = max(t.numel() for t in xs) // block_size
    if max_blocks == 0:
        ints = torch.zeros(N_INTS_BEFORE_EXPERTS + len(xs), dtype=torch.int64, device=dev)
        return torch.zeros(2, dtype=torch.float64, device=dev), ints
    nb, bs_p2 = tile_config(max_blocks, block_size, elems_per_tile)
    # the table first: a rebuild refused during a capture raises before anything is enqueued
    if tables is not None:
        st = tables.get(xs, block_size, nb, programs)
    else:
        st = build_stats_table(xs, block_size, nb, programs)
    ints = torch.zeros(N_INTS_BEFORE_EXPERTS + len(xs), dtype=torch.int64, device=dev)
    partial = torch.empty((st.grid[0] * st.grid[1], 2), dtype=torch.float64, device=dev)
    base = _load_view(xs[st.base_index])
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        stats_jit.stats_kernel[st.grid](
            base, st.table, partial, ints, KIND=_KIND[xs[0].dtype], BS=block_size, BS_P2=bs_p2, NB=nb,
            IN_ALIGN=st.align, num_warps=num_warps or NUM_WARPS, **rule_constexprs(rule),
        )  # fmt: skip
    return partial.sum(dim=0), ints
