"""The replacement for ``TEGroupedLinear._get_weight_tensors``.

The wrapper calls whatever attribute resolution gave on ``TEGroupedLinear`` when the patch was
applied (TE's ``GroupedLinear._get_weight_tensors``, or a fork's own override), then hands its
result -- N weights ``[out_features, in_features]`` -- through the guards and ONE straight-through
fake-quantize node (:mod:`megatron_qat.megatron.grad_protocol`). Under ``torch.no_grad()`` (log-prob
recomputation) the weights are still fake-quantized, without a graph.
"""

from __future__ import annotations

import functools

SENTINEL = "__megatron_qat_patch__"


def fake_quantize_expert_weights(module, weights, block_size: int) -> list:
    """What the patched hook returns for ``module`` given the original hook's ``weights``."""
    from .grad_protocol import fake_quantize_with_grad_protocol
    from .guards import check_grouped_linear_forward

    weights = list(weights)
    check_grouped_linear_forward(module, weights, block_size)
    fuse = bool(getattr(module, "fuse_wgrad_accumulation", False))
    return fake_quantize_with_grad_protocol(weights, block_size, fuse)


def make_get_weight_tensors(original, block_size_of):
    """Wrap ``original`` (an unbound ``_get_weight_tensors``); ``block_size_of()`` gives the block size
    in force. The wrapper keeps ``original`` as ``__wrapped__`` and carries :data:`SENTINEL`."""

    @functools.wraps(original)
    def _get_weight_tensors(self):
        return fake_quantize_expert_weights(self, original(self), block_size_of())

    _get_weight_tensors.__wrapped__ = original
    setattr(_get_weight_tensors, SENTINEL, True)
    return _get_weight_tensors


def make_moe_layer_init(original, grouped_linear_cls_of, block_size_of):
    """Wrap ``MoELayer.__init__``: config guards before construction, structure guards after."""

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        from .guards import check_built_moe_layer, check_moe_config

        config = kwargs.get("config", args[0] if args else None)
        check_moe_config(config)
        original(self, *args, **kwargs)
        check_built_moe_layer(self, grouped_linear_cls_of(), block_size_of())

    __init__.__wrapped__ = original
    setattr(__init__, SENTINEL, True)
    return __init__
