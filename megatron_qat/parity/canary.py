"""A hand-built canary for a FlashInfer reference: inputs whose MXFP4 codes and scale bytes are
known without running any quantizer, checked before FlashInfer is trusted.

On sm_90 FlashInfer's ``fp4_quantize(sf_vec_size=32, sf_use_ue8m0=True)`` has its kernel body
compiled out (the E2M1 conversion is sm_100+) and returns whatever the output buffers held; the
caller poisons those buffers first, so such a run cannot pass by accident.

Canary (bf16, 2 rows x 64 = 4 blocks; no signed zeros, so FlashInfer's +0.0 decode of 0x8 is moot):

- row 0 block 0: the 16 E2M1 values [0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, ..., -6] twice, times 2**0
- row 0 block 1: the same times 2**3;   row 1 block 0: the same times 2**-5
- row 1 block 1: RNE ties times 2**2: [6, .25, .75, 1.25, 1.75, 2.5, 3.5, 5, -.75, -1.25, -1.75, -2.5,
  -3.5, -5, .5, 1] twice.

amax is 6 * 2**e in every block, and fp32(6 * RN(1/6)) == 1.0 exactly, so the scale is 2**e.
"""

from __future__ import annotations

import torch

_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
_VALUE_CODES = [0, 1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13, 14, 15]
_TIES = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 0.5, 1.0]
_TIE_CODES = [7, 0, 2, 2, 4, 4, 6, 6, 10, 10, 12, 12, 14, 14, 1, 2]
_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
# (values, codes, exponent e) per block, row-major
_BLOCKS = [(_VALUES, _VALUE_CODES, 0), (_VALUES, _VALUE_CODES, 3), (_VALUES, _VALUE_CODES, -5), (_TIES, _TIE_CODES, 2)]


def canary() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x bf16 [2, 64], packed codes uint8 [2, 32], scale bytes uint8 [2, 2], decoded fp32 [2, 64])."""
    xs, codes, scales, decoded = [], [], [], []
    for values, block_codes, e in _BLOCKS:
        xs.extend(v * 2.0**e for v in values * 2)
        codes.extend(block_codes * 2)
        scales.append(127 + e)
        decoded.extend((-1 if c & 8 else 1) * _E2M1[c & 7] * 2.0**e for c in block_codes * 2)
    x = torch.tensor(xs, dtype=torch.bfloat16).reshape(2, 64)
    c = torch.tensor(codes, dtype=torch.uint8).reshape(2, 64)
    packed = c[:, 0::2] | (c[:, 1::2] << 4)
    return x, packed, torch.tensor(scales, dtype=torch.uint8).reshape(2, 2), torch.tensor(decoded).reshape(2, 64)


def canary_problems(codes: torch.Tensor, scales: torch.Tensor, values: torch.Tensor) -> list[str]:
    """Differences between a reference's canary output and the hand-built expectation ([] = passed)."""
    _, want_codes, want_scales, want_values = canary()
    problems = []
    codes, scales, values = codes.cpu(), scales.cpu(), values.cpu().float()
    if tuple(codes.shape) != tuple(want_codes.shape) or not torch.equal(codes, want_codes):
        bad = (codes != want_codes).sum().item() if codes.shape == want_codes.shape else "shape"
        problems.append(f"codes: {bad} of {want_codes.numel()} bytes differ (got {codes.flatten()[:8].tolist()}..., want {want_codes.flatten()[:8].tolist()}...)")
    if tuple(scales.shape) != tuple(want_scales.shape) or not torch.equal(scales, want_scales):
        problems.append(f"scale bytes: got {scales.flatten().tolist()}, want {want_scales.flatten().tolist()}")
    if tuple(values.shape) != tuple(want_values.shape) or not torch.equal(values.view(torch.int32), want_values.view(torch.int32)):
        problems.append("dequantized values differ from E2M1 value * 2**(byte - 127)")
    return problems
