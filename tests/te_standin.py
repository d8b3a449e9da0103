"""CPU stand-in for Transformer Engine's ``GroupedLinear`` and Megatron DDP's grad hook.

Stands in for: ``transformer_engine.pytorch.GroupedLinear`` as subclassed by megatron-core's
``TEGroupedLinear`` -- only the parts the fake-QAT patch touches -- and for the backward post-hook
that megatron-core ``DistributedDataParallel`` puts on each Parameter's AccumulateGrad node.

Protocol reproduced (Transformer Engine 2.20.2, BF16 path, discrete weights ``weight0..N-1``):

- ``forward`` gets its weights from ``self._get_weight_tensors()`` (TE >= 2.5), which returns
  ``[self.weight]`` for a single grouped weight, else ``[weight0, ..., weightN-1]`` (``[out, in]``);
- ``y_i = x_i @ W_i^T`` per split; the passed-in weights are what backward uses for dgrad;
- with ``fuse_wgrad_accumulation`` TE keeps weakrefs to the passed-in tensors and closures that read
  their ``.main_grad`` lazily in backward (TE >= 2.6/2.15), writes wgrad into that ``main_grad``
  (overwrite when ``is_first_microbatch`` is True or ``overwrite_main_grad``, else accumulate), then
  per weight (``_finish_wgrad``): no ``grad_added_to_main_grad`` attribute -> gradient None; else sets
  it True on the tensor it received and returns a cached dummy (``get_dummy_wgrad``; zeros when
  ``zero_out_wgrad``). Our dummy holds NaN, so adding it anywhere would show;
- without fusion it returns the real wgrads.

``DDPLikeHooks`` reproduces megatron-core 0.19.2 ``_make_backward_post_hook``: assert ``param.grad``
is not None (overlap_grad_reduce), add it into ``main_grad`` unless ``grad_added_to_main_grad`` (or
``zero_out_wgrad``), set ``param.grad = None``; it also counts the adds per Parameter.
"""

from __future__ import annotations

import weakref

import torch

_dummy_cache: dict = {}


def get_dummy_wgrad(shape, dtype, zero=False):
    """TE ``base.get_dummy_wgrad``: one cached buffer per (shape, dtype); here filled with NaN."""
    key = (tuple(shape), dtype)
    if key not in _dummy_cache:
        _dummy_cache[key] = torch.full(shape, float("nan"), dtype=dtype)
    buf = _dummy_cache[key]
    if zero:
        buf.zero_()
    elif not torch.isnan(buf).all():
        buf.fill_(float("nan"))
    return buf


class _StandInGroupedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inp, m_splits, fuse_wgrad_accumulation, is_first_microbatch, *weights):
        xs = torch.split(inp, m_splits)
        out = torch.cat([x @ w.t() for x, w in zip(xs, weights)])
        ctx.m_splits = m_splits
        ctx.fuse = fuse_wgrad_accumulation
        ctx.is_first_microbatch = is_first_microbatch
        ctx.weights_requires_grad = weights[0].requires_grad
        if fuse_wgrad_accumulation and ctx.weights_requires_grad:
            ctx.origin_weight_refs = [weakref.ref(w) for w in weights]
            ctx.overwrite = getattr(weights[0], "overwrite_main_grad", False)
            ctx.main_grad_funcs = [lambda j=j: weights[j].main_grad for j in range(len(weights))]
        ctx.save_for_backward(inp, *weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        inp, *weights = ctx.saved_tensors
        xs = torch.split(inp, ctx.m_splits)
        gs = torch.split(grad_out, ctx.m_splits)
        dgrad = torch.cat([g @ w for g, w in zip(gs, weights)])
        wgrads = [g.t() @ x for g, x in zip(gs, xs)]
        if not ctx.weights_requires_grad:
            return (dgrad, None, None, None, *([None] * len(weights)))
        if not ctx.fuse:
            return (dgrad, None, None, None, *wgrads)
        origin = [ref() for ref in ctx.origin_weight_refs]
        assert all(w is not None for w in origin), "weight was removed while fuse_wgrad_accumulation=True"
        accumulate = not ctx.is_first_microbatch and not ctx.overwrite
        results = []
        for w, fn, wg in zip(origin, ctx.main_grad_funcs, wgrads):
            main_grad = fn()
            if accumulate:
                main_grad.add_(wg)
            else:
                main_grad.copy_(wg)
            if not hasattr(w, "grad_added_to_main_grad"):
                results.append(None)
                continue
            w.grad_added_to_main_grad = True
            results.append(get_dummy_wgrad(list(main_grad.shape), w.dtype, zero=getattr(w, "zero_out_wgrad", False)))
        return (dgrad, None, None, None, *results)


class StandInGroupedLinear(torch.nn.Module):
    """The slice of TE ``GroupedLinear`` the patch sees (``is_first_microbatch`` is Megatron's
    module flag, read by :func:`megatron_forward`)."""

    def __init__(self, num_gemms, in_features, out_features, *, fuse_wgrad_accumulation=False,
                 single_grouped_weight=False, dtype=torch.float32, seed=0):
        super().__init__()
        self.num_gemms = num_gemms
        self.in_features = in_features
        self.out_features = out_features
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        self.is_first_microbatch = True
        self.fp8 = False
        gen = torch.Generator().manual_seed(seed)
        if single_grouped_weight:
            self.weight = torch.nn.Parameter(torch.randn(num_gemms, out_features, in_features, generator=gen).to(dtype))
        else:
            for i in range(num_gemms):
                w = torch.randn(out_features, in_features, generator=gen).to(dtype)
                self.register_parameter(f"weight{i}", torch.nn.Parameter(w))

    def _get_weight_tensors(self):
        if "weight" in self._parameters:
            return [self.weight]
        return [getattr(self, f"weight{i}") for i in range(self.num_gemms)]

    def forward(self, inp, m_splits, is_first_microbatch=None):
        """TE ``GroupedLinear.forward``: the flag is an argument (None: accumulate into main_grad)."""
        weights = self._get_weight_tensors()
        return _StandInGroupedLinearFn.apply(
            inp, list(m_splits), self.fuse_wgrad_accumulation, is_first_microbatch, *weights
        )


def megatron_forward(self, x, m_splits):
    """megatron-core 0.13-0.19 ``TEGroupedLinear.forward(x, m_splits)`` over TE's forward: the flag is
    None under ``disable_parameter_transpose_cache``, else the module's, which is set False after
    every call (``set_is_first_microbatch()`` re-arms it). Returns the output only (megatron returns
    ``(out, bias)``). Assign it as ``forward`` of the class standing in for ``TEGroupedLinear``, so
    that TE's forward is that class's base, as in megatron."""
    flag = None if getattr(self, "disable_parameter_transpose_cache", False) else self.is_first_microbatch
    out = StandInGroupedLinear.forward(self, x, m_splits, is_first_microbatch=flag)
    self.is_first_microbatch = False
    return out


class DDPLikeHooks:
    """Megatron-DDP-like ``main_grad`` buffers and AccumulateGrad post-hooks for ``params``."""

    def __init__(self, params, overlap_grad_reduce=True):
        self.params = list(params)
        self.overlap = overlap_grad_reduce
        self.adds = {p: 0 for p in self.params}
        self._grad_accs = []
        for p in self.params:
            p.main_grad = torch.zeros(p.shape, dtype=torch.float32)
            p.grad_added_to_main_grad = False
            grad_acc = p.expand_as(p).grad_fn.next_functions[0][0]
            grad_acc.register_hook(self._make_hook(p))
            self._grad_accs.append(grad_acc)

    def _make_hook(self, param):
        def hook(*unused):
            if self.overlap:
                assert param.grad is not None, "param.grad being None is not safe when overlap_grad_reduce is True"
            if param.grad is not None and (not param.grad_added_to_main_grad or getattr(param, "zero_out_wgrad", False)):
                param.main_grad.add_(param.grad.data)
                self.adds[param] += 1
            param.grad = None

        return hook

    def zero_grad_buffer(self):
        for p in self.params:
            p.main_grad.zero_()
            p.grad_added_to_main_grad = False
            self.adds[p] = 0
