"""Bitwise comparison of ours against a reference, accumulated per tensor.

Per batch of rows ``x [r, K]`` of a tensor's blocked view (``in_features`` last; finite rows only),
in blocks of the payloads' ``block_size``:

- codes: the 4-bit E2M1 codes, element by element (unpacked nibbles, as integers);
- scales: the E8M0 bytes, block by block (as integers);
- values: ours ``fake_quantize(x)`` (x.dtype, what training uses) against the reference's decode
  rounded to x.dtype, compared on integer views;
- dequant: ours ``dequantize(codes, scales, float32)`` against the reference's float32 decode,
  compared on int32 views.

When the reference decodes 0x8 as +0.0 (FlashInfer's host dequantizer), -0.0 is normalised to
+0.0 on both sides of the two value comparisons (codes still compare the sign bit exactly).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..numerics.format import INT_VIEW_DTYPES as _INT_VIEW


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.dtype])


def _normalise_zero(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    sign_only = -(1 << (torch.finfo(dtype).bits - 1))  # 0x8000 / 0x80000000 as a signed int
    return torch.where(bits == sign_only, torch.zeros_like(bits), bits)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


NOT_COMPARED = "not compared: every row holds a non-finite value"


def _json_float(v: float):
    return v if math.isfinite(v) else repr(v)  # "inf", "-inf", "nan": JSON has no literal for them


@dataclass
class TensorResult:
    name: str
    file: str | None
    shape: list[int]
    dtype: str
    numel: int
    status: str = "equal"  # "equal" | "mismatch" | "skipped: <reason>" | NOT_COMPARED
    impl: str | None = None
    layout: dict | None = None  # family, role, blocked_dim (the in_features dim of the stored shape), ...
    blocked_shape: list[int] | None = None  # shape with blocked_dim moved last: rows x K
    rows_total: int = 0
    rows_selected: int = 0  # rows_total, or fewer with --sample-rows
    rows_compared: int = 0
    elements_compared: int = 0
    code_mismatches: int = 0
    scale_mismatches: int = 0
    value_mismatches: int = 0
    dequant_mismatches: int = 0
    max_abs_diff: float = 0.0
    nonfinite_values: int = 0
    excluded_rows: int = 0
    first_mismatch: dict | None = None
    elapsed_s: float = 0.0

    @property
    def mismatched(self) -> bool:
        return bool(self.code_mismatches or self.scale_mismatches or self.value_mismatches or self.dequant_mismatches)

    @property
    def skipped(self) -> bool:
        return self.status.startswith("skipped")

    @property
    def complete(self) -> bool:
        """Every selected row compared (none skipped, none excluded as non-finite)."""
        return not self.skipped and self.rows_compared > 0 and self.rows_compared == self.rows_selected

    def finish(self) -> None:
        if not self.skipped:
            self.status = "mismatch" if self.mismatched else ("equal" if self.rows_compared else NOT_COMPARED)

    def to_json(self) -> dict:
        d = asdict(self)
        d["max_abs_diff"] = _json_float(self.max_abs_diff)
        d["complete"] = self.complete
        return d


@dataclass
class BatchInput:
    x: torch.Tensor  # [r, K] finite rows, CPU
    row_ids: torch.Tensor  # int64 [r]: flat row index of each row in the blocked view
    shape: tuple[int, ...] = field(default=())  # the blocked view's shape
    to_stored: Callable[[list[int]], list[int]] | None = None  # blocked-view index -> stored index


def _max_abs(a: torch.Tensor, b: torch.Tensor, differ: torch.Tensor) -> float:
    if not bool(differ.any()):
        return 0.0
    d = (a[differ].double() - b[differ].double()).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)  # inf - inf, NaN vs number
    return float(d.max())


def compare_batch(result: TensorResult, batch: BatchInput, ref, ours, negative_zero_normalised: bool) -> None:
    """Compare one batch and add its counts to ``result`` (first mismatch kept).

    ``ref``: ``(payload, values float32)``; ``ours``: ``(payload, dequantize float32, fake_quantize
    in x.dtype)`` (:mod:`.references`); both payloads of one block size."""
    x = batch.x
    r, k = x.shape
    (ref_payload, ref_values), (our_payload, our_dequant, our_fake) = ref, ours
    if ref_payload.block_size != our_payload.block_size:
        raise ValueError(f"block sizes differ: reference {ref_payload.block_size}, ours {our_payload.block_size}")
    block = ref_payload.block_size
    ref_codes, ref_scales, our_codes, our_scales = ref_payload.codes, ref_payload.scales, our_payload.codes, our_payload.scales
    code_diff = _unpack(our_codes.reshape(r, -1)) != _unpack(ref_codes.reshape(r, -1))
    scale_diff = our_scales.reshape(r, -1) != ref_scales.reshape(r, -1)
    ref_in_dtype = ref_values.to(x.dtype)
    fake_bits, ref_bits = _bits(our_fake.reshape(r, k)), _bits(ref_in_dtype)
    dq_bits, ref32_bits = _bits(our_dequant.reshape(r, k)), _bits(ref_values)
    if negative_zero_normalised:
        fake_bits, ref_bits = _normalise_zero(fake_bits, x.dtype), _normalise_zero(ref_bits, x.dtype)
        dq_bits, ref32_bits = _normalise_zero(dq_bits, torch.float32), _normalise_zero(ref32_bits, torch.float32)
    value_diff = fake_bits != ref_bits
    dequant_diff = dq_bits != ref32_bits

    result.rows_compared += r
    result.elements_compared += r * k
    result.code_mismatches += int(code_diff.sum())
    result.scale_mismatches += int(scale_diff.sum())
    result.value_mismatches += int(value_diff.sum())
    result.dequant_mismatches += int(dequant_diff.sum())
    result.max_abs_diff = max(
        result.max_abs_diff,
        _max_abs(our_fake.reshape(r, k), ref_in_dtype, value_diff),
        _max_abs(our_dequant.reshape(r, k), ref_values, dequant_diff),
    )
    if result.first_mismatch is None:
        any_diff = code_diff | value_diff | dequant_diff | scale_diff.repeat_interleave(block, dim=1)
        hits = any_diff.nonzero()
        if hits.shape[0]:
            i, j = int(hits[0, 0]), int(hits[0, 1])
            result.first_mismatch = _describe(batch, i, j, code_diff, scale_diff, ref, ours, ref_in_dtype)


def _describe(batch: BatchInput, i, j, code_diff, scale_diff, ref, ours, ref_in_dtype) -> dict:
    x = batch.x
    (ref_payload, ref_values), (our_payload, our_dequant, our_fake) = ref, ours
    block = ref_payload.block_size
    ref_codes, ref_scales, our_codes, our_scales = ref_payload.codes, ref_payload.scales, our_payload.codes, our_payload.scales
    row = int(batch.row_ids[i])
    lead = [int(v) for v in torch.unravel_index(torch.tensor(row), batch.shape[:-1])] if len(batch.shape) > 1 else []
    index = lead + [j] if batch.to_stored is None else batch.to_stored(lead + [j])
    nib = lambda packed: int((packed.reshape(x.shape[0], -1)[i, j // 2] >> (4 * (j % 2))) & 0xF)  # noqa: E731
    what = [n for n, hit in (("code", code_diff[i, j]), ("scale", scale_diff[i, j // block])) if bool(hit)]
    if bool(_bits(our_fake.reshape(x.shape)[i : i + 1, j]) != _bits(ref_in_dtype[i : i + 1, j])):
        what.append("value")
    if bool(_bits(our_dequant.reshape(x.shape)[i : i + 1, j]) != _bits(ref_values[i : i + 1, j])):
        what.append("dequant")
    xv = x[i, j]
    return {
        "row": row,
        "col": j,
        "index": index,  # into the stored tensor (row/col are in the blocked view)
        "block": j // block,
        "differs_in": what,
        "input": _json_float(float(xv)),
        "input_bits": f"0x{int(_bits(xv.reshape(1))[0]) & ((1 << (8 * xv.element_size())) - 1):0{2 * xv.element_size()}x}",
        "ours_code": nib(our_codes),
        "ref_code": nib(ref_codes),
        "ours_scale": int(our_scales.reshape(x.shape[0], -1)[i, j // block]),
        "ref_scale": int(ref_scales.reshape(x.shape[0], -1)[i, j // block]),
        "ours_value": _json_float(float(our_fake.reshape(x.shape)[i, j])),
        "ref_value": _json_float(float(ref_in_dtype[i, j])),
        "ours_dequant_fp32": _json_float(float(our_dequant.reshape(x.shape)[i, j])),
        "ref_dequant_fp32": _json_float(float(ref_values[i, j])),
    }
