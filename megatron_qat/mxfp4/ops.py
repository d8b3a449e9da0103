"""``torch.library`` custom ops of the public API, so that ``torch.compile`` (``fullgraph=True``)
traces it without graph breaks. The rule travels as its name (``Rule.name``, e.g.
``"flashinfer-mxfp4"``; :func:`megatron_qat.numerics.rules.rule_by_name` maps it back).

| op | returns |
|---|---|
| ``megatron_qat::fake_quantize(Tensor x, int block_size, str? impl, str rule)`` | ``Tensor`` like ``x`` (contiguous) |
| ``megatron_qat::quantize(Tensor x, int block_size, str? impl, str rule)`` | ``(codes uint8 [..., K//2] or [..., K] (E4M3), scales uint8 [..., K//bs])`` |
| ``megatron_qat::fake_quantize_many(Tensor[] xs, int block_size, str? impl, str rule)`` | one flat ``Tensor`` of all outputs, in order |
| ``megatron_qat::fake_quantize_ste(Tensor x, int block_size, str? impl, str rule)`` | as ``fake_quantize``; backward is the identity |
| ``megatron_qat::fake_quantize_activation(Tensor x, str rule, int block_size, str? impl)`` | as ``fake_quantize``; backward is the identity |

``rule`` defaults to ``"flashinfer-mxfp4"`` where it follows ``impl``. Each op's real kernel is the
eager call of :mod:`.backends` (so ``impl`` and ``MEGATRON_QAT_KERNEL`` are resolved when the op
runs, not when it is traced); its fake (meta) kernel validates the input exactly like the eager
call and allocates outputs of the contract's shapes. The public functions of
:mod:`megatron_qat.mxfp4` call these ops only while ``torch.compiler.is_compiling()``; in eager
they call :mod:`.backends` directly, which skips the custom-op dispatcher's ~25 us per call (the
results are the same bits; tests check it).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..numerics.format import check_block_size, check_group, check_input
from ..numerics.rules import FLASHINFER_MXFP4, rule_by_name
from . import backends

NAMESPACE = "megatron_qat"
DEFAULT_RULE = FLASHINFER_MXFP4.name


def _like(x, block_size, rule):
    rule_by_name(rule)
    check_block_size(block_size)
    check_input(x, block_size)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op(f"{NAMESPACE}::fake_quantize", mutates_args=())
def fake_quantize(x: torch.Tensor, block_size: int, impl: Optional[str], rule: str = DEFAULT_RULE) -> torch.Tensor:
    return backends.fake_quantize(x, block_size, impl, rule_by_name(rule))


@fake_quantize.register_fake
def _(x, block_size, impl, rule=DEFAULT_RULE):
    return _like(x, block_size, rule)


@torch.library.custom_op(f"{NAMESPACE}::quantize", mutates_args=())
def quantize(x: torch.Tensor, block_size: int, impl: Optional[str], rule: str = DEFAULT_RULE) -> tuple[torch.Tensor, torch.Tensor]:
    return backends.quantize(x, block_size, impl, rule_by_name(rule))


@quantize.register_fake
def _(x, block_size, impl, rule=DEFAULT_RULE):
    r = rule_by_name(rule)
    check_block_size(block_size)
    check_input(x, block_size)
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    return (x.new_empty((*lead, k // r.codes_per_byte), dtype=torch.uint8),
            x.new_empty((*lead, k // block_size), dtype=torch.uint8))  # fmt: skip


@torch.library.custom_op(f"{NAMESPACE}::fake_quantize_many", mutates_args=())
def fake_quantize_many(xs: list[torch.Tensor], block_size: int, impl: Optional[str], rule: str = DEFAULT_RULE) -> torch.Tensor:
    return backends.fake_quantize_many_flat(xs, block_size, impl, rule_by_name(rule))


@fake_quantize_many.register_fake
def _(xs, block_size, impl, rule=DEFAULT_RULE):
    rule_by_name(rule)
    check_block_size(block_size)
    check_group(xs, block_size)
    return xs[0].new_empty(sum(math.prod(x.shape) for x in xs))


@torch.library.custom_op(f"{NAMESPACE}::fake_quantize_ste", mutates_args=())
def fake_quantize_ste(x: torch.Tensor, block_size: int, impl: Optional[str], rule: str = DEFAULT_RULE) -> torch.Tensor:
    return backends.fake_quantize(x, block_size, impl, rule_by_name(rule))


@fake_quantize_ste.register_fake
def _(x, block_size, impl, rule=DEFAULT_RULE):
    return _like(x, block_size, rule)


@torch.library.custom_op(f"{NAMESPACE}::fake_quantize_activation", mutates_args=())
def fake_quantize_activation(x: torch.Tensor, rule: str, block_size: int, impl: Optional[str]) -> torch.Tensor:
    return backends.fake_quantize_activation(x, block_size, impl, rule_by_name(rule))


@fake_quantize_activation.register_fake
def _(x, rule, block_size, impl):
    return _like(x, block_size, rule)


def _identity_backward(n_other_inputs: int):
    def backward(ctx, grad: torch.Tensor):
        return (grad,) + (None,) * n_other_inputs

    return backward


fake_quantize_ste.register_autograd(_identity_backward(3), setup_context=lambda ctx, inputs, output: None)
fake_quantize_activation.register_autograd(_identity_backward(3), setup_context=lambda ctx, inputs, output: None)
