"""``megatron-qat parity``: prove, on your own expert tensors, that megatron_qat's MXFP4 is the
rollout's MXFP4 (FlashInfer ``fp4_quantize(sf_vec_size=32, sf_use_ue8m0=True)``), bit for bit.

Modules: :mod:`.options` (flags), :mod:`.sources` (safetensors / torch / synthetic, lazy row
reads; the built-in tensors come from :mod:`megatron_qat.numerics.families`), :mod:`.golden` (independent NumPy model),
:mod:`.tensor_layout` (the blocked dim of each tensor, from :mod:`megatron_qat.layouts`),
:mod:`.references` (golden, FlashInfer, ours), :mod:`.canary`, :mod:`.compare`, :mod:`.report`,
:mod:`.runner`. docs/parity.md is the user guide. Importing this package loads nothing heavy.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run ``megatron-qat parity`` with ``argv``; returns the exit code (0 equal, 1 mismatch,
    2 usage/environment error, 3 incomplete; :mod:`.errors`)."""
    from .runner import main as _main

    return _main(argv)


__all__ = ["main"]
