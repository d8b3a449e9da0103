"""Quantize the expert weights of one module with the training numerics.

The training forward fake-quantizes each expert weight ``W [out, in]`` of a TEGroupedLinear with
:func:`megatron_qat.mxfp4.fake_quantize_many` (blocks of 32 along ``in``). Shipping the bits means
encoding the same BF16 master weights with :func:`megatron_qat.mxfp4.quantize_many` (one kernel
launch per module on CUDA): for finite input,
``dequantize(*quantize(W)) == fake_quantize(W)`` bit for bit (docs/numerics.md), so the decoded
export equals the weight the forward used. The bytes travel as
:class:`~megatron_qat.mxfp4.payload.MXPayload` (codes, scales, block size and rule together).
"""

from __future__ import annotations

import torch

from ..mxfp4.payload import MXPayload
from ..numerics.rules import Rule
from ..tools.errors import ToolError


class ExportError(ToolError, ValueError):
    """A weight or model the exporter refuses; the message is one line naming the tensor."""


def check_in_features(name: str, in_features: int, block_size: int, *, shard: bool = False) -> None:
    """Refuse ``in_features % block_size != 0`` (MXFP4 blocks run along in_features).

    ``shard=True`` words the error for a row-parallel shard (fc2 under expert-TP: the local K is
    ``moe_ffn_hidden_size / ETP`` and every shard must hold whole blocks for quantize-then-gather
    to equal gather-then-quantize)."""
    if in_features % block_size:
        what = "local in_features (K_shard = moe_ffn_hidden_size / expert-TP)" if shard else "in_features"
        raise ExportError(
            f"{name}: {what} = {in_features} is not a multiple of the MXFP4 block size {block_size}; "
            f"MXFP4 export needs whole {block_size}-element blocks along in_features"
        )


def quantize_experts(
    weights: list[torch.Tensor], names: list[str], block_size: int, *, rule: Rule, impl: str | None = None
) -> MXPayload:
    """Encode N expert weights ``[out, in]`` (one dtype, one device, one shape) under ``rule``.

    Returns one payload of codes uint8 ``[N, out, in/2]`` (E2M1 rules: low nibble = even element) and
    scales uint8 ``[N, out, in/block_size]`` (E8M0). ``names[i]`` names ``weights[i]`` in errors: a
    non-finite weight is refused (ExportError naming the tensor and row), never encoded.
    """
    if not weights:
        raise ExportError("quantize_experts: no weights given")
    shape = tuple(weights[0].shape)
    for w, name in zip(weights, names):
        if w.dim() != 2 or tuple(w.shape) != shape:
            raise ExportError(f"{name}: expected a 2-D weight of shape {shape}, got {tuple(w.shape)}")
        check_in_features(name, w.shape[-1], block_size)
        raise_if_nonfinite(w, name)
    return MXPayload.stack(MXPayload.quantize_many([w.detach() for w in weights], block_size, rule=rule, impl=impl))  # one launch


def raise_if_nonfinite(w: torch.Tensor, name: str) -> None:
    """ExportError naming ``name`` and the first row holding NaN/inf.

    ``w`` is ``[..., out, in]`` (in_features last); the row is reported as the index of every dim
    but the last, e.g. ``row 3`` for 2-D, ``[expert 1, row 3]`` for 3-D."""
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()[:-1]
        where = f"row {first[-1]}" if len(first) == 1 else f"[expert {first[0]}, row {first[-1]}]"
        count = int(bad.reshape(-1, w.shape[-1]).any(dim=1).sum())
        raise ExportError(
            f"{name}: non-finite weight (NaN or inf) at {where} ({count} row(s) affected); refusing to export it"
        )
