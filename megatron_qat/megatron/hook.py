"""The two replacement functions the patch installs.

- ``TEGroupedLinear._get_weight_tensors``: calls whatever attribute resolution gave on
  ``TEGroupedLinear`` when the patch was applied (TE's ``GroupedLinear._get_weight_tensors``, a
  fork's own override, or a foreign wrapper), with every positional and keyword argument TE passes,
  then hands its result -- N weights ``[out_features, in_features]`` -- to the metrics (logging
  steps only) and to the per-step weight cache (:mod:`.weight_cache`: guards and ONE grouped
  fake-quantize launch on a miss, a straight-through node to the master weights,
  :mod:`.fake_weights`). Under ``torch.no_grad()`` (log-prob recomputation) the weights are still
  fake-quantized, without a graph.
- ``MoELayer.__init__``: refuses to build while a fake-QAT failure is recorded
  (:mod:`.failclosed`), runs the config guards before and the structure guards after
  construction, and counts the patched modules for the "model built" log line (:mod:`.announce`).

Each installed function has a :class:`Switch`. ``disable()`` normally removes the function; when a
foreign wrapper sits on top of it (so removing it would delete that wrapper), it turns the switch
off instead and the function becomes a pass-through to ``original``.
"""

from __future__ import annotations

import functools
import weakref


class Switch:
    """On/off state of one installed wrapper (``active`` False: pure pass-through)."""

    __slots__ = ("active",)

    def __init__(self):
        self.active = True


def make_get_weight_tensors(original, switch: Switch, block_size_of, grouped_linear_cls_of):
    """Wrap ``original`` (an unbound ``_get_weight_tensors``); ``block_size_of()`` gives the block size
    in force. ``__wrapped__`` is ``original``.

    Per call, after the original hook: the subclass-override check (once per class); on a logging
    step the master weights are measured (:mod:`megatron_qat.metrics`; on other steps that is one
    integer check); then :func:`.weight_cache.fake_weights` -- the module's cached fake-quantized
    copy of this optimizer step when it is still valid (no guard, no kernel), else the guards
    (:func:`.guards.check_grouped_linear_forward`) and ONE grouped fake-quantize launch through the
    module's own :class:`megatron_qat.mxfp4.GroupedFakeQuantizer`, connected straight-through to
    the master weights with their attributes carried.

    The imports happen here, at :func:`enable` time, so that importing this module stays
    torch-free (the autoload imports it at interpreter start)."""
    from .. import metrics
    from . import announce, weight_cache
    from .guards import check_grouped_linear_forward, check_no_hook_override

    checked_types = weakref.WeakSet()  # classes of self already checked for an override
    due, observe, fake_weights = metrics.due, metrics.observe, weight_cache.fake_weights

    @functools.wraps(original)
    def _get_weight_tensors(self, *args, **kwargs):
        weights = original(self, *args, **kwargs)
        if not switch.active:
            return weights
        klass = type(self)
        if klass not in checked_types:
            check_no_hook_override(klass, grouped_linear_cls_of())
            checked_types.add(klass)
        block_size = block_size_of()
        weights = list(weights)
        if due():
            observe(self, weights, block_size)
        fakes = fake_weights(self, weights, block_size, check=check_grouped_linear_forward)
        if announce.pending():
            announce.first_forward(fakes, block_size)
        return fakes

    _get_weight_tensors.__wrapped__ = original
    return _get_weight_tensors


def make_moe_layer_init(original, switch: Switch, is_active, grouped_linear_cls_of, block_size_of):
    """Wrap ``MoELayer.__init__``: sticky-failure check, config guards before construction,
    structure guards after. ``is_active()`` says whether fake-QAT is on (the wrapper is also
    installed, as a pure failure guard, when it could not be turned on)."""
    from .. import metrics
    from . import announce, failclosed
    from .guards import check_built_moe_layer, check_moe_config

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if switch.active:
            failclosed.check(f"building {type(self).__name__}")
        if not (switch.active and is_active()):
            return original(self, *args, **kwargs)
        config = kwargs.get("config", args[0] if args else None)
        check_moe_config(config)
        original(self, *args, **kwargs)
        patched = check_built_moe_layer(self, grouped_linear_cls_of(), block_size_of())
        metrics.register_moe_layer(self)
        announce.moe_layer_built(patched)

    __init__.__wrapped__ = original
    return __init__
