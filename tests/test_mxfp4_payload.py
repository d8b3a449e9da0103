"""``MXFP4Payload``: codes, scale bytes and block size travel together (issue 17: the block size
was a default 32 repeated in seven places of parity and export), and what reads the bytes back
takes the block size from the data.

Bit-exact throughout: codes and scales as bytes, decoded values on integer views."""

from __future__ import annotations

import pytest
import torch

from _helpers import bits
from megatron_qat import mxfp4
from megatron_qat.mxfp4 import MXFP4Payload
from megatron_qat.numerics import families

BLOCK_SIZES = (32, 16, 64)
SHAPES = ((8, 128), (3, 4, 192))
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _x(shape, dtype, seed=0):
    return families.make("random_1", shape, dtype, seed=seed)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_carries_its_block_size_and_decodes_to_fake_quantize(block_size, shape, dtype):
    x = _x(shape, dtype)
    p = MXFP4Payload.quantize(x, block_size)
    codes, scales = mxfp4.quantize(x, block_size)
    assert p.block_size == block_size and torch.equal(p.codes, codes) and torch.equal(p.scales, scales)
    assert p.shape == tuple(shape) and p.in_features == shape[-1]
    assert torch.equal(bits(p.dequantize(dtype)), bits(mxfp4.fake_quantize(x, block_size)))


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_blocks_view_round_trips_and_reads_the_block_size_from_the_data(block_size):
    p = MXFP4Payload.quantize(_x((2, 6, 128), torch.bfloat16), block_size)
    blocks = p.blocks()
    assert tuple(blocks.shape) == (2, 6, 128 // block_size, block_size // 2)
    assert blocks.data_ptr() == p.codes.data_ptr()  # a view of the same bytes
    back = MXFP4Payload.from_blocks(blocks, p.scales)
    assert back.block_size == block_size and torch.equal(back.codes, p.codes)


def test_indexing_selects_leading_dims_only_and_keeps_the_block_size():
    x = _x((4, 6, 64), torch.bfloat16)
    p = MXFP4Payload.quantize(x, 16)
    part = p[1, 2:5]
    assert part.block_size == 16 and part.shape == (3, 64)
    assert torch.equal(bits(part.dequantize(torch.bfloat16)), bits(mxfp4.fake_quantize(x[1, 2:5], 16)))
    for bad in ((0, 0, 0), (Ellipsis, 0)):
        with pytest.raises(IndexError, match="leading dims"):
            p[bad]


def test_stack_and_map_keep_the_bytes():
    xs = [_x((6, 64), torch.float16, seed=s) for s in range(3)]
    stacked = MXFP4Payload.stack(MXFP4Payload.quantize_many(xs, 32))
    assert stacked.shape == (3, 6, 64)
    for e, x in enumerate(xs):
        assert torch.equal(stacked[e].codes, mxfp4.quantize(x)[0])
    flipped = stacked.map(lambda t: t.flip(0))
    assert torch.equal(flipped[0].scales, stacked[2].scales) and flipped.block_size == 32
    with pytest.raises(ValueError, match="block sizes"):
        MXFP4Payload.stack([MXFP4Payload.quantize(xs[0], 32), MXFP4Payload.quantize(xs[1], 16)])


@pytest.mark.parametrize("codes_shape,scales_shape,block_size,message", [
    ((4, 16), (4, 2), 32, "do not make blocks of 32"),  # K = 32 -> 1 scale per row
    ((4, 16), (4, 1), 24, "do not make blocks of 24"),  # K = 32 not a multiple of 24
    ((4, 16), (3, 1), 32, "do not make blocks of 32"),  # leading dims differ
    ((4, 16), (4, 1), 3, "positive even integer"),
])
def test_inconsistent_bytes_are_refused(codes_shape, scales_shape, block_size, message):
    with pytest.raises(ValueError, match=message):
        MXFP4Payload(torch.zeros(codes_shape, dtype=torch.uint8), torch.zeros(scales_shape, dtype=torch.uint8), block_size)
    with pytest.raises(ValueError, match="uint8"):
        MXFP4Payload(torch.zeros(4, 16), torch.zeros(4, 1, dtype=torch.uint8), 32)
