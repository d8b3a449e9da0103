"""Fused Triton quantize / fake-quantize of every rule, bit-exact with :mod:`megatron_qat.numerics.reference`.

Every entry point takes ``rule`` (a :class:`~megatron_qat.numerics.rules.Rule`, default
``FLASHINFER_MXFP4``); codes are E2M1 nibble pairs ``[..., K // 2]`` or E4M3 bytes ``[..., K]``.

Entry points (same contracts as :func:`megatron_qat.mxfp4.quantize` / ``fake_quantize`` /
``fake_quantize_many``; :mod:`megatron_qat.mxfp4.dispatch` decides when they are used):

- :func:`fake_quantize` ``x [..., K]`` (bf16, fp16 or fp32, ``K % block_size == 0``) -> a new
  contiguous tensor, same shape/dtype/device. One read and one write per element.
- :func:`quantize` -> ``(codes uint8 [..., K//2], scales uint8 [..., K//block_size])``; low nibble
  = even element (FlashInfer ``fp4_quantize`` linear layout). Non-finite input raises ValueError
  (like the reference; this check synchronises with the host, quantize is not a hot path).
- :func:`fake_quantize_many` a list of tensors (e.g. the per-expert weights of a TEGroupedLinear)
  in ONE launch. All tensors share one dtype and device; shapes may differ freely (rows, K and
  rank), each with ``K % block_size == 0``. The outputs are views into one flat buffer. The launch
  reads a per-program pointer table (:class:`GroupTable`); a :class:`GroupTableSlot` owned by the
  caller keeps it across calls (no global cache: the table lives with the module that owns it).
- :func:`quantize_many` the same for codes and scales (weight export).

Non-contiguous inputs are copied to a contiguous tensor first (one extra read and write); the
kernels assume a contiguous row-major layout. ``block_size`` may be any positive even integer;
non-powers of two run a padded tile (slower; 32 is the FlashInfer value).

Runs on CUDA (sm_80+; validated target sm_90) and, with ``TRITON_INTERPRET=1`` set before this
module is first imported, on CPU tensors in Triton's interpreter (CI).
"""

from __future__ import annotations

import torch
import triton

from ..numerics.format import DEFAULT_BLOCK_SIZE, check_block_size, check_finite, check_group, check_input
from ..numerics.reference import check_rule
from ..numerics.rules import FLASHINFER_MXFP4, Element, Rule, ScaleRounding, Ties
from . import qdq_jit

# Launch heuristic: about this many elements per program (8 KiB of bf16 in flight per program).
ELEMS_PER_PROGRAM = 4096
NUM_WARPS = 4

_KIND = {torch.bfloat16: qdq_jit.KIND_BF16, torch.float16: qdq_jit.KIND_FP16, torch.float32: qdq_jit.KIND_FP32}


def rule_constexprs(rule: Rule) -> dict:
    """The kernel constexprs that select ``rule`` (qdq_jit's module docstring)."""
    return {
        "ELEM": 0 if rule.element is Element.E2M1 else 1,
        "SCALE": 0 if rule.scale is ScaleRounding.CEIL else 1,
        "TIES": 0 if rule.ties is Ties.EVEN else 1,
        "FTZ": rule.ftz,
    }


def launch_config(n_blocks: int, block_size: int, elems_per_program: int | None = None) -> tuple[int, int]:
    """``(blocks per program NB, padded block width BS_P2)``: NB is a power of two with
    ``NB * BS_P2 ~= elems_per_program``, shrunk for tensors smaller than one tile."""
    bs_p2 = triton.next_power_of_2(block_size)
    target = elems_per_program or ELEMS_PER_PROGRAM
    nb = max(1, target // bs_p2)
    nb = min(nb, triton.next_power_of_2(max(1, n_blocks)))
    return nb, bs_p2


def _kernel_view(x: torch.Tensor) -> torch.Tensor:
    """What the kernel loads: bf16 as int16 bits, fp32 as int32 bits, fp16 as is (widened by
    the exact fp16 -> fp32 conversion)."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16)
    if x.dtype == torch.float32:
        return x.view(torch.int32)
    return x


def _bits_view(out: torch.Tensor) -> torch.Tensor:
    """What the kernel stores: the output's bit pattern (int16 for bf16/fp16, int32 for fp32)."""
    return out.view(torch.int32 if out.dtype == torch.float32 else torch.int16)


def _check_tensor(x: torch.Tensor, block_size: int, name: str) -> torch.Tensor:
    check_input(x, block_size, name)
    if x.device.type != "cuda" and x.device.type != "cpu":
        raise RuntimeError(f"{name} is on {x.device}; the Triton MXFP4 kernel runs on CUDA (or CPU in the interpreter)")
    return x.contiguous()


def _device_ctx(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else _NullCtx()


class _NullCtx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _run_single(x: torch.Tensor, block_size: int, write_values: bool, write_codes: bool, rule: Rule = FLASHINFER_MXFP4,
                *, elems_per_program=None, num_warps=None):
    n = x.numel()
    n_blocks = n // block_size
    out = torch.empty_like(x) if write_values else None
    codes = torch.empty(n // rule.codes_per_byte, dtype=torch.uint8, device=x.device) if write_codes else None
    scales = torch.empty(n_blocks, dtype=torch.uint8, device=x.device) if write_codes else None
    if n_blocks == 0:
        return out, codes, scales
    nb, bs_p2 = launch_config(n_blocks, block_size, elems_per_program)
    xv = _kernel_view(x)
    ov = _bits_view(out) if write_values else xv
    grid = (triton.cdiv(n_blocks, nb),)
    with _device_ctx(x):
        qdq_jit.qdq_single_kernel[grid](
            xv, ov, codes if write_codes else xv, scales if write_codes else xv, n_blocks,
            KIND=_KIND[x.dtype], BS=block_size, BS_P2=bs_p2, NB=nb,
            WRITE_VALUES=write_values, WRITE_CODES=write_codes, num_warps=num_warps or NUM_WARPS, **rule_constexprs(rule),
        )  # fmt: skip
    return out, codes, scales


def fake_quantize(
    x: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, *, rule: Rule = FLASHINFER_MXFP4, name: str = "x", **launch
) -> torch.Tensor:
    """Quantize -> dequantize of ``x`` under ``rule`` in one pass; see the module docstring.
    ``launch`` (``elems_per_program``, ``num_warps``) overrides the tile heuristic (benchmarks)."""
    check_rule(rule)
    check_block_size(block_size)
    xc = _check_tensor(x, block_size, name)
    out, _, _ = _run_single(xc, block_size, True, False, rule, **launch)
    return out.view(x.shape)


def quantize(
    x: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, *, rule: Rule = FLASHINFER_MXFP4, **launch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and E8M0 scale bytes of ``x`` under ``rule``; raises ValueError on non-finite input."""
    check_rule(rule)
    check_block_size(block_size)
    xc = _check_tensor(x, block_size, "x")
    check_finite(xc)
    _, codes, scales = _run_single(xc, block_size, False, True, rule, **launch)
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    return codes.view(*lead, k // rule.codes_per_byte), scales.view(*lead, k // block_size)


class GroupTable:
    """The int64 pointer table of one grouped launch over a fixed list of tensors.

    ``table`` (on the tensors' device) holds three numbers per program: element offset of its first
    input from the lowest-addressed tensor ``xs[base_index]``, index of its first block in the flat
    outputs, number of valid blocks. ``align`` is the element alignment of the input offsets.
    ``key`` is what the table depends on (device, dtype, block size, blocks per program, every
    ``data_ptr`` and ``numel``). ``captured`` becomes True once a CUDA graph captured a launch that
    reads this table (it must then outlive that graph).
    """

    __slots__ = ("key", "table", "base_index", "align", "n_programs", "captured")

    def __init__(self, key, table, base_index, align, n_programs):
        self.key, self.table, self.base_index, self.align, self.n_programs = key, table, base_index, align, n_programs
        self.captured = False


def _table_key(xs: list[torch.Tensor], block_size: int, nb: int) -> tuple:
    return (xs[0].device, xs[0].dtype, block_size, nb, tuple(t.data_ptr() for t in xs), tuple(t.numel() for t in xs))


def _capturing(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


PER_CALL_CAPTURE_ERROR = (
    "fake_quantize_many without a GroupedFakeQuantizer builds its grouped-kernel pointer table on every "
    "call, which needs a pinned allocation and a host-to-device copy: not allowed during CUDA graph "
    "capture. Use megatron_qat.mxfp4.GroupedFakeQuantizer (one per module) and run one eager call "
    "(warm-up) with the same tensors before capturing"
)
SLOT_CAPTURE_ERROR = (
    "GroupedFakeQuantizer: the grouped-kernel pointer table of these {n} tensors must be (re)built "
    "(first call, or their data_ptr / size / dtype / device changed; a non-contiguous tensor is "
    "copied on every call, so its pointer always changes), which needs a pinned allocation and a "
    "host-to-device copy: not allowed during CUDA graph capture. Run one eager forward (warm-up) "
    "with the same contiguous weights before capturing"
)


def build_group_table(xs: list[torch.Tensor], block_size: int, nb: int, *, capture_error: str) -> GroupTable:
    """Build the :class:`GroupTable` of ``xs`` (one dtype and device, contiguous, ``numel > 0`` in
    all). On CUDA it is one pinned, non-blocking host-to-device copy (no host sync); during a CUDA
    graph capture it raises RuntimeError(``capture_error``) instead, before allocating anything."""
    if _capturing(xs[0]):
        raise RuntimeError(capture_error)
    key = _table_key(xs, block_size, nb)
    esize = xs[0].element_size()
    ptrs = key[4]
    base_index = min(range(len(xs)), key=lambda i: ptrs[i])
    base = ptrs[base_index]
    blocks = torch.tensor([t.numel() // block_size for t in xs], dtype=torch.int64)
    n_prog = (blocks + nb - 1) // nb
    owner = torch.repeat_interleave(torch.arange(len(xs)), n_prog)  # tensor of each program
    first_prog = torch.cumsum(n_prog, 0) - n_prog
    blk0 = (torch.arange(int(n_prog.sum())) - first_prog[owner]) * nb  # first block within its tensor
    in_base = torch.tensor([(p - base) // esize for p in ptrs], dtype=torch.int64)
    out_base = torch.cumsum(blocks, 0) - blocks
    rows = torch.stack(
        [in_base[owner] + blk0 * block_size, out_base[owner] + blk0, torch.clamp(blocks[owner] - blk0, max=nb)], dim=1
    )
    aligned = all(p % 16 == 0 for p in ptrs)
    align = max(1, 16 // esize) if aligned else 1
    table = rows.reshape(-1).contiguous()
    if xs[0].device.type == "cuda":
        table = table.pin_memory().to(xs[0].device, non_blocking=True)  # no host sync
    return GroupTable(key, table, base_index, align, rows.shape[0])


class GroupTableSlot:
    """The current :class:`GroupTable` of one fixed list of tensors (the expert weights of one
    module); :class:`megatron_qat.mxfp4.GroupedFakeQuantizer` owns one.

    :meth:`get` returns the held table while its key (pointers, sizes, dtype, device, launch shape)
    is unchanged, so persistent weights cost no host-to-device copy after the first call; a changed
    key rebuilds it (never during a CUDA graph capture: RuntimeError). Only the current entry is
    kept, except tables read by a captured CUDA graph: those stay alive as long as the slot (the
    graph may be replayed after the weights moved), in ``graph_tables``. ``builds`` counts rebuilds.
    """

    def __init__(self):
        self.current: GroupTable | None = None
        self.graph_tables: list[GroupTable] = []
        self.builds = 0

    def get(self, xs: list[torch.Tensor], block_size: int, nb: int) -> GroupTable:
        cur = self.current
        capturing = _capturing(xs[0])
        if cur is not None and cur.key == _table_key(xs, block_size, nb):
            cur.captured = cur.captured or capturing
            return cur
        new = build_group_table(xs, block_size, nb, capture_error=SLOT_CAPTURE_ERROR.format(n=len(xs)))
        if cur is not None and cur.captured:
            self.graph_tables.append(cur)
        self.current = new
        self.builds += 1
        return new


def _check_group(xs, block_size: int) -> list[torch.Tensor]:
    """Validated, contiguous members of ``xs`` (non-contiguous ones are copied)."""
    return [_check_tensor(t, block_size, f"xs[{i}]") for i, t in enumerate(check_group(xs, block_size))]


def grouped_launch_args(live: list[torch.Tensor], gt: GroupTable, out, codes, scales):
    """The positional pointer arguments of ``qdq_grouped_kernel`` (tensors; unused outputs point at
    the input base, which the kernel never writes)."""
    base = _kernel_view(live[gt.base_index])
    return (base, gt.table, _bits_view(out) if out is not None else base,
            codes if codes is not None else base, scales if scales is not None else base)  # fmt: skip


def grouped_constexprs(dtype, block_size, bs_p2, nb, align, write_values, write_codes, rule) -> dict:
    return dict(
        KIND=_KIND[dtype], BS=block_size, BS_P2=bs_p2, NB=nb, IN_ALIGN=align,
        WRITE_VALUES=write_values, WRITE_CODES=write_codes, **rule_constexprs(rule),
    )  # fmt: skip


def _run_grouped(xs, block_size, write_values, write_codes, rule=FLASHINFER_MXFP4, *, tables=None,
                 elems_per_program=None, num_warps=None):
    """One grouped launch over validated contiguous ``xs``: ``(flat_out, flat_codes, flat_scales,
    launched)``, ``launched`` = ``(compiled kernel or None, table, grid, constexprs)`` or None when
    every member is empty (no launch)."""
    total = sum(t.numel() for t in xs)
    dev, dtype = xs[0].device, xs[0].dtype
    flat_out = torch.empty(total, dtype=dtype, device=dev) if write_values else None
    flat_codes = torch.empty(total // rule.codes_per_byte, dtype=torch.uint8, device=dev) if write_codes else None
    flat_scales = torch.empty(total // block_size, dtype=torch.uint8, device=dev) if write_codes else None
    launched = None
    if total:
        nb, bs_p2 = launch_config(max(t.numel() for t in xs) // block_size, block_size, elems_per_program)
        live = [t for t in xs if t.numel()]  # empty members have no program and no pointer to track
        if tables is None:
            gt = build_group_table(live, block_size, nb, capture_error=PER_CALL_CAPTURE_ERROR)
        else:
            gt = tables.get(live, block_size, nb)
        constexprs = grouped_constexprs(dtype, block_size, bs_p2, nb, gt.align, write_values, write_codes, rule)
        with _device_ctx(xs[0]):
            compiled = qdq_jit.qdq_grouped_kernel[(gt.n_programs,)](
                *grouped_launch_args(live, gt, flat_out, flat_codes, flat_scales), **constexprs,
                num_warps=num_warps or NUM_WARPS,
            )  # fmt: skip
        launched = (compiled, gt, gt.n_programs, constexprs)
    return flat_out, flat_codes, flat_scales, launched


def split(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    """Consecutive views of ``flat`` with the given shapes (one ``view`` + ``unbind`` when all alike)."""
    shapes = [tuple(s) for s in shapes]
    if len(set(shapes)) == 1:  # every expert alike (the usual case): one view, one unbind
        return list(flat.view(len(shapes), *shapes[0]).unbind(0))
    views, start = [], 0
    for shape in shapes:
        n = torch.Size(shape).numel()
        views.append(flat[start : start + n].view(shape))
        start += n
    return views


def fake_quantize_many_flat(
    xs, block_size: int = DEFAULT_BLOCK_SIZE, *, rule: Rule = FLASHINFER_MXFP4, tables: GroupTableSlot | None = None,
    **launch,
) -> torch.Tensor:
    """:func:`fake_quantize` of every tensor of ``xs`` in one kernel launch (host-sync free), as ONE
    flat tensor: the outputs' elements in order (``xs[0]`` first). ``xs`` must not be empty.

    ``tables``: the caller's :class:`GroupTableSlot` for this list (kept across calls); without it
    the pointer table is built for this call only (a pinned host-to-device copy each call; refused
    during CUDA graph capture)."""
    check_rule(rule)
    check_block_size(block_size)
    xs = _check_group(xs, block_size)
    if not xs:
        raise ValueError("fake_quantize_many_flat: xs is empty (its dtype and device are unknown)")
    return _run_grouped(xs, block_size, True, False, rule, tables=tables, **launch)[0]


def fake_quantize_many(
    xs, block_size: int = DEFAULT_BLOCK_SIZE, *, rule: Rule = FLASHINFER_MXFP4, tables: GroupTableSlot | None = None,
    **launch,
) -> list[torch.Tensor]:
    """:func:`fake_quantize_many_flat` split into views shaped like ``xs`` (``[]`` for ``[]``)."""
    originals = check_group(xs, block_size)
    if not originals:
        return []
    flat = fake_quantize_many_flat(originals, block_size, rule=rule, tables=tables, **launch)
    return split(flat, [t.shape for t in originals])


def quantize_many(
    xs, block_size: int = DEFAULT_BLOCK_SIZE, *, rule: Rule = FLASHINFER_MXFP4, **launch
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`quantize` of every tensor of ``xs`` in one launch; raises ValueError on non-finite input."""
    check_rule(rule)
    check_block_size(block_size)
    originals = check_group(xs, block_size)
    xs = _check_group(originals, block_size)
    if not xs:
        return []
    for i, t in enumerate(xs):
        check_finite(t, f"xs[{i}]")
    _, flat_codes, flat_scales, _ = _run_grouped(xs, block_size, False, True, rule, **launch)
    code_shapes = [(*t.shape[:-1], t.shape[-1] // rule.codes_per_byte) for t in originals]
    scale_shapes = [(*t.shape[:-1], t.shape[-1] // block_size) for t in originals]
    return list(zip(split(flat_codes, code_shapes), split(flat_scales, scale_shapes)))
