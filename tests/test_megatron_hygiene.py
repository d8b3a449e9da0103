"""Patch hygiene (issue 8, item 3), against the real megatron-core extension module carrying the TE
stand-in (tests/te_standin.py; Transformer Engine cannot be installed on the CPU CI).

- ours is found by identity: a foreign wrapper made with ``functools.wraps`` over ours (which copies
  our function's ``__dict__``, so any marker of ours) is never taken for ours, never deleted, never
  replaced;
- a subclass of ``TEGroupedLinear`` that overrides ``_get_weight_tensors`` is refused at model build
  and at its first forward, even when defined after ``enable()``;
- the wrapper passes through every argument TE adds to ``_get_weight_tensors``.
"""

from __future__ import annotations

import functools
import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _helpers import bits  # noqa: E402
from _megatron_fixtures import te_ext  # noqa: E402,F401
from te_standin import StandInGroupedLinear  # noqa: E402

import megatron_qat.megatron as mm  # noqa: E402
from megatron_qat import mxfp4  # noqa: E402
from megatron_qat.megatron import runtime as guards  # noqa: E402  (the guards live in the runtime module)
from megatron_qat.megatron.runtime import HOOK  # noqa: E402

NAME = "_get_weight_tensors"


def _assert_fake_quantized_once(layer):
    got = layer._get_weight_tensors()
    want = mxfp4.fake_quantize_many([layer.weight0.detach(), layer.weight1.detach()], 32)
    assert all(torch.equal(a, b) for a, b in zip(map(bits, got), map(bits, want)))


def _assert_plain(layer):
    got = layer._get_weight_tensors()
    assert got[0] is layer.weight0 and got[1] is layer.weight1


def _foreign_wrapper(inner, calls):
    @functools.wraps(inner)  # copies inner.__dict__ (any marker of ours) and sets __wrapped__
    def foreign(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return inner(self, *args, **kwargs)

    return foreign


def test_disable_never_deletes_a_foreign_wrapper_on_top(te_ext, caplog):
    """Old code: disable() deleted the foreign wrapper (it restored the class as it was before us)."""
    cls = te_ext.TEGroupedLinear
    layer = cls(2, 64, 8)
    mm.enable(32)
    calls = []
    foreign = _foreign_wrapper(cls.__dict__[NAME], calls)
    cls._get_weight_tensors = foreign
    _assert_fake_quantized_once(layer)
    mm.disable()
    assert cls.__dict__[NAME] is foreign  # left in place
    assert not mm.is_enabled()
    _assert_plain(layer)  # ours under it is now a pass-through
    assert calls == ["TEGroupedLinear", "TEGroupedLinear"]
    assert any("left in place" in r.getMessage() for r in caplog.records)
    mm.enable(32)  # wraps what is on top now
    assert cls.__dict__[NAME] is mm.current().patched(HOOK) and cls.__dict__[NAME].__wrapped__ is foreign
    _assert_fake_quantized_once(layer)
    mm.disable()
    assert cls.__dict__[NAME] is foreign  # exactly what was there


def test_enable_is_not_fooled_by_a_wrapper_that_copied_our_attributes(te_ext):
    """Old code: the foreign wrapper carried our sentinel (functools.wraps), so enable() returned early
    thinking it was already patched, and is_enabled() stayed False."""
    cls = te_ext.TEGroupedLinear
    layer = cls(2, 64, 8)
    mm.enable(32)
    ours = cls._get_weight_tensors
    mm.disable()
    calls = []
    cls._get_weight_tensors = _foreign_wrapper(ours, calls)  # made from a captured copy of ours
    foreign = cls.__dict__[NAME]
    mm.enable(32)
    assert mm.is_enabled()
    assert cls.__dict__[NAME] is not foreign and cls.__dict__[NAME].__wrapped__ is foreign
    _assert_fake_quantized_once(layer)  # once: the captured old wrapper is a pass-through
    mm.disable()
    assert cls.__dict__[NAME] is foreign


def test_moe_layer_init_revert_is_identity_based_too(te_ext):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    before = MoELayer.__dict__["__init__"]
    mm.enable(32)
    ours = MoELayer.__dict__["__init__"]
    foreign = functools.wraps(ours)(lambda self, *a, **k: ours(self, *a, **k))
    MoELayer.__init__ = foreign
    try:
        mm.disable()
        assert MoELayer.__dict__["__init__"] is foreign
    finally:
        MoELayer.__init__ = before


class _Experts(torch.nn.Module):
    def __init__(self, *children):
        super().__init__()
        for i, c in enumerate(children):
            self.add_module(f"linear_fc{i + 1}", c)


def test_subclass_defined_after_enable_is_refused_at_model_build(te_ext):
    """Old code: the override check ran only inside enable(), so a later subclass was not noticed."""
    mm.enable(32)

    class LateFork(te_ext.TEGroupedLinear):
        def _get_weight_tensors(self):
            return [self.weight0, self.weight1]  # never reaches the wrapper

    layer = SimpleNamespace(experts=_Experts(LateFork(2, 64, 64)), layer_number=1, config=SimpleNamespace())
    with pytest.raises(RuntimeError, match="LateFork overrides _get_weight_tensors"):
        guards.check_built_moe_layer(layer, te_ext.TEGroupedLinear, 32)


def test_subclass_override_calling_super_is_refused_at_first_forward(te_ext):
    mm.enable(32)

    class LateFork(te_ext.TEGroupedLinear):
        def _get_weight_tensors(self):
            return [w * 1 for w in super()._get_weight_tensors()]

    class GrandChild(LateFork):  # inherits the override
        pass

    with pytest.raises(RuntimeError, match="LateFork overrides _get_weight_tensors"):
        GrandChild(2, 64, 8)(torch.randn(3, 64), [1, 2])
    te_ext.TEGroupedLinear(2, 64, 8)(torch.randn(3, 64), [1, 2])  # the class itself is fine


def test_wrapper_passes_through_arguments_te_adds(te_ext):
    """Old code: the wrapper took only ``self`` (TypeError for any new TE argument)."""
    cls = te_ext.TEGroupedLinear
    seen = []

    def te_hook(self, *args, **kwargs):  # a TE version whose hook takes extra arguments
        seen.append((args, kwargs))
        return StandInGroupedLinear._get_weight_tensors(self)

    cls._get_weight_tensors = te_hook
    layer = cls(2, 64, 8)
    mm.enable(32)
    out = layer._get_weight_tensors(True, skip_quantize=False)
    assert seen == [((True,), {"skip_quantize": False})]
    want = mxfp4.fake_quantize_many([layer.weight0.detach(), layer.weight1.detach()], 32)
    assert all(torch.equal(a, b) for a, b in zip(map(bits, out), map(bits, want)))
