"""Hand fake-quantized expert weights to Transformer Engine with a straight-through gradient to
the BF16 master Parameters, carrying Megatron's fused-wgrad attributes.

Upstream protocol mimicked (Transformer Engine 2.20.2 ``_GroupedLinear.backward`` /
``handle_custom_ddp_from_mcore``, megatron-core 0.19.2 ``DistributedDataParallel``
``_make_backward_post_hook``; /work/shared/notes/te-megatron-internals.md §3-§5):

- with ``fuse_wgrad_accumulation`` TE writes each expert's wgrad into ``q.main_grad`` of the tensor
  ``q`` it received; if ``q`` has a ``grad_added_to_main_grad`` attribute TE sets it True on ``q`` and
  returns a cached dummy (zeros when ``q.zero_out_wgrad``), else it returns None;
- Megatron's hook on the Parameter's AccumulateGrad adds ``param.grad`` into ``main_grad`` unless the
  Parameter's own ``grad_added_to_main_grad`` is True (or ``zero_out_wgrad``).

So each ``q`` carries every Python attribute of its Parameter (``grad_protocol.carry_attributes``:
the Parameter's ``__dict__`` by reference, ``main_grad`` included -- one rule for the cached and the
uncached path), read when the node is built; the flag owners are decided at that time too (fusion on, Parameter requires grad and has the flag), and
the backward sets the owner's flag True for every gradient that arrives and returns that gradient
unchanged (TE's dummy: no extra tensor, no extra add; a None stays None).

:func:`connect_fake_weights` builds ONE node for N weights. Its outputs are aliases
(``Tensor.detach``: same storage, no copy) of the fake-quantized tensors it is given. The node saves
no tensor, so it may be reached by several backward passes: the weight cache
(:mod:`megatron_qat.megatron.weight_cache`) builds one node per module per cached weight version
and hands the same outputs to every micro-batch; each micro-batch's TE node has its own edge to it,
and each backward that reaches it delivers that micro-batch's gradient to the Parameters once.
"""

from __future__ import annotations

import torch

from .grad_protocol import carry_attributes

FLAG = "grad_added_to_main_grad"


class FakeWeightsSTE(torch.autograd.Function):
    """Forward: aliases of the given fake-quantized tensors (they are not inputs: their values come
    from outside the graph). Backward: identity to each master weight; sets the flag on its owner."""

    @staticmethod
    def forward(ctx, fakes: list, flag_owners: tuple, *weights: torch.Tensor):  # type: ignore[override]
        ctx.flag_owners = flag_owners
        ctx.set_materialize_grads(False)  # TE's None stays None: no zero tensor is allocated for it
        return tuple(f.detach() for f in fakes)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        for owner, grad in zip(ctx.flag_owners, grads):
            if owner is not None and grad is not None:
                owner.grad_added_to_main_grad = True
        return (None, None, *grads)


def connect_fake_weights(fakes: list, weights: list, fuse_wgrad_accumulation: bool) -> list:
    """N tensors holding ``fakes``' values (``fakes[i]`` has ``weights[i]``'s shape, dtype, device)
    whose gradient flows straight through to ``weights`` (the master Parameters), each carrying the
    fused-wgrad attributes of its master. Call it with autograd recording and a weight requiring
    grad; under ``torch.no_grad()`` hand TE the fakes themselves."""
    owners = tuple(
        w if (fuse_wgrad_accumulation and w.requires_grad and hasattr(w, FLAG)) else None for w in weights
    )
    outs = FakeWeightsSTE.apply(fakes, owners, *weights)
    for w, q in zip(weights, outs):
        carry_attributes(w, q)
    return list(outs)
