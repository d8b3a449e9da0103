"""Straight-through estimator: forward = MXFP4 fake-quant, backward = identity.

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
from . import backends, ops


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, block_size: int, impl):  # type: ignore[override]
        return backends.fake_quantize(w, block_size, impl)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        return grad_output, None, None


def fake_quantize_ste(w: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, *, impl: str | None = None) -> torch.Tensor:
    """MXFP4 fake-quantize ``w`` with a straight-through gradient.

    Forward: ``fake_quantize(w, block_size)`` (same shape, dtype, device; a new contiguous tensor).
    Backward: d(out)/d(w) is the identity; the incoming gradient is returned as is.
    Under ``torch.no_grad()`` (or when ``w`` does not require grad) no graph is recorded.
    """
    if torch.compiler.is_compiling():
        return ops.fake_quantize_ste(w, block_size, impl)
    if torch.is_grad_enabled() and isinstance(w, torch.Tensor) and w.requires_grad:
        return _FakeQuantizeSTE.apply(w, block_size, impl)
    return backends.fake_quantize(w, block_size, impl)
