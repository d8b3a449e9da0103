"""GPU proof of the engine recipes (issue 15 item 6) on a real one-GPU MoELayer (TEGroupedMLP, 4
experts, SwiGLU, bf16; TE 2.20.2, megatron-core 0.19.2), bitwise on integer views.

For each recipe, ``megatron_qat.enable(recipe=R)`` on the layer under test against a flag-off
reference built independently of the runtime: its expert weights are overwritten with
``mxfp4.fake_quantize(w, rule=R.weights, impl="reference")`` (the PyTorch reference, not the Triton
kernel the runtime uses), and, when R quantizes activations, forward pre-hooks on its
``experts.linear_fc1`` / ``linear_fc2`` replace each GEMM input with the reference fake-quantized
activation under a straight-through autograd function written here, and the experts run with
probabilities 1 and scale their output by the routing probabilities (the engines' placement). Checked:

- forward (grad and no_grad) equals the reference;
- the input gradient equals the reference's (straight-through through both activation QDQs);
- with gradient-accumulation fusion under Megatron DDP, every expert ``main_grad`` equals the
  reference's after each of two micro-batches (each gradient lands exactly once), Megatron's hook
  consumed ``param.grad`` and the Parameter's ``grad_added_to_main_grad`` is set.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.megatron]

sys.path.insert(0, os.path.dirname(__file__))
import _moe_harness as H  # noqa: E402
from _helpers import bits  # noqa: E402

H.require_gpu_stack()

import megatron_qat  # noqa: E402
from megatron_qat import mxfp4  # noqa: E402
from megatron_qat.numerics.rules import RECIPES  # noqa: E402

RECIPE_NAMES = ["flashinfer-trtllm-w4a8", "vllm-online-w4a4", "vllm-online-w4a16", "modelopt-w4a16"]


@pytest.fixture(scope="module", autouse=True)
def _gpu_session(megatron_gpu):
    yield


@pytest.fixture(autouse=True)
def _always_disable():
    yield
    megatron_qat.disable()


class _ReferenceSTE(torch.autograd.Function):
    """The reference activation QDQ: forward = PyTorch reference of the rule, backward = identity."""

    @staticmethod
    def forward(ctx, x, rule):  # type: ignore[override]
        return mxfp4.fake_quantize(x, 32, rule=rule, impl="reference")

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def _reference(config, layer, recipe):
    ref = H.build_moe_layer(config, state_dict=layer.state_dict())
    with torch.no_grad():
        for p in H.expert_weights(ref).values():
            p.copy_(mxfp4.fake_quantize(p, 32, rule=recipe.weights, impl="reference"))
    if recipe.activations is not None:
        def quantize_input(module, args, rule=recipe.activations):
            return (_ReferenceSTE.apply(args[0], rule), *args[1:])

        for module in (ref.experts.linear_fc1, ref.experts.linear_fc2):
            module.register_forward_pre_hook(quantize_input)
        experts_forward = ref.experts.forward  # megatron's own, unpatched (fake-QAT is off for the reference)

        def probs_after_fc2(hidden, tokens_per_expert, permuted_probs, *args, **kwargs):
            out, bias = experts_forward(hidden, tokens_per_expert, torch.ones_like(permuted_probs), *args, **kwargs)
            return (out * permuted_probs.unsqueeze(-1)).to(out.dtype), bias

        ref.experts.forward = probs_after_fc2  # where the engines apply the routing probability
    return ref


def _forward_backward(model, x, dy):
    x = x.detach().requires_grad_(True)
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(dy)
    return out.detach(), x.grad.detach()


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_recipe_forward_and_input_gradient_equal_the_reference(name):
    recipe = RECIPES[name]
    config = H.make_config(fusion=False)
    layer = H.build_moe_layer(config)
    ref = _reference(config, layer, recipe)
    x, dy = H.micro_batches(1, seed=5)[0]
    megatron_qat.enable(32, recipe=name)
    got, got_dx = _forward_backward(layer, x, dy)
    with torch.no_grad():
        got_nograd = layer(x)[0]
    megatron_qat.disable()
    want, want_dx = _forward_backward(ref, x, dy)
    plain, _ = _forward_backward(layer, x, dy)
    assert torch.equal(bits(got), bits(want)), f"{name}: forward differs from the reference"
    assert torch.equal(bits(got_nograd), bits(want)), f"{name}: no_grad forward differs"
    assert torch.equal(bits(got_dx), bits(want_dx)), f"{name}: input gradient differs"
    assert not torch.equal(bits(got), bits(plain)), f"{name}: the recipe changed nothing"


@pytest.mark.parametrize("name", ["flashinfer-trtllm-w4a8", "vllm-online-w4a4"])
def test_recipe_main_grad_lands_exactly_once_under_fused_ddp(name):
    recipe = RECIPES[name]
    config = H.make_config(fusion=True)
    layer = H.build_moe_layer(config)
    ref = _reference(config, layer, recipe)
    layer_ddp = H.wrap_ddp(layer, config, overlap_grad_reduce=True)
    ref_ddp = H.wrap_ddp(ref, config, overlap_grad_reduce=True)
    mbs = H.micro_batches(2, seed=6)

    megatron_qat.enable(32, recipe=name)
    got, flags = H.run_ddp(layer_ddp, layer, mbs)
    megatron_qat.disable()
    want, _ = H.run_ddp(ref_ddp, ref, mbs)
    assert all(flags), "the Parameter's grad_added_to_main_grad was not set"
    bad = [(mb, n) for mb in range(2) for n in got[mb] if not torch.equal(bits(got[mb][n]), bits(want[mb][n]))]
    assert not bad, f"{name}: main_grad differs from the reference at {bad[:3]}"
    assert all(not torch.equal(got[1][n], got[0][n]) for n in got[0]), "the second micro-batch added nothing"
