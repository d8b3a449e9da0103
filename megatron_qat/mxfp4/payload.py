"""MXFP4 data that carries its own block size: codes, scale bytes and ``block_size`` in one value.

torchao's ``MXTensor`` keeps ``qdata``, the E8M0 scale and ``block_size`` together for the same
reason: whoever later decodes, re-lays-out, splits or concatenates the bytes (the exporters, the
parity checker) reads the block size from the data instead of assuming one.

Contract (:class:`MXFP4Payload`):

- ``codes``: uint8 ``[..., K // 2]``, element ``2i`` of a row in the low nibble (docs/numerics.md);
- ``scales``: uint8 ``[..., K // block_size]``, E8M0 bytes (``2 ** (byte - 127)``);
- the same leading dims ``[...]`` (rows, experts), on one device; ``block_size`` a positive even int.

Indexing (``payload[e]``, ``payload[e, rows]``) selects along the leading dims only, never along K.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..numerics.format import check_block_size


@dataclass(frozen=True)
class MXFP4Payload:
    codes: torch.Tensor
    scales: torch.Tensor
    block_size: int

    def __post_init__(self):
        check_block_size(self.block_size)
        for name, t in (("codes", self.codes), ("scales", self.scales)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() == 0:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"MXFP4Payload.{name} must be a uint8 tensor [..., n], got {got}")
        k = 2 * self.codes.shape[-1]
        want = (*self.codes.shape[:-1], k // self.block_size)
        if k % self.block_size or tuple(self.scales.shape) != want:
            raise ValueError(
                f"MXFP4Payload: codes {tuple(self.codes.shape)} (K = {k}) and scales {tuple(self.scales.shape)} do not "
                f"make blocks of {self.block_size} (scales must be {want})"
            )
        if self.codes.device != self.scales.device:
            raise ValueError(f"MXFP4Payload: codes on {self.codes.device}, scales on {self.scales.device}")

    # ------------------------------------------------------------------ making one
    @classmethod
    def quantize(cls, x: torch.Tensor, block_size: int, *, impl: str | None = None) -> "MXFP4Payload":
        """:func:`megatron_qat.mxfp4.quantize` of ``x [..., K]`` (blocks along the last dim)."""
        from .. import mxfp4

        codes, scales = mxfp4.quantize(x, block_size, impl=impl)
        return cls(codes, scales, block_size)

    @classmethod
    def quantize_many(cls, xs: Sequence[torch.Tensor], block_size: int, *, impl: str | None = None) -> list["MXFP4Payload"]:
        """:func:`megatron_qat.mxfp4.quantize_many` (one kernel launch on CUDA), one payload per tensor."""
        from .. import mxfp4

        return [cls(c, s, block_size) for c, s in mxfp4.quantize_many(list(xs), block_size, impl=impl)]

    @classmethod
    def stack(cls, payloads: Sequence["MXFP4Payload"], dim: int = 0) -> "MXFP4Payload":
        """Stack along a new leading dim (every payload of one block size and shape)."""
        sizes = {p.block_size for p in payloads}
        if len(sizes) != 1:
            raise ValueError(f"MXFP4Payload.stack: payloads of block sizes {sorted(sizes)}")
        if dim < 0 or dim > payloads[0].codes.dim() - 1:
            raise ValueError(f"MXFP4Payload.stack: dim must be a leading dim in [0, {payloads[0].codes.dim() - 1}], got {dim}")
        return cls(torch.stack([p.codes for p in payloads], dim), torch.stack([p.scales for p in payloads], dim), sizes.pop())

    # ------------------------------------------------------------------ reading it
    @property
    def in_features(self) -> int:
        """K: elements per row."""
        return 2 * self.codes.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the tensor it encodes: leading dims + ``(K,)``."""
        return (*self.codes.shape[:-1], self.in_features)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """:func:`megatron_qat.mxfp4.dequantize` with this payload's block size."""
        from .. import mxfp4

        return mxfp4.dequantize(self.codes, self.scales, dtype, self.block_size)

    def blocks(self) -> torch.Tensor:
        """The codes as ``[..., K // block_size, block_size // 2]``: one row of bytes per block (the
        gpt-oss ``*_blocks`` layout); a view of the same bytes."""
        return self.codes.reshape(*self.codes.shape[:-1], self.in_features // self.block_size, self.block_size // 2)

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, scales: torch.Tensor) -> "MXFP4Payload":
        """Inverse of :meth:`blocks`: ``blocks [..., K/bs, bs/2]`` and ``scales [..., K/bs]``; the block
        size is read from the data (``2 * blocks.shape[-1]``)."""
        if blocks.dim() < 2:
            raise ValueError(f"blocks must be [..., K/block_size, block_size/2], got {tuple(blocks.shape)}")
        return cls(blocks.reshape(*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1]), scales, 2 * blocks.shape[-1])

    # ------------------------------------------------------------------ same bytes, other view
    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "MXFP4Payload":
        """``fn`` applied to codes and scales alike; ``fn`` must act on the leading dims only (select,
        reorder, move), or along the last dim in whole blocks (a concatenation of payloads)."""
        return MXFP4Payload(fn(self.codes), fn(self.scales), self.block_size)

    def __getitem__(self, index) -> "MXFP4Payload":
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis for i in index) or len(index) >= self.codes.dim():
            raise IndexError(f"MXFP4Payload index {index} must select along the leading dims {tuple(self.codes.shape[:-1])} only")
        return self.map(lambda t: t[index])

    def contiguous(self) -> "MXFP4Payload":
        return self.map(torch.Tensor.contiguous)

    def to(self, device) -> "MXFP4Payload":
        return self.map(lambda t: t.to(device))

    def cpu(self) -> "MXFP4Payload":
        return self.to("cpu")
