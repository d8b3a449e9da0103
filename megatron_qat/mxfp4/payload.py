"""Block-scaled (MX) data that carries how it was made: codes, scale bytes, ``block_size`` and the
quantization ``rule`` in one value.

torchao's ``MXTensor`` keeps ``qdata``, the E8M0 scale, ``block_size`` and the element dtype
together for the same reason: whoever later decodes, re-lays-out, splits or concatenates the bytes
(the exporters, the parity checker) reads the block size and the rule from the data instead of
assuming them.

Contract (:class:`MXPayload`):

- ``codes``: uint8 ``[..., K // rule.codes_per_byte]``: E2M1 rules two codes per byte (element
  ``2i`` of a row in the low nibble), E4M3 rules one byte per element (docs/numerics.md);
- ``scales``: uint8 ``[..., K // block_size]``, E8M0 bytes (``2 ** (byte - 127)``);
- the same leading dims ``[...]`` (rows, experts), on one device; ``block_size`` a positive even int;
  ``rule`` a :class:`megatron_qat.numerics.rules.Rule`.

Indexing (``payload[e]``, ``payload[e, rows]``) selects along the leading dims only, never along K.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..numerics.format import check_block_size
from ..numerics.rules import Element, Rule


@dataclass(frozen=True)
class MXPayload:
    codes: torch.Tensor
    scales: torch.Tensor
    block_size: int
    rule: Rule

    def __post_init__(self):
        check_block_size(self.block_size)
        if not isinstance(self.rule, Rule):
            raise TypeError(f"MXPayload.rule must be a megatron_qat.numerics.rules.Rule, got {self.rule!r}")
        for name, t in (("codes", self.codes), ("scales", self.scales)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() == 0:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"MXPayload.{name} must be a uint8 tensor [..., n], got {got}")
        k = self.in_features
        want = (*self.codes.shape[:-1], k // self.block_size)
        if k % self.block_size or tuple(self.scales.shape) != want:
            raise ValueError(
                f"MXPayload ({self.rule.name}): codes {tuple(self.codes.shape)} (K = {k}) and scales "
                f"{tuple(self.scales.shape)} do not make blocks of {self.block_size} (scales must be {want})"
            )
        if self.codes.device != self.scales.device:
            raise ValueError(f"MXPayload: codes on {self.codes.device}, scales on {self.scales.device}")

    # ------------------------------------------------------------------ making one
    @classmethod
    def quantize(cls, x: torch.Tensor, block_size: int, *, rule: Rule, impl: str | None = None) -> "MXPayload":
        """:func:`megatron_qat.mxfp4.quantize` of ``x [..., K]`` under ``rule`` (blocks along the last dim)."""
        from .. import mxfp4

        codes, scales = mxfp4.quantize(x, block_size, impl=impl, rule=rule)
        return cls(codes, scales, block_size, rule)

    @classmethod
    def quantize_many(cls, xs: Sequence[torch.Tensor], block_size: int, *, rule: Rule, impl: str | None = None) -> list["MXPayload"]:
        """:func:`megatron_qat.mxfp4.quantize_many` (one kernel launch on CUDA), one payload per tensor."""
        from .. import mxfp4

        return [cls(c, s, block_size, rule) for c, s in mxfp4.quantize_many(list(xs), block_size, impl=impl, rule=rule)]

    @classmethod
    def stack(cls, payloads: Sequence["MXPayload"], dim: int = 0) -> "MXPayload":
        """Stack along a new leading dim (every payload of one block size, rule and shape)."""
        made = {(p.block_size, p.rule) for p in payloads}
        if len(made) != 1:
            raise ValueError(f"MXPayload.stack: payloads of block sizes / rules {sorted((b, r.name) for b, r in made)}")
        if dim < 0 or dim > payloads[0].codes.dim() - 1:
            raise ValueError(f"MXPayload.stack: dim must be a leading dim in [0, {payloads[0].codes.dim() - 1}], got {dim}")
        block_size, rule = made.pop()
        return cls(torch.stack([p.codes for p in payloads], dim), torch.stack([p.scales for p in payloads], dim), block_size, rule)

    # ------------------------------------------------------------------ reading it
    @property
    def in_features(self) -> int:
        """K: elements per row."""
        return self.codes.shape[-1] * self.rule.codes_per_byte

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the tensor it encodes: leading dims + ``(K,)``."""
        return (*self.codes.shape[:-1], self.in_features)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """:func:`megatron_qat.mxfp4.dequantize` with this payload's block size and rule."""
        from .. import mxfp4

        return mxfp4.dequantize(self.codes, self.scales, dtype, self.block_size, rule=self.rule)

    def blocks(self) -> torch.Tensor:
        """The codes as ``[..., K // block_size, bytes per block]``: one row of bytes per block (for
        E2M1, the gpt-oss ``*_blocks`` layout ``[..., K/32, 16]``); a view of the same bytes."""
        per_block = self.block_size // self.rule.codes_per_byte
        return self.codes.reshape(*self.codes.shape[:-1], self.in_features // self.block_size, per_block)

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, scales: torch.Tensor, rule: Rule) -> "MXPayload":
        """Inverse of :meth:`blocks`: ``blocks [..., K/bs, bytes per block]`` and ``scales [..., K/bs]``;
        the block size is read from the data (bytes per block x codes per byte)."""
        if blocks.dim() < 2:
            raise ValueError(f"blocks must be [..., K/block_size, bytes per block], got {tuple(blocks.shape)}")
        codes = blocks.reshape(*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1])
        return cls(codes, scales, rule.codes_per_byte * blocks.shape[-1], rule)

    # ------------------------------------------------------------------ same bytes, other view
    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "MXPayload":
        """``fn`` applied to codes and scales alike; ``fn`` must act on the leading dims only (select,
        reorder, move), or along the last dim in whole blocks (a concatenation of payloads)."""
        return MXPayload(fn(self.codes), fn(self.scales), self.block_size, self.rule)

    def __getitem__(self, index) -> "MXPayload":
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis for i in index) or len(index) >= self.codes.dim():
            raise IndexError(f"MXPayload index {index} must select along the leading dims {tuple(self.codes.shape[:-1])} only")
        return self.map(lambda t: t[index])

    def contiguous(self) -> "MXPayload":
        return self.map(torch.Tensor.contiguous)

    def to(self, device) -> "MXPayload":
        return self.map(lambda t: t.to(device))

    def cpu(self) -> "MXPayload":
        return self.to("cpu")

    @property
    def e2m1(self) -> bool:
        """Whether the elements are E2M1 (MXFP4: what the export formats store)."""
        return self.rule.element is Element.E2M1
