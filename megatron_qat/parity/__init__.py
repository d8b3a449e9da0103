"""``megatron-qat parity``: prove, on your own expert tensors, that megatron_qat's MXFP4 is the
rollout's MXFP4 (FlashInfer ``fp4_quantize(sf_vec_size=32, sf_use_ue8m0=True)``), bit for bit.

Modules: :mod:`.options` (flags), :mod:`.sources` (safetensors / torch / synthetic, lazy row
reads; the built-in tensors come from :mod:`megatron_qat.numerics.families`), :mod:`.golden` (independent NumPy model),
:mod:`.tensor_layout` (the blocked dim of each tensor, from :mod:`megatron_qat.layouts`),
:mod:`.references` (golden, FlashInfer, ours), :mod:`.canary`, :mod:`.compare`, :mod:`.report`,
:mod:`.runner`. Shared with ``megatron-qat export``: :mod:`megatron_qat.tools` (errors and exit
codes, progress line, JSON writer, safetensors reader) and the export check
(:func:`megatron_qat.export.verify.run_check`). docs/parity.md is the user guide. Importing this
package loads nothing heavy.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run ``megatron-qat parity`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code
    (:class:`megatron_qat.tools.errors.ExitCode`: 0 equal, 1 mismatch, 2 usage/environment error,
    3 incomplete)."""
    from ..cli import main as cli_main

    return cli_main(["parity", *(sys.argv[1:] if argv is None else argv)])


__all__ = ["main"]
