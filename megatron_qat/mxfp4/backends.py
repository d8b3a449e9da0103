"""The eager calls behind the public API: resolve the implementation, then run the PyTorch
reference (:mod:`megatron_qat.numerics.reference`) or the Triton kernel
(:mod:`megatron_qat.kernels.triton_qdq`, :mod:`megatron_qat.kernels.prepared`), under a
:class:`~megatron_qat.numerics.rules.Rule`.

Both implementations validate the same way and agree on every edge (empty tensors, zero rows,
``K = 0``, mixed dtypes in a group, non-finite input): the reference loops where the kernel does
one grouped launch. The kernel modules are imported only when ``"triton"`` is chosen.
"""

from __future__ import annotations

import torch

from ..numerics.format import check_block_size, check_group, check_input
from ..numerics.reference import check_rule, fake_quantize_reference, quantize_reference
from ..numerics.rules import Rule
from .dispatch import resolve_impl


def quantize(x: torch.Tensor, block_size: int, impl: str | None, rule: Rule) -> tuple[torch.Tensor, torch.Tensor]:
    if resolve_impl(x, impl) == "triton":
        from ..kernels import triton_qdq

        return triton_qdq.quantize(x, block_size, rule=rule)
    return quantize_reference(x, block_size, rule=rule)


def fake_quantize(x: torch.Tensor, block_size: int, impl: str | None, rule: Rule) -> torch.Tensor:
    if resolve_impl(x, impl) == "triton":
        from ..kernels import triton_qdq

        return triton_qdq.fake_quantize(x, block_size, rule=rule)
    return fake_quantize_reference(x, block_size, rule=rule)


def fake_quantize_activation(x: torch.Tensor, block_size: int, impl: str | None, rule: Rule, name: str = "x",
                             launches=None) -> torch.Tensor:
    """Validate (rule, block size, ``x [..., K]`` with ``K % block_size == 0``, naming ``name``),
    then the Triton kernel (through ``launches``, a caller-owned
    :class:`megatron_qat.kernels.prepared.ActivationLaunches`, when given) or the reference."""
    check_rule(rule)
    check_block_size(block_size)
    check_input(x, block_size, name)
    if resolve_impl(x, impl) == "triton":
        from ..kernels import prepared

        return prepared.fake_quantize_activation(x, rule, block_size, launches)
    return fake_quantize_reference(x, block_size, rule=rule, name=name)


def group_impl(xs, block_size: int, impl: str | None) -> tuple[list[torch.Tensor], str | None]:
    """Validate a group (:func:`check_group`; any iterable of tensors) and resolve its
    implementation on ``xs[0]``: ``(list of the tensors, impl)``, impl ``None`` for an empty group."""
    check_block_size(block_size)
    xs = check_group(xs, block_size)
    return xs, (resolve_impl(xs[0], impl) if xs else None)


def fake_quantize_many(xs, block_size: int, impl: str | None, rule: Rule) -> list[torch.Tensor]:
    """The kernel builds its pointer table for this call only (a GroupedFakeQuantizer keeps one)."""
    xs, chosen = group_impl(xs, block_size, impl)
    if chosen == "triton":
        from ..kernels import triton_qdq

        return triton_qdq.fake_quantize_many(xs, block_size, rule=rule)
    return [fake_quantize_reference(x, block_size, rule=rule, name=f"xs[{i}]") for i, x in enumerate(xs)]


def fake_quantize_many_flat(xs, block_size: int, impl: str | None, rule: Rule) -> torch.Tensor:
    """All outputs of :func:`fake_quantize_many` as one flat tensor, in order (``xs`` not empty)."""
    xs, chosen = group_impl(xs, block_size, impl)
    if chosen is None:
        raise ValueError("fake_quantize_many_flat: xs is empty (its dtype and device are unknown)")
    if chosen == "triton":
        from ..kernels import triton_qdq

        return triton_qdq.fake_quantize_many_flat(xs, block_size, rule=rule)
    flat = torch.empty(sum(x.numel() for x in xs), dtype=xs[0].dtype, device=xs[0].device)
    start = 0
    for i, x in enumerate(xs):
        flat[start : start + x.numel()] = fake_quantize_reference(x, block_size, rule=rule, name=f"xs[{i}]").reshape(-1)
        start += x.numel()
    return flat


def quantize_many(xs, block_size: int, impl: str | None, rule: Rule) -> list[tuple[torch.Tensor, torch.Tensor]]:
    xs, chosen = group_impl(xs, block_size, impl)
    if chosen == "triton":
        from ..kernels import triton_qdq

        return triton_qdq.quantize_many(xs, block_size, rule=rule)
    return [quantize_reference(x, block_size, rule=rule, name=f"xs[{i}]") for i, x in enumerate(xs)]
