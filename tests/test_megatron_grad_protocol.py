"""Fused-wgrad protocol: with TE's gradient-accumulation fusion (stand-in) and a Megatron-DDP-like
hook, every expert gradient lands in main_grad exactly once per micro-batch and equals the
unfused reference bit for bit; TE's dummy is passed through, never added."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _helpers import bits  # noqa: E402
from _megatron_fixtures import te_ext  # noqa: E402,F401
from te_standin import DDPLikeHooks, StandInGroupedLinear, get_dummy_wgrad  # noqa: E402

import megatron_qat.megatron as mm  # noqa: E402
from megatron_qat import mxfp4  # noqa: E402

N, K, OUT = 3, 64, 16
SPLITS = [[4, 0, 6], [2, 5, 3]]


def _micro_batches():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(sum(s), K, generator=gen), torch.randn(sum(s), OUT, generator=gen), s) for s in SPLITS]


def _reference_grads():
    """Unfused: weights overwritten with their fake-quant, no patch, .grad accumulated by autograd."""
    ref = StandInGroupedLinear(N, K, OUT, seed=3)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(mxfp4.fake_quantize(p, 32))
    per_mb = []
    for x, dy, s in _micro_batches():
        ref(x, s).backward(dy)
        per_mb.append([ref.get_parameter(f"weight{i}").grad.clone() for i in range(N)])
    return per_mb


@pytest.mark.parametrize("overlap_grad_reduce", [True, False])
def test_fused_main_grad_equals_unfused_reference_exactly_once(te_ext, overlap_grad_reduce):
    layer = te_ext.TEGroupedLinear(N, K, OUT, fuse_wgrad_accumulation=True, seed=3)
    params = [layer.get_parameter(f"weight{i}") for i in range(N)]
    ddp = DDPLikeHooks(params, overlap_grad_reduce=overlap_grad_reduce)
    seen = {p: [] for p in params}
    for p in params:
        p.register_hook(lambda g, p=p: seen[p].append(g.data_ptr()))
    mm.enable(32)
    reference = _reference_grads()
    for mb, (x, dy, s) in enumerate(_micro_batches()):
        layer(x, s).backward(dy)
        for i, p in enumerate(params):
            assert torch.equal(bits(p.main_grad), bits(reference[mb][i])), f"weight{i} micro-batch {mb}"
            assert p.grad is None and p.grad_added_to_main_grad is True
            assert ddp.adds[p] == 0  # TE's dummy (NaN here) was never added
            # the Parameter received exactly TE's cached dummy: nothing extra was allocated
            assert seen[p][-1] == get_dummy_wgrad([OUT, K], torch.float32).data_ptr()
    assert all(len(v) == 2 for v in seen.values())


def test_fused_zero_out_wgrad_is_added_as_zeros(te_ext):
    layer = te_ext.TEGroupedLinear(N, K, OUT, fuse_wgrad_accumulation=True, seed=3)
    params = [layer.get_parameter(f"weight{i}") for i in range(N)]
    ddp = DDPLikeHooks(params)
    for p in params:
        p.zero_out_wgrad = True
    mm.enable(32)
    reference = _reference_grads()
    for mb, (x, dy, s) in enumerate(_micro_batches()):
        layer(x, s).backward(dy)
        for i, p in enumerate(params):
            assert torch.equal(bits(p.main_grad), bits(reference[mb][i]))
            assert ddp.adds[p] == mb + 1  # Megatron adds the zero dummy, as on TE's own path


def test_fused_without_flag_attribute_leaves_grad_none(te_ext):
    """TE returns None when the tensor has no grad_added_to_main_grad; so do we (no zero tensor)."""
    layer = te_ext.TEGroupedLinear(N, K, OUT, fuse_wgrad_accumulation=True, seed=3)
    params = [layer.get_parameter(f"weight{i}") for i in range(N)]
    for p in params:
        p.main_grad = torch.zeros(p.shape)
    mm.enable(32)
    reference = _reference_grads()
    for mb, (x, dy, s) in enumerate(_micro_batches()):
        layer(x, s).backward(dy)
        for i, p in enumerate(params):
            assert p.grad is None
            assert torch.equal(bits(p.main_grad), bits(reference[mb][i]))


def test_unfused_grad_equals_reference(te_ext):
    layer = te_ext.TEGroupedLinear(N, K, OUT, seed=3)
    mm.enable(32)
    reference = _reference_grads()
    for mb, (x, dy, s) in enumerate(_micro_batches()):
        layer(x, s).backward(dy)
        for i in range(N):
            assert torch.equal(bits(layer.get_parameter(f"weight{i}").grad), bits(reference[mb][i]))


def test_fake_tensors_carry_the_parameter_attributes(te_ext):
    layer = te_ext.TEGroupedLinear(2, K, OUT, fuse_wgrad_accumulation=True)
    params = [layer.weight0, layer.weight1]
    DDPLikeHooks(params)
    params[0].overwrite_main_grad = False
    mm.enable(32)
    qs = layer._get_weight_tensors()
    for p, q in zip(params, qs):
        assert q.main_grad is p.main_grad
        assert hasattr(q, "grad_added_to_main_grad")
        assert q is not p and q.requires_grad
    assert qs[0].overwrite_main_grad is False and not hasattr(qs[1], "overwrite_main_grad")
    with torch.no_grad():
        plain = layer._get_weight_tensors()
    assert all(q.grad_fn is None and not q.requires_grad for q in plain)
