"""Fake-quantized expert weights cached per patched module per optimizer step.

Interface (what the patch calls; nothing else here is public):

- :func:`fake_weights` ``(module, weights, block_size, *, check=None) -> list`` -- what the patched
  ``TEGroupedLinear._get_weight_tensors`` returns, given the N master weights ``[out, in]`` that the
  original hook gave. ``check(module, weights, block_size)`` (the forward guards) runs whenever the
  weights are fake-quantized (a miss, or an uncached call), never on a hit.
- :func:`make_forward_wrapper` ``(original) -> forward`` -- wraps Transformer Engine's
  ``GroupedLinear.forward(inp, m_splits, is_first_microbatch=None)`` (the class returned by
  :func:`grouped_linear_forward_class`) so that the flag TE receives is recorded on the module for
  the duration of the call; :func:`fake_weights` reads it. Without the wrapper the flag reads None:
  no caching (safe, just slow).
- :func:`invalidate_cache` -- drop every cached copy (``megatron_qat.invalidate_cache()``).
- :func:`configure` / :func:`release` -- at ``enable()`` / ``disable()``: read ``MEGATRON_QAT_CACHE``
  and register / remove the global optimizer-step hook; ``release`` also removes every per-module
  attribute and hook this module added. :func:`fake_weights` calls :func:`configure` itself if
  nobody did.
- :func:`stats` / :func:`reset_stats` -- hit / miss / uncached counts (for benchmarks/bench_step.py).

The flag is TE's tri-state ``is_first_microbatch`` (TE 2.20.2 ``base.quantize_weight`` caches its FP8
weight workspace with the same contract):

- ``None``: fake-quantize on every call, cache nothing (also: ``MEGATRON_QAT_CACHE=0``, a CUDA-graph
  capture in progress, a call from outside TE's forward such as ``backward_dw()``; a miss under
  ``torch.inference_mode()``, whose inference tensors a later grad-mode forward could not use);
- ``True``: fake-quantize and keep (replaces what was kept);
- ``False``: reuse what was kept **if it is still valid**, else fake-quantize and keep.

Megatron (megatron-core 0.13-0.19 ``TEGroupedLinear.forward``) passes ``None`` when
``disable_parameter_transpose_cache``, else the module's flag, which it sets False after every
forward; ``MegatronModule.set_is_first_microbatch()`` re-arms it at each step's first micro-batch
ONLY under fp8/fp4/kitchen. **In BF16 the flag is True on the run's very first forward and False
ever after**, so what protects BF16 training is the validity check, run on every call:

- the same weight objects, ``data_ptr()``, ``requires_grad`` and version counter ``_version`` as
  when the copy was made (in-place updates through the Parameter or ``detach()`` -- torch optimizers,
  ``param.copy_()`` under no_grad, ``nn.Module.load_state_dict`` -- bump ``_version``; replacing a
  Parameter or its ``.data`` changes the object or the pointer);
- no torch optimizer step since (a global ``register_optimizer_step_post_hook``: megatron-core's
  MegatronOptimizer / FP32Optimizer / MixedPrecisionOptimizer / DistributedOptimizer /
  ChainedOptimizer all step a ``torch.optim.Optimizer`` -- ``self.optimizer.step()`` in
  ``step_with_ready_grads`` -- BEFORE they copy main params into the model params or all-gather
  them, and the copy / all-gather lands before the next forward);
- no ``load_state_dict`` on the module or a parent since (a load-state-dict post hook);
- no :func:`invalidate_cache` since.

Writes that none of these see, so that need :func:`invalidate_cache`: ``param.data.copy_(...)`` or
any write through ``.data``, through a different tensor sharing the storage (Megatron's param
buffer: ``param.data`` is a view of ``param_data``, and a write into the buffer does not bump the
Parameter's version counter), or by a non-torch-optimizer, when done outside an optimizer step
(e.g. an RL weight sync into the training model).

Memory: every call gets the SAME N tensors (aliases of one fake-quantized copy), so TE's saved
weights of all in-flight micro-batches share one storage: at most 1.0x the local expert bytes
extra, however many micro-batches are in flight. The copy is dropped at the next invalidation.

Gradients: a grad-mode call gets the outputs of ONE straight-through node per module per cached
copy (:func:`megatron_qat.megatron.fake_weights.connect_fake_weights`); the node saves no tensor,
each micro-batch's TE node has its own edge to it, and each backward pass that reaches it delivers
that micro-batch's gradient to the Parameters exactly once (the same ``.grad`` / ``main_grad``
bits as the uncached path). A no-grad call (log-prob recomputation, the first pass of activation
recompute) gets the plain fake-quantized tensors; a later grad-mode call builds the node then.
"""

from __future__ import annotations

import functools
import inspect
import operator
import weakref
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..config import CACHE as CACHE_ENV
from .fake_weights import connect_fake_weights
from .grad_protocol import carry_attributes

FLAG_ATTR = "_megatron_qat_is_first_microbatch"  # set on the module by the forward wrapper
ENTRY_ATTR = "_megatron_qat_weight_cache"  # the module's cache entry


def caching_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """``MEGATRON_QAT_CACHE``: ``"1"`` or empty/unset -> caching on (the default); ``"0"`` -> off.

    Raises:
        ValueError: any other value (:func:`megatron_qat.config.read`'s one rule: the message names
            the variable and the accepted values).
    """
    from ..config import caching

    return caching(environ)


@dataclass(frozen=True)
class CacheStats:
    """Counts since :func:`reset_stats`: ``hits`` (cached copy reused), ``misses`` (fake-quantized and
    kept), ``uncached`` (fake-quantized, nothing kept: flag None, caching off, graph capture)."""

    hits: int
    misses: int
    uncached: int


class _State:
    __slots__ = ("configured", "caching", "epoch", "hook", "entries", "hits", "misses", "uncached")

    def __init__(self):
        self.configured = False
        self.caching = True
        self.epoch = 0
        self.hook = None  # handle of the global optimizer step post hook
        self.entries: weakref.WeakSet = weakref.WeakSet()
        self.hits = self.misses = self.uncached = 0


_state = _State()


class _Entry:
    """One module's cache: its quantizer (per-module kernel state) and at most one cached copy."""

    __slots__ = ("module_ref", "quantizer", "block_size", "load_hook", "epoch", "ids", "versions", "ptrs",
                 "grads", "weights", "fuse", "requires_grad", "plain", "connected", "__weakref__")

    def __init__(self, module, block_size: int):
        from ..mxfp4 import GroupedFakeQuantizer

        self.module_ref = weakref.ref(module)
        self.quantizer = GroupedFakeQuantizer(block_size)
        self.block_size = block_size
        self.load_hook = module.register_load_state_dict_post_hook(_on_load_state_dict)
        self.drop()

    def __reduce__(self):
        # deepcopy / pickle of a module: the copy starts without a cache (its weights are new objects)
        return (_no_entry, ())

    def drop(self) -> None:
        self.epoch = -1
        self.ids = self.versions = self.ptrs = self.grads = None
        self.weights = None  # strong refs: the ids compared cannot be reused while they are kept
        self.plain = None
        self.connected = None

    def remove(self) -> None:
        self.drop()
        self.load_hook.remove()
        module = self.module_ref()
        if module is not None and module.__dict__.get(ENTRY_ATTR) is self:
            del module.__dict__[ENTRY_ATTR]


def _no_entry():
    return None


def _on_load_state_dict(module, incompatible_keys) -> None:
    entry = module.__dict__.get(ENTRY_ATTR)
    if entry is not None:
        entry.drop()


def _on_optimizer_step(optimizer, args, kwargs) -> None:
    invalidate_cache()


def invalidate_cache() -> None:
    """Forget every cached fake-quantized copy (the next forward fake-quantizes the weights again).

    Call it after changing expert weights in a way the cache cannot see: a write through
    ``param.data``, through another tensor sharing the storage, or by something other than a torch
    optimizer step, ``load_state_dict`` or an in-place op on the Parameter itself.
    """
    _state.epoch += 1
    for entry in list(_state.entries):
        entry.drop()


def configure(environ: Mapping[str, str] | None = None) -> None:
    """Read ``MEGATRON_QAT_CACHE`` (``environ``, default ``os.environ``) and, with caching on,
    register the global optimizer-step hook. Idempotent; drops what is cached."""
    caching = caching_from_env(environ)
    if caching and _state.hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _state.hook = register_optimizer_step_post_hook(_on_optimizer_step)
    if not caching and _state.hook is not None:
        _state.hook.remove()
        _state.hook = None
    _state.caching = caching
    _state.configured = True
    invalidate_cache()


def release() -> None:
    """Undo everything this module did: the optimizer hook, every module's entry and its
    load-state-dict hook. The next :func:`fake_weights` configures again from the environment."""
    if _state.hook is not None:
        _state.hook.remove()
        _state.hook = None
    for entry in list(_state.entries):
        entry.remove()
    _state.entries = weakref.WeakSet()
    _state.configured = False
    _state.epoch += 1


def stats() -> CacheStats:
    return CacheStats(_state.hits, _state.misses, _state.uncached)


def reset_stats() -> None:
    _state.hits = _state.misses = _state.uncached = 0


_version_of = operator.attrgetter("_version")
_requires_grad_of = operator.attrgetter("requires_grad")
_data_ptr = torch.Tensor.data_ptr


def _carry_all(weights, fakes) -> None:
    for w, f in zip(weights, fakes):
        carry_attributes(w, f)


def _capturing(weights) -> bool:
    return weights[0].is_cuda and torch.cuda.is_current_stream_capturing()


def _entry_of(module, block_size: int) -> _Entry:
    entry = module.__dict__.get(ENTRY_ATTR)
    if entry is None or entry.block_size != block_size or entry.module_ref() is not module:
        if entry is not None and entry.module_ref() is module:
            entry.remove()
        entry = _Entry(module, block_size)
        module.__dict__[ENTRY_ATTR] = entry  # not nn.Module.__setattr__: no submodule / parameter logic
        _state.entries.add(entry)
    return entry


def _uncached(state, entry, module, weights, block_size, check, grad) -> list:
    """Fake-quantize for this call only: nothing is kept, the entry's copy is left as it is."""
    state.uncached += 1
    if check is not None:
        check(module, weights, block_size)
    with torch.no_grad():
        fakes = entry.quantizer(weights)
    if grad and any(w.requires_grad for w in weights):
        return connect_fake_weights(fakes, weights, bool(getattr(module, "fuse_wgrad_accumulation", False)))
    _carry_all(weights, fakes)
    return fakes


def fake_weights(module, weights: list, block_size: int, *, check: Callable | None = None) -> list:
    """The fake-quantized expert weights TE gets from ``module`` (see the module docstring).

    Args:
        module: the patched grouped linear module (carries the entry and the recorded flag).
        weights: what the original ``_get_weight_tensors`` returned: N tensors ``[out_features,
            in_features]``, one dtype and device (the guards have the last word on what is accepted).
        block_size: MXFP4 elements per scale along ``in_features``.
        check: ``check(module, weights, block_size)``, raising on an unsupported set-up; runs before
            every fake-quantization (miss or uncached call), not on a hit.
    Returns:
        N tensors of ``weights``' shapes and dtype. With autograd recording and a weight requiring
        grad they are connected straight-through to ``weights`` and carry the fused-wgrad
        attributes; otherwise they are plain tensors.
    """
    state = _state
    if not state.configured:
        configure()
    entry = _entry_of(module, block_size)
    flag = module.__dict__.get(FLAG_ATTR)
    grad = torch.is_grad_enabled()
    if flag is None or not state.caching or _capturing(weights):
        return _uncached(state, entry, module, weights, block_size, check, grad)
    ids = list(map(id, weights))
    versions = list(map(_version_of, weights))
    ptrs = list(map(_data_ptr, weights))
    grads = list(map(_requires_grad_of, weights))
    if (not flag and entry.epoch == state.epoch and entry.ids == ids and entry.versions == versions
            and entry.ptrs == ptrs and entry.grads == grads):
        state.hits += 1
    elif torch.is_inference_mode_enabled():
        # a copy made here would be inference tensors, which a later grad-mode forward could not
        # hand to TE (autograd refuses to save them): quantize for this call only, keep the old copy
        return _uncached(state, entry, module, weights, block_size, check, grad)
    else:
        state.misses += 1
        entry.drop()  # the old copy goes before the new one is allocated
        if check is not None:
            check(module, weights, block_size)
        with torch.no_grad():
            fakes = entry.quantizer(weights)
        _carry_all(weights, fakes)
        entry.weights = tuple(weights)
        entry.plain = fakes
        entry.requires_grad = any(grads)
        entry.fuse = bool(getattr(module, "fuse_wgrad_accumulation", False))
        entry.ids, entry.versions, entry.ptrs, entry.grads = ids, versions, ptrs, grads
        entry.epoch = state.epoch
    if grad and entry.requires_grad:
        if entry.connected is None:
            entry.connected = connect_fake_weights(entry.plain, list(entry.weights), entry.fuse)
        return list(entry.connected)
    return list(entry.plain)


def grouped_linear_forward_class(grouped_linear_cls):
    """The class whose ``forward`` Megatron's ``TEGroupedLinear.forward`` reaches through
    ``super().forward(x, m_splits, is_first_microbatch=...)``: the first base after
    ``grouped_linear_cls`` in its MRO that defines ``forward`` (TE's ``GroupedLinear``).

    Raises:
        TypeError: no such base below ``torch.nn.Module``.
    """
    for klass in grouped_linear_cls.__mro__[1:]:
        if klass is torch.nn.Module or klass is object:
            break
        if "forward" in klass.__dict__:
            return klass
    raise TypeError(
        f"{grouped_linear_cls.__qualname__} has no Transformer Engine base class defining forward(inp, m_splits, "
        "is_first_microbatch=None); cannot record is_first_microbatch for the MXFP4 weight cache"
    )


def make_forward_wrapper(original, switch=None):
    """Wrap TE's ``GroupedLinear.forward`` (unbound): record the ``is_first_microbatch`` it receives
    on the module (``FLAG_ATTR``) for the duration of the call, restoring the previous value after.
    ``switch`` (patch.py's ``hook.Switch``; optional): while ``switch.active`` is False the wrapper is
    a pure pass-through.

    Raises:
        TypeError: ``original`` takes no ``is_first_microbatch`` parameter.
    """
    params = list(inspect.signature(original).parameters.values())
    names = [p.name for p in params]
    if "is_first_microbatch" not in names:
        raise TypeError(
            f"{getattr(original, '__qualname__', original)!r} takes no is_first_microbatch parameter "
            f"(parameters: {names}); cannot record it for the MXFP4 weight cache"
        )
    index = names.index("is_first_microbatch")  # position counting ``self``
    default = params[index].default if params[index].default is not inspect.Parameter.empty else None
    missing = object()

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if switch is not None and not switch.active:
            return original(self, *args, **kwargs)
        if "is_first_microbatch" in kwargs:
            flag = kwargs["is_first_microbatch"]
        elif len(args) >= index:
            flag = args[index - 1]
        else:
            flag = default
        d = self.__dict__
        previous = d.get(FLAG_ATTR, missing)
        d[FLAG_ATTR] = flag
        try:
            return original(self, *args, **kwargs)
        finally:
            if previous is missing:
                d.pop(FLAG_ATTR, None)
            else:
                d[FLAG_ATTR] = previous

    forward.__wrapped__ = original
    return forward


__all__ = [
    "CACHE_ENV",
    "CacheStats",
    "caching_from_env",
    "configure",
    "fake_weights",
    "grouped_linear_forward_class",
    "invalidate_cache",
    "make_forward_wrapper",
    "release",
    "reset_stats",
    "stats",
]
