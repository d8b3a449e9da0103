"""Fused Triton MXFP4 quantize / fake-quantize, bit-exact with :mod:`megatron_qat.numerics.reference`.

Entry points (same contracts as :func:`megatron_qat.mxfp4.quantize` / ``fake_quantize`` /
``fake_quantize_many``; :mod:`megatron_qat.mxfp4.dispatch` decides when they are used):

- :func:`fake_quantize` ``x [..., K]`` (bf16, fp16 or fp32, ``K % block_size == 0``) -> a new
  contiguous tensor, same shape/dtype/device. One read and one write per element.
- :func:`quantize` -> ``(codes uint8 [..., K//2], scales uint8 [..., K//block_size])``; low nibble
  = even element (FlashInfer ``fp4_quantize`` linear layout). Non-finite input raises ValueError
  (like the reference; this check synchronises with the host, quantize is not a hot path).
- :func:`fake_quantize_many` a list of tensors (e.g. the per-expert weights of a TEGroupedLinear)
  in ONE launch. All tensors share one dtype and device; shapes may differ freely (rows, K and
  rank), each with ``K % block_size == 0``. The outputs are views into one flat buffer.
- :func:`quantize_many` the same for codes and scales (weight export).

Non-contiguous inputs are copied to a contiguous tensor first (one extra read and write); the
kernels assume a contiguous row-major layout. ``block_size`` may be any positive even integer;
non-powers of two run a padded tile (slower; 32 is the FlashInfer value).

Runs on CUDA (sm_80+; validated target sm_90) and, with ``TRITON_INTERPRET=1`` set before this
module is first imported, on CPU tensors in Triton's interpreter (CI).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton

from ..numerics.format import check_block_size, check_input
from ..numerics.reference import _raise_if_nonfinite
from . import qdq_jit

# Launch heuristic: about this many elements per program (8 KiB of bf16 in flight per program).
ELEMS_PER_PROGRAM = 4096
NUM_WARPS = 4

_KIND = {torch.bfloat16: qdq_jit.KIND_BF16, torch.float16: qdq_jit.KIND_FP16, torch.float32: qdq_jit.KIND_FP32}
_TABLE_CACHE: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 64


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


def _run_single(x: torch.Tensor, block_size: int, write_values: bool, write_codes: bool, *, elems_per_program=None,
                num_warps=None):
    n = x.numel()
    n_blocks = n // block_size
    out = torch.empty_like(x) if write_values else None
    codes = torch.empty(n // 2, dtype=torch.uint8, device=x.device) if write_codes else None
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
            WRITE_VALUES=write_values, WRITE_CODES=write_codes, num_warps=num_warps or NUM_WARPS,
        )  # fmt: skip
    return out, codes, scales


def fake_quantize(x: torch.Tensor, block_size: int = 32, **launch) -> torch.Tensor:
    """MXFP4 quantize -> dequantize of ``x`` in one pass; see the module docstring.
    ``launch`` (``elems_per_program``, ``num_warps``) overrides the tile heuristic (benchmarks)."""
    check_block_size(block_size)
    xc = _check_tensor(x, block_size, "x")
    out, _, _ = _run_single(xc, block_size, True, False, **launch)
    return out.view(x.shape)


def quantize(x: torch.Tensor, block_size: int = 32, **launch) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed E2M1 codes and E8M0 scale bytes of ``x``; raises ValueError on non-finite input."""
    check_block_size(block_size)
    xc = _check_tensor(x, block_size, "x")
    _raise_if_nonfinite(xc)
    _, codes, scales = _run_single(xc, block_size, False, True, **launch)
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    return codes.view(*lead, k // 2), scales.view(*lead, k // block_size)


def _group_table(xs: list[torch.Tensor], block_size: int, nb: int) -> tuple[torch.Tensor, int, int, int]:
    """(int64 table on the device, index of the lowest-address tensor, element alignment of the
    input offsets, number of programs); cached per (pointers, sizes) so that persistent expert
    weights cost no host->device copy after the first call."""
    esize = xs[0].element_size()
    ptrs = [t.data_ptr() for t in xs]
    key = (xs[0].device, xs[0].dtype, block_size, nb, tuple(ptrs), tuple(t.numel() for t in xs))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
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
    host = rows.reshape(-1).contiguous()
    if xs[0].device.type == "cuda":
        host = host.pin_memory()
        table = host.to(xs[0].device, non_blocking=True)  # no host sync
    else:
        table = host
    value = (table, base_index, align, rows.shape[0])
    _TABLE_CACHE[key] = value
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return value


def _check_group(xs, block_size: int) -> list[torch.Tensor]:
    xs = list(xs)
    if not xs:
        return xs
    first = xs[0]
    out = []
    for i, t in enumerate(xs):
        name = f"xs[{i}]"
        if isinstance(t, torch.Tensor) and (t.dtype != first.dtype or t.device != first.device):
            raise ValueError(
                f"{name} is {t.dtype} on {t.device} but xs[0] is {first.dtype} on {first.device}; "
                "the grouped MXFP4 kernel needs one dtype and one device for the whole list"
            )
        out.append(_check_tensor(t, block_size, name))
    return out


def _run_grouped(xs, block_size, write_values, write_codes, *, elems_per_program=None, num_warps=None):
    total = sum(t.numel() for t in xs)
    dev, dtype = xs[0].device, xs[0].dtype
    flat_out = torch.empty(total, dtype=dtype, device=dev) if write_values else None
    flat_codes = torch.empty(total // 2, dtype=torch.uint8, device=dev) if write_codes else None
    flat_scales = torch.empty(total // block_size, dtype=torch.uint8, device=dev) if write_codes else None
    if total:
        nb, bs_p2 = launch_config(max(t.numel() for t in xs) // block_size, block_size, elems_per_program)
        table, base_index, align, n_programs = _group_table(xs, block_size, nb)
        base = _kernel_view(xs[base_index])
        ov = _bits_view(flat_out) if write_values else base
        with _device_ctx(xs[0]):
            qdq_jit.qdq_grouped_kernel[(n_programs,)](
                base, table, ov, flat_codes if write_codes else base, flat_scales if write_codes else base,
                KIND=_KIND[dtype], BS=block_size, BS_P2=bs_p2, NB=nb, IN_ALIGN=align,
                WRITE_VALUES=write_values, WRITE_CODES=write_codes, num_warps=num_warps or NUM_WARPS,
            )  # fmt: skip
    return flat_out, flat_codes, flat_scales


def _split(flat: torch.Tensor, shapes, per_elem_num: int, per_elem_den: int) -> list[torch.Tensor]:
    shapes = [tuple(s) for s in shapes]
    if len(set(shapes)) == 1:  # every expert alike (the usual case): one view, one unbind
        return list(flat.view(len(shapes), *shapes[0]).unbind(0))
    views, start = [], 0
    for shape in shapes:
        n = (torch.Size(shape).numel() * per_elem_num) // per_elem_den
        views.append(flat[start : start + n].view(shape))
        start += n
    return views


def fake_quantize_many(xs, block_size: int = 32, **launch) -> list[torch.Tensor]:
    """:func:`fake_quantize` of every tensor of ``xs`` in one kernel launch (host-sync free)."""
    check_block_size(block_size)
    originals = list(xs)
    xs = _check_group(originals, block_size)
    if not xs:
        return []
    flat_out, _, _ = _run_grouped(xs, block_size, True, False, **launch)
    return _split(flat_out, [t.shape for t in originals], 1, 1)


def quantize_many(xs, block_size: int = 32, **launch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`quantize` of every tensor of ``xs`` in one launch; raises ValueError on non-finite input."""
    check_block_size(block_size)
    originals = list(xs)
    xs = _check_group(originals, block_size)
    if not xs:
        return []
    for i, t in enumerate(xs):
        _raise_if_nonfinite(t, f"xs[{i}]")
    _, flat_codes, flat_scales = _run_grouped(xs, block_size, False, True, **launch)
    code_shapes = [(*t.shape[:-1], t.shape[-1] // 2) for t in originals]
    scale_shapes = [(*t.shape[:-1], t.shape[-1] // block_size) for t in originals]
    return list(zip(_split(flat_codes, code_shapes, 1, 1), _split(flat_scales, scale_shapes, 1, 1)))
