"""Straight-through estimator: forward = MXFP4 fake-quant, backward = identity.

``fake_quantize_ste(w)`` is what the Megatron patch feeds to Transformer Engine in place of the
BF16 master weight. The gradient that arrives for the fake-quantized tensor is handed back to
``w`` unchanged (same tensor, same dtype): the quantizer is treated as the identity for
differentiation, which is the standard STE of QAT.
"""

from __future__ import annotations

import torch


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, block_size: int, impl):  # type: ignore[override]
        from . import fake_quantize

        return fake_quantize(w, block_size, impl=impl)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        return grad_output, None, None


def fake_quantize_ste(w: torch.Tensor, block_size: int = 32, *, impl: str | None = None) -> torch.Tensor:
    """MXFP4 fake-quantize ``w`` with a straight-through gradient.

    Forward: ``fake_quantize(w, block_size)`` (same shape, dtype, device; a new contiguous tensor).
    Backward: d(out)/d(w) is the identity; the incoming gradient is returned as is.
    Under ``torch.no_grad()`` (or when ``w`` does not require grad) no graph is recorded.
    """
    if torch.is_grad_enabled() and isinstance(w, torch.Tensor) and w.requires_grad:
        return _FakeQuantizeSTE.apply(w, block_size, impl)
    from . import fake_quantize

    return fake_quantize(w, block_size, impl=impl)
