"""enable / disable / idempotence / wrapping an existing override / version errors / forward
numerics, against the real megatron-core extension module carrying a TE stand-in."""

from __future__ import annotations

import sys

import pytest
import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from _megatron_fixtures import te_ext  # noqa: E402,F401
from te_standin import StandInGroupedLinear  # noqa: E402

import megatron_qat  # noqa: E402
import megatron_qat.megatron as mm  # noqa: E402
from megatron_qat import mxfp4  # noqa: E402
from megatron_qat.megatron import FakeQATUnavailableError  # noqa: E402
from megatron_qat.megatron.runtime import HOOK, MOE_INIT  # noqa: E402


def _moe_layer_cls():
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return MoELayer


def test_enable_wraps_and_disable_restores_exactly(te_ext):
    cls = te_ext.TEGroupedLinear
    moe = _moe_layer_cls()
    init_before = moe.__dict__["__init__"]
    inherited = cls._get_weight_tensors
    assert "_get_weight_tensors" not in cls.__dict__
    megatron_qat.enable()
    assert megatron_qat.is_enabled()
    wrapped = cls.__dict__["_get_weight_tensors"]
    assert wrapped is mm.current().patched(HOOK) and wrapped.__wrapped__ is inherited
    init = moe.__dict__["__init__"]
    assert init is mm.current().patched(MOE_INIT) and init.__wrapped__ is init_before
    megatron_qat.disable()
    assert not megatron_qat.is_enabled()
    assert "_get_weight_tensors" not in cls.__dict__  # ours deleted, not replaced by the inherited one
    assert cls._get_weight_tensors is inherited
    assert moe.__dict__["__init__"] is init_before


def test_enable_is_idempotent(te_ext):
    cls = te_ext.TEGroupedLinear
    mm.enable(32)
    first = cls.__dict__["_get_weight_tensors"]
    mm.enable(32)
    assert cls.__dict__["_get_weight_tensors"] is first
    assert first.__wrapped__ is StandInGroupedLinear._get_weight_tensors  # not wrapped twice
    mm.disable()
    assert "_get_weight_tensors" not in cls.__dict__


def test_wraps_a_preexisting_override_and_restores_it(te_ext):
    cls = te_ext.TEGroupedLinear
    calls = []

    def fork_override(self):
        calls.append(self)
        return [w * 2 for w in StandInGroupedLinear._get_weight_tensors(self)]

    cls._get_weight_tensors = fork_override
    mm.enable(32)
    layer = cls(2, 64, 8)
    out = layer._get_weight_tensors()
    assert calls == [layer]  # the fork's override ran first
    expected = mxfp4.fake_quantize_many([layer.weight0.detach() * 2, layer.weight1.detach() * 2], 32)
    for got, want in zip(out, expected):
        assert torch.equal(got.detach().view(torch.int32), want.view(torch.int32))
    mm.disable()
    assert cls.__dict__["_get_weight_tensors"] is fork_override


def test_subclass_override_is_refused(te_ext):
    class Sub(te_ext.TEGroupedLinear):
        def _get_weight_tensors(self):
            return []

    with pytest.raises(RuntimeError, match="Sub overrides _get_weight_tensors"):
        mm.enable(32)
    assert not mm.is_enabled()
    assert "_get_weight_tensors" not in te_ext.TEGroupedLinear.__dict__


def test_missing_transformer_engine_is_not_an_import_error_and_names_versions(te_ext, monkeypatch):
    """Was an ImportError, which Megatron's own ``except ImportError`` around its imports swallows."""
    monkeypatch.setattr(te_ext, "TEGroupedLinear", None)
    with pytest.raises(FakeQATUnavailableError, match=r"megatron-core 0\.\d+.*need >= 0\.13.*transformer-engine .*need >= 2\.5") as info:
        mm.enable()
    assert not isinstance(info.value, ImportError) and isinstance(info.value, RuntimeError)
    assert not mm.is_enabled()


def test_te_without_weight_hook_is_not_an_import_error(te_ext, monkeypatch):
    class OldTE(torch.nn.Module):  # TE < 2.5: no _get_weight_tensors
        pass

    monkeypatch.setattr(te_ext, "TEGroupedLinear", OldTE)
    with pytest.raises(FakeQATUnavailableError, match=r"no _get_weight_tensors \(added in Transformer Engine 2\.5\)") as info:
        mm.enable()
    assert not isinstance(info.value, ImportError)


def _reference_layer(layer, block_size):
    ref = StandInGroupedLinear(layer.num_gemms, layer.in_features, layer.out_features,
                               fuse_wgrad_accumulation=layer.fuse_wgrad_accumulation)
    ref.load_state_dict(layer.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(mxfp4.fake_quantize(p, block_size))
    return ref


@pytest.mark.parametrize("grad_mode", [True, False])
def test_forward_equals_layer_with_fake_quantized_weights(te_ext, grad_mode):
    layer = te_ext.TEGroupedLinear(3, 64, 16, seed=1)
    ref = _reference_layer(layer, 32)
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(2))
    splits = [3, 0, 7]
    mm.enable(32)
    with torch.set_grad_enabled(grad_mode):
        got = layer(x, splits)
        mm.disable()
        want = ref(x, splits)
        plain = layer(x, splits)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert not torch.equal(plain, got)  # the patch really changed something
    assert got.requires_grad == grad_mode


def test_one_quantizer_call_and_one_node_for_all_experts(te_ext, monkeypatch):
    """All N expert weights go through ONE call of the module's GroupedFakeQuantizer (one launch with
    the Triton kernel) and come out of ONE straight-through node."""
    import megatron_qat.mxfp4 as mx

    calls = []
    real = mx.GroupedFakeQuantizer.__call__
    monkeypatch.setattr(mx.GroupedFakeQuantizer, "__call__", lambda self, xs: calls.append(len(xs)) or real(self, xs))
    layer = te_ext.TEGroupedLinear(4, 32, 8)
    mm.enable(32)
    qs = layer._get_weight_tensors()
    assert calls == [4]
    assert len({id(q.grad_fn) for q in qs}) == 1 and type(qs[0].grad_fn).__name__ == "FakeWeightsSTEBackward"


def test_enable_from_env(te_ext):
    assert mm.enable_from_env({}) is False and not mm.is_enabled()
    assert mm.enable_from_env({"OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG": "0"}) is False
    with pytest.raises(RuntimeError, match="mutually exclusive"):
        mm.enable_from_env({"OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG": "1", "OPEN_TRAINING_INT4_FAKE_QAT_FLAG": "1"})
    assert not mm.is_enabled()
    assert megatron_qat.enable_from_env({"OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG": "1", "OPEN_TRAINING_MXFP4_BLOCK_SIZE": "16"})
    assert mm.current().block_size == 16


def test_bad_block_size_is_refused(te_ext):
    with pytest.raises(ValueError, match="block_size must be a positive even integer"):
        mm.enable(33)
    assert not mm.is_enabled()


def test_bad_kernel_variable_is_refused_before_patching(te_ext, monkeypatch):
    monkeypatch.setenv("MEGATRON_QAT_KERNEL", "cuda")
    with pytest.raises(ValueError, match="MEGATRON_QAT_KERNEL='cuda': accepted values are"):
        mm.enable(32)
    assert not mm.is_enabled() and "_get_weight_tensors" not in te_ext.TEGroupedLinear.__dict__
