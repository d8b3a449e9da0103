"""``MXPayload``: codes, scale bytes, block size and rule travel together (issue 17: the block size
was a default 32 repeated in seven places of parity and export), and what reads the bytes back
takes the block size and the rule from the data.

Bit-exact throughout: codes and scales as bytes, decoded values on integer views."""

from __future__ import annotations

import pytest
import torch

from _helpers import bits
from megatron_qat import mxfp4
from megatron_qat.mxfp4 import MXPayload
from megatron_qat.numerics import families
from megatron_qat.numerics.rules import FLASHINFER_MXFP4, FLASHINFER_MXFP8, RULES, VLLM_ONLINE_MXFP4

BLOCK_SIZES = (32, 16, 64)
SHAPES = ((8, 128), (3, 4, 192))
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _x(shape, dtype, seed=0):
    return families.make("random_1", shape, dtype, seed=seed)


@pytest.mark.parametrize("rule", RULES.values(), ids=str)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_carries_block_size_and_rule_and_decodes_to_fake_quantize(rule, block_size, shape, dtype):
    x = _x(shape, dtype)
    p = MXPayload.quantize(x, block_size, rule=rule)
    codes, scales = mxfp4.quantize(x, block_size, rule=rule)
    assert (p.block_size, p.rule) == (block_size, rule) and torch.equal(p.codes, codes) and torch.equal(p.scales, scales)
    assert p.shape == tuple(shape) and p.in_features == shape[-1]
    assert torch.equal(bits(p.dequantize(dtype)), bits(mxfp4.fake_quantize(x, block_size, rule=rule)))


@pytest.mark.parametrize("rule,per_block", [(FLASHINFER_MXFP4, 16), (FLASHINFER_MXFP8, 32)], ids=str)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_blocks_view_round_trips_and_reads_the_block_size_from_the_data(rule, per_block, block_size):
    p = MXPayload.quantize(_x((2, 6, 128), torch.bfloat16), block_size, rule=rule)
    blocks = p.blocks()
    assert tuple(blocks.shape) == (2, 6, 128 // block_size, per_block * block_size // 32)
    assert blocks.data_ptr() == p.codes.data_ptr()  # a view of the same bytes
    back = MXPayload.from_blocks(blocks, p.scales, rule)
    assert back.block_size == block_size and torch.equal(back.codes, p.codes)


def test_indexing_selects_leading_dims_only_and_keeps_block_size_and_rule():
    x = _x((4, 6, 64), torch.bfloat16)
    p = MXPayload.quantize(x, 16, rule=VLLM_ONLINE_MXFP4)
    part = p[1, 2:5]
    assert (part.block_size, part.rule) == (16, VLLM_ONLINE_MXFP4) and part.shape == (3, 64)
    assert torch.equal(bits(part.dequantize(torch.bfloat16)), bits(mxfp4.fake_quantize(x[1, 2:5], 16, rule=VLLM_ONLINE_MXFP4)))
    for bad in ((0, 0, 0), (Ellipsis, 0)):
        with pytest.raises(IndexError, match="leading dims"):
            p[bad]


def test_stack_and_map_keep_the_bytes():
    xs = [_x((6, 64), torch.float16, seed=s) for s in range(3)]
    stacked = MXPayload.stack(MXPayload.quantize_many(xs, 32, rule=FLASHINFER_MXFP4))
    assert stacked.shape == (3, 6, 64)
    for e, x in enumerate(xs):
        assert torch.equal(stacked[e].codes, mxfp4.quantize(x)[0])
    flipped = stacked.map(lambda t: t.flip(0))
    assert torch.equal(flipped[0].scales, stacked[2].scales) and flipped.block_size == 32
    with pytest.raises(ValueError, match="block sizes / rules"):
        MXPayload.stack([MXPayload.quantize(xs[0], 32, rule=FLASHINFER_MXFP4), MXPayload.quantize(xs[1], 16, rule=FLASHINFER_MXFP4)])
    with pytest.raises(ValueError, match="block sizes / rules"):
        MXPayload.stack([MXPayload.quantize(xs[0], 32, rule=FLASHINFER_MXFP4), MXPayload.quantize(xs[1], 32, rule=VLLM_ONLINE_MXFP4)])


@pytest.mark.parametrize("codes_shape,scales_shape,block_size,rule,message", [
    ((4, 16), (4, 2), 32, FLASHINFER_MXFP4, "do not make blocks of 32"),  # K = 32 -> 1 scale per row
    ((4, 16), (4, 1), 24, FLASHINFER_MXFP4, "do not make blocks of 24"),  # K = 32 not a multiple of 24
    ((4, 16), (3, 1), 32, FLASHINFER_MXFP4, "do not make blocks of 32"),  # leading dims differ
    ((4, 16), (4, 1), 32, FLASHINFER_MXFP8, "do not make blocks of 32"),  # E4M3: 16 bytes are 16 elements
    ((4, 16), (4, 1), 3, FLASHINFER_MXFP4, "positive even integer"),
])
def test_inconsistent_bytes_are_refused(codes_shape, scales_shape, block_size, rule, message):
    with pytest.raises(ValueError, match=message):
        MXPayload(torch.zeros(codes_shape, dtype=torch.uint8), torch.zeros(scales_shape, dtype=torch.uint8), block_size, rule)
    with pytest.raises(ValueError, match="uint8"):
        MXPayload(torch.zeros(4, 16), torch.zeros(4, 1, dtype=torch.uint8), 32, FLASHINFER_MXFP4)
    with pytest.raises(TypeError, match="Rule"):
        MXPayload(torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.uint8), 32, "flashinfer-mxfp4")
