"""Per-module grouped fake-quant: :class:`GroupedFakeQuantizer`."""

from __future__ import annotations

import torch

from ..numerics.constants import DEFAULT_BLOCK_SIZE
from ..numerics.format import check_block_size, check_group
from ..numerics.reference import check_rule
from ..numerics.rules import FLASHINFER_MXFP4, Rule
from . import backends
from .dispatch import resolve_impl


class GroupedFakeQuantizer:
    """Fake-quantize one fixed set of tensors (the expert weights of one TEGroupedLinear) again and
    again: ``GroupedFakeQuantizer(block_size, impl=None, rule=FLASHINFER_MXFP4)(weights) ->
    list[Tensor]`` equals ``fake_quantize_many(weights, block_size, impl=impl, rule=rule)`` bit for bit.

    One instance per module. With the Triton kernel the first call (and any call whose key changed:
    the tensors' count, ``data_ptr``, shape or dtype, their contiguity or device) validates the
    tensors, resolves ``impl`` / ``MEGATRON_QAT_KERNEL``, builds the device pointer table (a
    :class:`megatron_qat.kernels.triton_qdq.GroupTableSlot`) and prepares the launch
    (:class:`megatron_qat.kernels.prepared.PreparedGroup`: grid, output size, split shapes, the
    compiled kernel handle). A call with the same key re-derives nothing: it checks the key,
    allocates the output and launches (a few microseconds of host time); so ``impl`` and
    ``MEGATRON_QAT_KERNEL`` are read again only when the key changes. After the first (warm-up)
    call a call makes no host-to-device copy and no pinned allocation, and it can be captured in a
    CUDA graph; a rebuild needed during a capture raises RuntimeError telling you to run one eager
    forward first. Tables read by a captured graph are kept alive with the quantizer. Nothing is
    global: the state dies with the module. With the reference implementation every call runs it.

    Under ``torch.compile`` the call is the custom op ``megatron_qat::fake_quantize_many`` (traced
    without a graph break; the table is then built per call).
    """

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE, *, impl: str | None = None, rule: Rule = FLASHINFER_MXFP4):
        self.block_size = check_block_size(block_size)
        self.impl = impl
        self.rule = check_rule(rule)
        self._tables = None  # GroupTableSlot, created by the first call that runs the Triton kernel
        self._prepared = None  # PreparedGroup of the current key

    @property
    def table_builds(self) -> int:
        """How many times the pointer table was built (0 until the Triton kernel ran)."""
        return 0 if self._tables is None else self._tables.builds

    def __call__(self, xs) -> list[torch.Tensor]:
        if torch.compiler.is_compiling():
            from . import fake_quantize_many

            return fake_quantize_many(xs, self.block_size, impl=self.impl, rule=self.rule)
        prepared = self._prepared
        if prepared is not None and type(xs) in (list, tuple) and prepared.matches(xs):
            return prepared()
        return self._prepare_and_run(xs)

    def wrote(self, outs: list[torch.Tensor]) -> bool:
        """Whether ``outs`` are the views of the current prepared launch's last output (the only
        tensors :meth:`quantize_into` can write again)."""
        prepared = self._prepared
        return prepared is not None and prepared.produced(outs)

    def quantize_into(self, xs, outs: list[torch.Tensor], ptrs=None) -> bool:
        """Fake-quantize ``xs`` again into ``outs``, the tensors an earlier call of this quantizer
        returned for the same tensors (same key), and return True; False (nothing written) when
        ``outs`` are not the current prepared launch's output or the key changed. The caller makes
        sure nothing else reads ``outs`` meanwhile and bumps their version counter. ``ptrs``: the
        tensors' ``data_ptr()`` values when the caller has read them already. On CUDA the launch is
        a CUDA-graph replay (:meth:`megatron_qat.kernels.prepared.PreparedGroup.run_into`)."""
        prepared = self._prepared
        if prepared is None or torch.compiler.is_compiling() or type(xs) not in (list, tuple) \
                or not prepared.matches(xs, ptrs):
            return False
        return prepared.run_into(outs)

    def _prepare_and_run(self, xs) -> list[torch.Tensor]:
        self._prepared = None
        if isinstance(xs, torch.Tensor):
            check_group(xs, self.block_size)  # raises: a list of tensors is expected
        xs = list(xs)
        if not xs:
            return []
        if resolve_impl(xs[0], self.impl) == "triton":
            from ..kernels import prepared, triton_qdq

            if self._tables is None:
                self._tables = triton_qdq.GroupTableSlot()
            self._prepared, outs = prepared.prepare_group(xs, self.block_size, self.rule, self._tables)  # validates
            return outs
        return backends.fake_quantize_many(xs, self.block_size, "reference", self.rule)
