"""One straight-through autograd Function over all N expert weights of a grouped linear layer,
carrying Megatron's fused-wgrad attributes so every gradient lands exactly once.

Upstream protocol mimicked (Transformer Engine 2.20.2 ``_GroupedLinear.backward`` /
``_finish_wgrad``, megatron-core 0.19.2 ``DistributedDataParallel._make_backward_post_hook``):

- With ``fuse_wgrad_accumulation`` TE writes each expert's wgrad into ``w.main_grad`` of the tensor
  ``w`` it received. If ``w`` has a ``grad_added_to_main_grad`` attribute, TE sets it True on ``w``
  and returns a cached dummy gradient (zeros when ``w.zero_out_wgrad``); otherwise it returns None.
- Megatron's hook on the Parameter's AccumulateGrad adds ``param.grad`` into ``main_grad`` unless
  the Parameter's own ``grad_added_to_main_grad`` is True (or ``zero_out_wgrad``), then drops it.

Here TE receives ``q = fake_quantize(param)``, not the Parameter. So each ``q`` carries the
Parameter's ``main_grad`` (same object) and, where the Parameter has them,
``grad_added_to_main_grad``, ``zero_out_wgrad`` and ``overwrite_main_grad``. Whether the flag must
be carried back is decided at forward time (fusion on for the module, Parameter has the flag,
Parameter requires grad); in backward the Parameter's flag is set True for every weight whose
gradient arrives, and the incoming gradient -- TE's dummy -- is returned unchanged, so the
Parameter sees exactly what TE's unwrapped path would have handed it (no extra tensor, no extra
add). A None gradient (TE's answer when the flag attribute is absent) stays None.
Without fusion the incoming gradient is the real wgrad and is returned as is (identity STE).

Beyond the fused-wgrad protocol, each fake tensor carries EVERY Python attribute of its source
tensor (:func:`carry_attributes`, the Parameter's ``__dict__``, by reference), so that whatever
Megatron or TE reads off the tensor TE received sees what was set on the Parameter. On expert
weights megatron-core 0.16.1 sets: ``offloading_activation`` (fine-grained activation offloading,
``PipelineOffloadManager.mark_not_offloadable``: without it the whole fake copy would be shipped to
host and back every micro-batch), ``main_grad`` / ``grad_added_to_main_grad`` / ``zero_out_wgrad``
/ ``overwrite_main_grad`` (fused wgrad), ``allreduce``, ``sequence_parallel``,
``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride``, ``shared``, ``expert_tp``,
``_mcore_tp`` / ``_tp_partition_dim`` / ``_tp_duplicated``. The attributes whose meaning cannot be
carried over to a copy (Megatron-FSDP ``__fsdp_param__``, TE GTP ``is_distributed_weight``, quantized
primary weights) are refused by :mod:`.guards` before anything is quantized.
"""

from __future__ import annotations

import torch


class ExpertWeightsSTE(torch.autograd.Function):
    """Forward: ``fake_quantize_many(weights, block_size)`` (one launch with the Triton kernel).
    Backward: identity per weight; sets ``grad_added_to_main_grad`` on the flag owners."""

    @staticmethod
    def forward(ctx, block_size: int, flag_owners: tuple, *weights: torch.Tensor):  # type: ignore[override]
        from ..mxfp4 import fake_quantize_many

        ctx.flag_owners = flag_owners
        ctx.set_materialize_grads(False)  # TE's None stays None: no zero tensor is allocated for it
        return tuple(fake_quantize_many(list(weights), block_size))

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        for owner, grad in zip(ctx.flag_owners, grads):
            if owner is not None and grad is not None:
                owner.grad_added_to_main_grad = True
        return (None, None, *grads)


def fake_quantize_with_grad_protocol(weights: list, block_size: int, fuse_wgrad_accumulation: bool) -> list:
    """Fake-quantize ``weights`` (each ``[out_features, in_features]``, one dtype and device) for TE.

    Returns N new tensors carrying their source tensors' attributes (:func:`carry_attributes`).
    With autograd recording and a weight requiring grad they come from ONE :class:`ExpertWeightsSTE`
    node; otherwise (``torch.no_grad()``, e.g. log-prob recomputation) no graph is built.
    """
    from ..mxfp4 import fake_quantize_many

    if not (torch.is_grad_enabled() and any(w.requires_grad for w in weights)):
        fakes = fake_quantize_many(list(weights), block_size)
    else:
        owners = tuple(
            w if (fuse_wgrad_accumulation and w.requires_grad and hasattr(w, "grad_added_to_main_grad")) else None
            for w in weights
        )
        fakes = list(ExpertWeightsSTE.apply(block_size, owners, *weights))
    for w, q in zip(weights, fakes):
        carry_attributes(w, q)
    return fakes


def carry_attributes(source: torch.Tensor, fake: torch.Tensor) -> None:
    """Give ``fake`` every Python attribute of ``source`` (same objects: ``main_grad`` stays the
    Parameter's buffer view). Values are those at forward time."""
    attributes = getattr(source, "__dict__", None)
    if attributes:
        fake.__dict__.update(attributes)
