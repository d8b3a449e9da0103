"""Per-module grouped fake-quant: :class:`GroupedFakeQuantizer`."""

from __future__ import annotations

import torch

from ..numerics.constants import DEFAULT_BLOCK_SIZE
from ..numerics.format import check_block_size, check_group
from . import backends
from .dispatch import resolve_impl


class GroupedFakeQuantizer:
    """Fake-quantize one fixed set of tensors (the expert weights of one TEGroupedLinear) again and
    again: ``GroupedFakeQuantizer(block_size, impl=None)(weights) -> list[Tensor]`` equals
    ``fake_quantize_many(weights, block_size, impl=impl)`` bit for bit.

    One instance per module. With the Triton kernel the grouped launch reads a device pointer
    table; the quantizer keeps the current one (a
    :class:`megatron_qat.kernels.triton_qdq.GroupTableSlot`) and rebuilds it only when the tensors'
    ``data_ptr``s, sizes, dtype or device change. So after the first (warm-up) call a call makes no
    host-to-device copy and no pinned allocation, and it can be captured in a CUDA graph; a rebuild
    needed during a capture raises RuntimeError telling you to run one eager forward first. Tables
    read by a captured graph are kept alive with the quantizer. Nothing is global: the state dies
    with the module. ``impl`` and ``MEGATRON_QAT_KERNEL`` are resolved on every call (a few
    microseconds), like :func:`megatron_qat.mxfp4.fake_quantize_many`.

    Under ``torch.compile`` the call is the custom op ``megatron_qat::fake_quantize_many`` (traced
    without a graph break; the table is then built per call).
    """

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE, *, impl: str | None = None):
        self.block_size = check_block_size(block_size)
        self.impl = impl
        self._tables = None  # GroupTableSlot, created by the first call that runs the Triton kernel

    @property
    def table_builds(self) -> int:
        """How many times the pointer table was built (0 until the Triton kernel ran)."""
        return 0 if self._tables is None else self._tables.builds

    def __call__(self, xs) -> list[torch.Tensor]:
        if torch.compiler.is_compiling():
            from . import fake_quantize_many

            return fake_quantize_many(xs, self.block_size, impl=self.impl)
        if isinstance(xs, torch.Tensor):
            check_group(xs, self.block_size)  # raises: a list of tensors is expected
        xs = list(xs)
        if not xs:
            return []
        if resolve_impl(xs[0], self.impl) == "triton":
            from ..kernels import triton_qdq

            if self._tables is None:
                self._tables = triton_qdq.GroupTableSlot()
            return triton_qdq.fake_quantize_many(xs, self.block_size, tables=self._tables)  # validates
        return backends.fake_quantize_many(xs, self.block_size, "reference")
