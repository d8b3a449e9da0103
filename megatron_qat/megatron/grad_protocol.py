"""What the fake-quantized tensors TE receives carry from their master Parameters.

Upstream protocol mimicked (Transformer Engine 2.20.2 ``_GroupedLinear.backward`` /
``_finish_wgrad``, megatron-core 0.19.2 ``DistributedDataParallel._make_backward_post_hook``):

- With ``fuse_wgrad_accumulation`` TE writes each expert's wgrad into ``w.main_grad`` of the tensor
  ``w`` it received. If ``w`` has a ``grad_added_to_main_grad`` attribute, TE sets it True on ``w``
  and returns a cached dummy gradient (zeros when ``w.zero_out_wgrad``); otherwise it returns None.
- Megatron's hook on the Parameter's AccumulateGrad adds ``param.grad`` into ``main_grad`` unless
  the Parameter's own ``grad_added_to_main_grad`` is True (or ``zero_out_wgrad``), then drops it.

Here TE receives ``q = fake_quantize(param)``, not the Parameter. So each ``q`` carries EVERY Python
attribute of its Parameter (:func:`carry_attributes`: the Parameter's ``__dict__``, by reference --
``main_grad`` is the same buffer view), and the straight-through node
(:mod:`megatron_qat.megatron.fake_weights`) sets the Parameter's own ``grad_added_to_main_grad`` in
backward for every gradient that arrives, returning TE's dummy unchanged (no extra tensor, no
extra add; a None stays None). Without fusion the incoming gradient is the real wgrad and is
returned as is (identity STE).

On expert weights megatron-core 0.16.1 sets: ``offloading_activation`` (fine-grained activation
offloading, ``PipelineOffloadManager.mark_not_offloadable``: without it the whole fake copy would
be shipped to host and back every micro-batch), ``main_grad`` / ``grad_added_to_main_grad`` /
``zero_out_wgrad`` / ``overwrite_main_grad`` (fused wgrad), ``allreduce``, ``sequence_parallel``,
``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride``, ``shared``, ``expert_tp``,
``_mcore_tp`` / ``_tp_partition_dim`` / ``_tp_duplicated``. The attributes whose meaning cannot be
carried over to a copy (Megatron-FSDP ``__fsdp_param__``, TE GTP ``is_distributed_weight``,
quantized primary weights) are refused by :mod:`.guards` before anything is quantized.
"""

from __future__ import annotations

import torch


def carry_attributes(source: torch.Tensor, fake: torch.Tensor) -> None:
    """Give ``fake`` every Python attribute of ``source`` (same objects: ``main_grad`` stays the
    Parameter's buffer view). Values are those at the time of the call."""
    attributes = getattr(source, "__dict__", None)
    if attributes:
        fake.__dict__.update(attributes)
