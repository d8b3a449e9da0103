"""Engine recipes through the runtime (issue 15 items 2 and 3), on CPU, against the real megatron-core
extension module carrying the TE stand-in (tests/te_standin.py: Transformer Engine cannot be
installed here; its ``GroupedLinear.forward(inp, m_splits, is_first_microbatch)`` is the stand-in's).

- ``MEGATRON_QAT_RECIPE`` / ``enable(recipe=)`` follow the one strict rule; the default changes nothing;
- weights follow the recipe's weight rule, bit for bit (int32 views);
- under an activation recipe the GEMM input is fake-quantized by the recipe's activation rule on
  every call (never cached), with an identity gradient to the BF16 input; TE's wgrad sees the
  quantized input (wgrad = dY^T Q(x)), with and without fused wgrad;
- the activation line names the recipe; an input whose K is not a multiple of the block is refused.
"""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _helpers import bits  # noqa: E402
from _megatron_fixtures import te_ext  # noqa: E402,F401
from te_standin import DDPLikeHooks, StandInGroupedLinear  # noqa: E402

import megatron_qat.megatron as mm  # noqa: E402
from megatron_qat import config, mxfp4  # noqa: E402
from megatron_qat.numerics.rules import DEFAULT_RECIPE, RECIPES  # noqa: E402

N, K, OUT = 3, 64, 32
SPLITS = [4, 1, 5]
ACTIVATION_RECIPES = [name for name, r in RECIPES.items() if r.activations is not None]


def _x(seed=0, k=K):
    return torch.randn(sum(SPLITS), k, generator=torch.Generator().manual_seed(seed)) * 3


def _reference(layer, recipe):
    """A plain stand-in layer (not patched: its class is StandInGroupedLinear itself, called through
    its original forward) holding the recipe's fake-quantized weights."""
    ref = StandInGroupedLinear(N, K, OUT, fuse_wgrad_accumulation=layer.fuse_wgrad_accumulation)
    ref.load_state_dict(layer.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(mxfp4.fake_quantize(p, 32, rule=recipe.weights, impl="reference"))
    return ref


def _reference_forward(ref, x, recipe):
    """TE's forward on a quantized input with an identity gradient (written here, not the runtime's;
    called with fake-QAT off)."""
    if recipe.activations is not None:
        q = mxfp4.fake_quantize(x.detach(), 32, rule=recipe.activations, impl="reference")
        x = _Identity.apply(x, q)
    return StandInGroupedLinear.forward(ref, x, SPLITS, is_first_microbatch=True)  # as the patched layer's first call


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q):  # type: ignore[override]
        return q.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def test_recipe_variable_follows_the_one_rule():
    assert config.from_env({}).recipe == DEFAULT_RECIPE == "flashinfer-w4a16"
    assert config.from_env({config.RECIPE: " flashinfer-trtllm-w4a8 "}).recipe == "flashinfer-trtllm-w4a8"
    with pytest.raises(ValueError, match=r"^MEGATRON_QAT_RECIPE='w4a8': accepted values are \"flashinfer-w4a16\""):
        config.from_env({config.RECIPE: "w4a8"})


def test_unknown_recipe_argument_is_refused(te_ext):
    with pytest.raises(ValueError, match=r"recipe='mxfp8': accepted values are"):
        mm.enable(32, recipe="mxfp8")
    assert not mm.is_enabled()


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("fuse", [False, True], ids=["grad", "fused-main-grad"])
def test_forward_and_gradients_equal_the_reference(te_ext, name, fuse):
    recipe = RECIPES[name]
    layer = te_ext.TEGroupedLinear(N, K, OUT, fuse_wgrad_accumulation=fuse, seed=4)
    ref = _reference(layer, recipe)
    hooks = [DDPLikeHooks(list(m.parameters())) if fuse else None for m in (layer, ref)]
    x, dy = _x(1), torch.randn(sum(SPLITS), OUT, generator=torch.Generator().manual_seed(2))
    mm.enable(32, recipe=name)
    xl = x.clone().requires_grad_(True)
    got = layer(xl, SPLITS)
    got.backward(dy)
    mm.disable()
    xr = x.clone().requires_grad_(True)
    want = _reference_forward(ref, xr, recipe)
    want.backward(dy)
    assert torch.equal(bits(got), bits(want))
    assert torch.equal(bits(xl.grad), bits(xr.grad))
    for p, q in zip(layer.parameters(), ref.parameters()):
        g, w = (p.main_grad, q.main_grad) if fuse else (p.grad, q.grad)
        assert torch.equal(bits(g), bits(w))
    if fuse:
        assert all(n == 0 for n in hooks[0].adds.values())  # TE's dummy was never added


@pytest.mark.parametrize("name", ACTIVATION_RECIPES)
def test_activations_are_quantized_on_every_call_never_cached(te_ext, name, monkeypatch):
    calls = []
    real = mxfp4.ActivationFakeQuantizer.__call__
    monkeypatch.setattr(mxfp4.ActivationFakeQuantizer, "__call__", lambda self, x: calls.append(x) or real(self, x))
    layer = te_ext.TEGroupedLinear(N, K, OUT)
    mm.enable(32, recipe=name)
    outs = [layer(_x(seed), SPLITS) for seed in (1, 2, 1)]
    assert len(calls) == 3 and mm.current().stats().hits >= 1  # the weights are cached, the activations not
    assert torch.equal(bits(outs[0]), bits(outs[2])) and not torch.equal(bits(outs[0]), bits(outs[1]))


def test_default_recipe_leaves_the_input_alone(te_ext, monkeypatch):
    monkeypatch.setattr(mxfp4.ActivationFakeQuantizer, "__call__", lambda *a, **k: pytest.fail("quantized an activation"))
    layer = te_ext.TEGroupedLinear(N, K, OUT)
    mm.enable(32)
    assert mm.current().recipe.name == DEFAULT_RECIPE
    layer(_x(), SPLITS)


def test_activation_input_of_the_wrong_width_is_refused_naming_it(te_ext):
    layer = te_ext.TEGroupedLinear(N, 48, OUT)
    mm.enable(16, recipe="flashinfer-trtllm-w4a8")
    layer(_x(k=48), SPLITS)  # 48 % 16 == 0
    mm.enable(32, recipe="flashinfer-trtllm-w4a8")
    with pytest.raises(ValueError, match="48"):
        layer(_x(k=48), SPLITS)


def test_recipe_named_in_the_activation_line_and_reconfigured_while_on(te_ext, caplog):
    with caplog.at_level(logging.INFO, logger="megatron_qat"):
        mm.enable(32, recipe="vllm-online-w4a4")
        mm.enable(32, recipe="vllm-online-w4a4")  # no change: no new line
        mm.enable(32, recipe="modelopt-w4a16")
    lines = [r.getMessage() for r in caplog.records if "MXFP4 fake-QAT active" in r.getMessage()]
    assert len(lines) == 2 and "recipe=vllm-online-w4a4" in lines[0] and "recipe=modelopt-w4a16" in lines[1]
    assert mm.current().recipe is RECIPES["modelopt-w4a16"]


# --- routing probabilities after fc2 under an activation recipe (issue 15, review of the mismatch run) --


class _StandInExperts(torch.nn.Module):
    """megatron-core 0.13-0.19 ``TEGroupedMLP.forward``'s probability placement (``bias_act_func``:
    SwiGLU(fc1 output) * probs, cast back, then fc2), over the stand-in grouped linears; registered as
    ``megatron.core.transformer.moe.experts.TEGroupedMLP`` for the test (TE cannot be installed here)."""

    def __init__(self, fc1, fc2, config):
        super().__init__()
        self.linear_fc1, self.linear_fc2, self.config = fc1, fc2, config

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        splits = tokens_per_expert.tolist()
        gate, up = self.linear_fc1(permuted_local_hidden_states, splits).chunk(2, dim=-1)
        act = torch.nn.functional.silu(gate) * up
        act = (act * permuted_probs.unsqueeze(-1)).to(act.dtype)
        return self.linear_fc2(act, splits), None


def _experts(fc_cls, seed, probs_on_input=False):
    from types import SimpleNamespace

    fc1 = fc_cls(N, K, 2 * K, seed=seed)
    fc2 = fc_cls(N, K, OUT, seed=seed + 1)
    return _StandInExperts(fc1, fc2, SimpleNamespace(moe_apply_probs_on_input=probs_on_input))


@pytest.mark.parametrize("name", ACTIVATION_RECIPES)
def test_activation_recipe_applies_routing_probabilities_after_fc2(te_ext, name, monkeypatch):
    """What the engines compute: fc2 sees Q(SwiGLU(fc1)) WITHOUT the routing probability, and the
    expert output is scaled by it after fc2. The reference is a flag-off copy with fake-quantized
    weights, reference activation QDQ before each GEMM and the probabilities applied after fc2 by
    hand; it differs from quantizing the probability-scaled fc2 input (megatron's own placement)."""
    import megatron.core.transformer.moe.experts as experts_module

    recipe = RECIPES[name]
    monkeypatch.setattr(experts_module, "TEGroupedMLP", _StandInExperts)
    layer = _experts(te_ext.TEGroupedLinear, seed=3)
    ref = _experts(StandInGroupedLinear, seed=3)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(mxfp4.fake_quantize(p, 32, rule=recipe.weights, impl="reference"))

    def quantize_input(module, args):
        q = mxfp4.fake_quantize(args[0].detach(), 32, rule=recipe.activations, impl="reference")
        return (_Identity.apply(args[0], q), *args[1:])

    for module in (ref.linear_fc1, ref.linear_fc2):
        module.forward = lambda x, splits, m=module: StandInGroupedLinear.forward(m, x, splits, is_first_microbatch=None)
        module.register_forward_pre_hook(quantize_input)
    x = _x(seed=4)
    tokens = torch.tensor(SPLITS)
    probs = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(5)) + 0.05
    mm.enable(32, recipe=name)
    got, _ = layer(x, tokens, probs)
    mm.disable()
    unscaled, _ = ref(x, tokens, torch.ones_like(probs))
    want = (unscaled * probs.unsqueeze(-1)).to(unscaled.dtype)
    megatron_placement, _ = ref(x, tokens, probs)
    assert torch.equal(bits(got), bits(want)), f"{name}: the routing probabilities are not applied after fc2"
    assert not torch.equal(bits(want), bits(megatron_placement)), "the test cannot tell the two placements apart"


def test_bf16_activation_recipes_keep_megatrons_probability_placement(te_ext, monkeypatch):
    """Without activation quantization the experts' forward is megatron's own, bit for bit."""
    import megatron.core.transformer.moe.experts as experts_module

    monkeypatch.setattr(experts_module, "TEGroupedMLP", _StandInExperts)
    x, tokens = _x(seed=4), torch.tensor(SPLITS)
    probs = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(5)) + 0.05
    layer = _experts(te_ext.TEGroupedLinear, seed=3)
    mm.enable(32, recipe="vllm-online-w4a16")
    installed = _StandInExperts.__dict__["forward"]
    got, _ = layer(x, tokens, probs)
    want, _ = installed.__wrapped__(layer, x, tokens, probs)  # megatron's own forward, same runtime
    assert torch.equal(bits(got), bits(want))
