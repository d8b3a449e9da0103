"""The eager calls behind the public API: resolve the implementation, then run the PyTorch
reference (:mod:`megatron_qat.numerics.reference`) or the Triton kernel
(:mod:`megatron_qat.kernels.triton_qdq`).

Both implementations validate the same way and agree on every edge (empty tensors, zero rows,
``K = 0``, mixed dtypes in a group, non-finite input): the reference loops where the kernel does
one grouped launch. The kernel module is imported only when ``"triton"`` is chosen.
"""

from __future__ import annotations

import torch

from ..numerics.format import check_block_size, check_group
from ..numerics.reference import fake_quantize_reference, quantize_reference
from .dispatch import resolve_impl


def quantize(x: torch.Tensor, block_size: int, impl: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    if resolve_impl(x, impl) == "triton":
        from ..kernels import triton_qdq

        return triton_qdq.quantize(x, block_size)
    return quantize_reference(x, block_size)


def fake_quantize(x: torch.Tensor, block_size: int, impl: str | None) -> torch.Tensor:
    if resolve_impl(x, impl) == "triton":
        from ..kernels import triton_qdq

        return triton_qdq.fake_quantize(x, block_size)
    return fake_quantize_reference(x, block_size)


def group_impl(xs, block_size: int, impl: str | None) -> tuple[list[torch.Tensor], str | None]:
    """Validate a group (:func:`check_group`; any iterable of tensors) and resolve its
    implementation on ``xs[0]``: ``(list of the tensors, impl)``, impl ``None`` for an empty group."""
    check_block_size(block_size)
    xs = check_group(xs, block_size)
    return xs, (resolve_impl(xs[0], impl) if xs else None)


def fake_quantize_many(xs, block_size: int, impl: str | None, tables=None) -> list[torch.Tensor]:
    """``tables``: a :class:`megatron_qat.kernels.triton_qdq.GroupTableSlot` kept by the caller, or
    None (the kernel builds its pointer table for this call only)."""
    xs, chosen = group_impl(xs, block_size, impl)
    if chosen == "triton":
        from ..kernels import triton_qdq

        return triton_qdq.fake_quantize_many(xs, block_size, tables=tables)
    return [fake_quantize_reference(x, block_size, name=f"xs[{i}]") for i, x in enumerate(xs)]


def fake_quantize_many_flat(xs, block_size: int, impl: str | None) -> torch.Tensor:
    """All outputs of :func:`fake_quantize_many` as one flat tensor, in order (``xs`` not empty)."""
    xs, chosen = group_impl(xs, block_size, impl)
    if chosen is None:
        raise ValueError("fake_quantize_many_flat: xs is empty (its dtype and device are unknown)")
    if chosen == "triton":
        from ..kernels import triton_qdq

        return triton_qdq.fake_quantize_many_flat(xs, block_size)
    flat = torch.empty(sum(x.numel() for x in xs), dtype=xs[0].dtype, device=xs[0].device)
    start = 0
    for i, x in enumerate(xs):
        flat[start : start + x.numel()] = fake_quantize_reference(x, block_size, name=f"xs[{i}]").reshape(-1)
        start += x.numel()
    return flat


def quantize_many(xs, block_size: int, impl: str | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    xs, chosen = group_impl(xs, block_size, impl)
    if chosen == "triton":
        from ..kernels import triton_qdq

        return triton_qdq.quantize_many(xs, block_size)
    return [quantize_reference(x, block_size, name=f"xs[{i}]") for i, x in enumerate(xs)]
