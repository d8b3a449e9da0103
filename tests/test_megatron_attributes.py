"""The fake-quantized weights carry what Megatron set on the expert Parameters (issue 8, item 4).

Uses megatron-core's REAL marking and checking code: ``PipelineOffloadManager.mark_not_offloadable``
(0.16; ``offloading_activation = False``) / ``mark_not_offload`` (0.19; ``_do_not_offload = True``),
what ``GPTModel.preprocess_for_fine_grained_offloading`` calls on every decoder Parameter, and
``ChunkOffloadHandler.tensor_need_offloading_checker`` (what decides, per tensor saved for backward,
whether it is shipped to host; 0.19's refuses any CPU tensor, so there the attributes the marking
set are compared instead), plus
``tensor_parallel.set_tensor_model_parallel_attributes`` and the ``allreduce`` flag
``TEGroupedLinear.__init__`` sets. Both manager methods are called unbound: their constructors
allocate CUDA streams, and neither method reads anything from ``self`` but
``min_offloaded_tensor_size``. The TE module is the stand-in (tests/te_standin.py): Transformer
Engine cannot be installed on the CPU CI.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _helpers import require  # noqa: E402
from _megatron_fixtures import te_ext  # noqa: E402,F401
from te_standin import DDPLikeHooks  # noqa: E402

import megatron_qat.megatron as mm  # noqa: E402

offload = require(
    "megatron.core.pipeline_parallel.fine_grained_activation_offload",
    "megatron-core >= 0.16 (fine-grained activation offloading) is a test dependency",
)


def _needs_offloading(tensor) -> bool:
    handler = offload.ChunkOffloadHandler
    self = SimpleNamespace(min_offloaded_tensor_size=0)
    if hasattr(handler, "_can_manage_tensor_for_offload"):  # megatron-core 0.19: a staticmethod it calls
        self._can_manage_tensor_for_offload = handler._can_manage_tensor_for_offload
    return handler.tensor_need_offloading_checker(self, tensor)


def _mark_not_offload(p) -> dict:
    """megatron-core's marking of ``p`` (the method was renamed in 0.19); returns what it set on ``p``."""
    manager = offload.PipelineOffloadManager
    mark = getattr(manager, "mark_not_offload", None) or manager.mark_not_offloadable
    before = dict(p.__dict__)
    mark(None, p)
    return {k: v for k, v in p.__dict__.items() if k not in before or before[k] is not v}


def test_offloading_marking_survives_on_the_tensors_te_saves_for_backward(te_ext):
    """Old code: the fake tensors lacked ``offloading_activation``, so the full fake copy of the
    experts was offloaded to host (and reloaded) every micro-batch."""
    layer = te_ext.TEGroupedLinear(2, 64, 8)
    params = [layer.weight0, layer.weight1]
    marks = [_mark_not_offload(p) for p in params]
    assert all(marks), "megatron-core's marking set no attribute"
    assert not any(_needs_offloading(p) for p in params)
    mm.enable(32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(5, 64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, [2, 3]).sum().backward()
    weights = [t for t in saved if t.shape == (8, 64)]
    assert len(weights) == 2 and all(w is not p for w, p in zip(weights, params))  # the fake tensors
    for w, mark in zip(weights, marks):
        assert {k: getattr(w, k, "missing") for k in mark} == mark
    assert [_needs_offloading(w) for w in weights] == [False, False]
    if _needs_offloading(torch.randn(4096)):  # a checker that judges CPU tensors (0.16): the control
        assert _needs_offloading(x)  # an unmarked activation is offloaded


@pytest.mark.parametrize("grad_mode", [True, False])
def test_every_parameter_attribute_is_carried_by_reference(te_ext, grad_mode):
    """Old code: only main_grad and the three fused-wgrad flags were carried."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    layer = te_ext.TEGroupedLinear(2, 64, 8, fuse_wgrad_accumulation=True)
    params = [layer.weight0, layer.weight1]
    DDPLikeHooks(params)  # main_grad, grad_added_to_main_grad
    for p in params:
        set_tensor_model_parallel_attributes(p, True, 0, 1)  # tensor_model_parallel, partition_dim/_stride
        p.allreduce = False  # what TEGroupedLinear sets under expert parallelism
        p.sequence_parallel = False
        p.offloading_activation = False
        p.shared = False
        p.expert_tp = True
    params[0].overwrite_main_grad = False
    params[0].zero_out_wgrad = False
    mm.enable(32)
    with torch.set_grad_enabled(grad_mode):
        fakes = layer._get_weight_tensors()
    for p, q in zip(params, fakes):
        assert q is not p and set(p.__dict__) <= set(q.__dict__)
        for name, value in p.__dict__.items():
            assert getattr(q, name) is value, name
    assert "overwrite_main_grad" not in fakes[1].__dict__
