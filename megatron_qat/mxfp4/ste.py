"""Straight-through estimators: forward = fake-quant under a rule, backward = identity.

``fake_quantize_ste(w)`` is the differentiable form of :func:`megatron_qat.mxfp4.fake_quantize`:
the gradient that arrives for the fake-quantized tensor is handed back to ``w`` unchanged (same
tensor, same dtype), the standard STE of QAT.

Under ``torch.compile`` it is the custom op ``megatron_qat::fake_quantize_ste``, whose identity
backward is registered with ``torch.library.register_autograd`` (:mod:`megatron_qat.mxfp4.ops`). In
eager it is the equivalent ``autograd.Function`` below: a custom op's first eager call imports
``torch._dynamo`` (seconds), and its dispatcher adds ~25 us per call.
"""

from __future__ import annotations

import torch

from ..numerics.constants import DEFAULT_BLOCK_SIZE
from ..numerics.reference import check_rule
from ..numerics.rules import FLASHINFER_MXFP4, Rule
from . import backends, ops


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, block_size: int, impl, rule):  # type: ignore[override]
        return backends.fake_quantize(w, block_size, impl, rule)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        return grad_output, None, None, None


class _FakeQuantizeActivationSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, block_size: int, impl, rule, name, launches):  # type: ignore[override]
        return backends.fake_quantize_activation(x, block_size, impl, rule, name, launches)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        return grad_output, None, None, None, None, None


def fake_quantize_ste(
    w: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, *, impl: str | None = None, rule: Rule = FLASHINFER_MXFP4
) -> torch.Tensor:
    """Fake-quantize ``w`` under ``rule`` with a straight-through gradient.

    Forward: ``fake_quantize(w, block_size, rule=rule)`` (same shape, dtype, device; a new
    contiguous tensor). Backward: d(out)/d(w) is the identity; the incoming gradient is returned as
    is. Under ``torch.no_grad()`` (or when ``w`` does not require grad) no graph is recorded.
    """
    check_rule(rule)
    if torch.compiler.is_compiling():
        return ops.fake_quantize_ste(w, block_size, impl, rule.name)
    if torch.is_grad_enabled() and isinstance(w, torch.Tensor) and w.requires_grad:
        return _FakeQuantizeSTE.apply(w, block_size, impl, rule)
    return backends.fake_quantize(w, block_size, impl, rule)


def fake_quantize_activation(
    x: torch.Tensor, rule: Rule, block_size: int = DEFAULT_BLOCK_SIZE, *, impl: str | None = None, name: str = "x"
) -> torch.Tensor:
    """Fake-quantize an activation ``x [..., K]`` (typically ``[tokens, K]``, bf16/fp16/fp32) under
    ``rule`` per 1 x ``block_size`` block along K; same shape and dtype, a new contiguous tensor
    (a non-contiguous ``x`` is copied first: one extra read and write). Backward: identity (STE).

    Raises ValueError naming ``name`` when ``K % block_size != 0`` (TypeError for a dtype outside
    bf16/fp16/fp32 or a ``rule`` that is not a Rule). Non-finite blocks come out NaN. No host sync,
    no host-to-device copy (CUDA-graph capturable after one warm-up call per shape class); on CUDA
    the Triton kernel through a prepared launch (:mod:`megatron_qat.kernels.prepared`), on CPU the
    reference (``impl`` / ``MEGATRON_QAT_KERNEL`` as in :mod:`.dispatch`). Under ``torch.compile``
    it is the custom op ``megatron_qat::fake_quantize_activation``; in eager an
    ``autograd.Function`` (or a plain call when no gradient is needed), without the dispatcher.
    """
    return _activation(x, rule, block_size, impl, name, None)


def _activation(x, rule, block_size, impl, name, launches):
    if torch.compiler.is_compiling():
        return ops.fake_quantize_activation(x, check_rule(rule).name, block_size, impl)
    if getattr(x, "requires_grad", False) and torch.is_grad_enabled():
        return _FakeQuantizeActivationSTE.apply(x, block_size, impl, rule, name, launches)
    return backends.fake_quantize_activation(x, block_size, impl, rule, name, launches)


class ActivationFakeQuantizer:
    """:func:`fake_quantize_activation` of one module's GEMM input, micro-batch after micro-batch:
    ``ActivationFakeQuantizer(rule, block_size=32, impl=None, name="x")(x)``, the same bits. One
    instance per patched module (the fake-QAT runtime keeps it beside the module's weight
    quantizer): on CUDA it keeps the compiled kernel handles of the shapes it saw
    (:class:`megatron_qat.kernels.prepared.ActivationLaunches`), so a call after the first skips
    Triton's argument binding; the state dies with the module."""

    def __init__(self, rule: Rule, block_size: int = DEFAULT_BLOCK_SIZE, *, impl: str | None = None, name: str = "x"):
        self.rule, self.block_size, self.impl, self.name = check_rule(rule), block_size, impl, name
        self.launches = None  # created at the first call that runs the Triton kernel on CUDA

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.launches is None and getattr(x, "is_cuda", False):
            from ..kernels.prepared import ActivationLaunches

            self.launches = ActivationLaunches()
        return _activation(x, self.rule, self.block_size, self.impl, self.name, self.launches)
