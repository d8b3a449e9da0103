"""One patched module's fake-quantized expert weights: the per-step cache and the straight-through
protocol that lands their gradient where Megatron expects it.

The runtime (:mod:`.runtime`) keeps one :class:`ModuleState` per patched ``TEGroupedLinear`` (in the
module's ``__dict__``) and calls :meth:`ModuleState.fake_weights` from the patched
``_get_weight_tensors`` with the N master weights ``[out_features, in_features]`` that TE's own hook
returned. What it returns is what TE's GEMMs (and its dgrad) use.

**When the weights are fake-quantized again.** The flag is TE's tri-state ``is_first_microbatch``,
which the runtime's wrapper of TE's ``GroupedLinear.forward`` records on the state for the duration
of the call (TE 2.20.2 ``base.quantize_weight`` caches its FP8 weight workspace with the same
contract):

- ``None``: fake-quantize on every call, keep nothing (also: ``MEGATRON_QAT_CACHE=0``, a CUDA-graph
  capture in progress, a call from outside TE's forward such as ``backward_dw()``, and a miss under
  ``torch.inference_mode()``, whose inference tensors a later grad-mode forward could not use);
- ``True``: fake-quantize and keep (replaces what was kept);
- ``False``: reuse what was kept **if it is still valid**, else fake-quantize and keep.

megatron-core 0.13-0.19 ``TEGroupedLinear.forward`` passes ``None`` under
``disable_parameter_transpose_cache``, else the module's flag, which it sets False after every
forward; ``MegatronModule.set_is_first_microbatch()`` re-arms it at a step's first micro-batch only
under fp8/fp4. **In BF16 the flag is True on the run's first forward and False ever after**, so what
protects BF16 training is the validity check, run on every call:

- the same weight objects, ``data_ptr()``, ``requires_grad`` and version counter ``_version`` as when
  the copy was made (torch optimizers, ``param.copy_()``, ``load_state_dict`` bump ``_version``;
  replacing a Parameter or its ``.data`` changes the object or the pointer);
- the same cache epoch: the runtime bumps it after every torch optimizer step (megatron-core's
  optimizers all step a ``torch.optim.Optimizer`` before they copy main params into the model params
  or all-gather them, and that lands before the next forward), at ``invalidate_cache()``, and a
  ``load_state_dict`` on the module or a parent drops the module's copy.

Writes none of these see need ``megatron_qat.invalidate_cache()``: through ``.data``, through another
tensor sharing the storage (Megatron's param buffer), or by a non-torch optimizer outside a step.

**Guards.** ``guard(module, weights)`` (the forward guards of :mod:`.runtime`) runs when the module's
weight set (objects and pointers) is new, not on every miss: once per module and weight set.

**Memory.** Every cached call gets aliases of ONE fake-quantized copy (the quantizer's flat output),
so TE's saved weights of all in-flight micro-batches share one storage: at most 1.0x the local
expert bytes extra. The copy is freed at the next invalidation, or kept for the next miss to
overwrite (:meth:`ModuleState.release`), else dropped before the new one is made.

**Gradients** (TE 2.20.2 ``_GroupedLinear.backward`` / ``handle_custom_ddp_from_mcore``, megatron-core
0.19.2 ``DistributedDataParallel._make_backward_post_hook``): with ``fuse_wgrad_accumulation`` TE
writes each expert's wgrad into ``q.main_grad`` of the tensor ``q`` it received; if ``q`` has a
``grad_added_to_main_grad`` attribute TE sets it True on ``q`` and returns a cached dummy, else None;
Megatron's hook on the Parameter adds ``param.grad`` into ``main_grad`` unless the PARAMETER's own
flag is True. So each ``q`` carries every Python attribute of its Parameter, by reference
(:func:`carry_attributes`: ``main_grad`` is the same buffer view, ``offloading_activation`` keeps
activation offloading off the fake copy: megatron-core 0.16 `offloading_activation`, 0.19
`_do_not_offload`), and ONE straight-through node per module per cached copy
(:class:`FakeWeightsSTE`) hands each arriving gradient to its Parameter unchanged, setting the
Parameter's own flag (TE's dummy: no extra tensor, no extra add). The node saves no tensor, so
every micro-batch's TE node may have its own edge to it: each backward that reaches it delivers
that micro-batch's gradient once. Under ``torch.no_grad()`` (log-prob recomputation) TE gets the
plain fake tensors; a later grad-mode call builds the node then.
"""

from __future__ import annotations

import operator
import sys
import weakref
from dataclasses import dataclass

import torch

STATE_ATTR = "_megatron_qat_state"  # the module's ModuleState, in module.__dict__
FLAG = "grad_added_to_main_grad"

_version_of = operator.attrgetter("_version")
_requires_grad_of = operator.attrgetter("requires_grad")
_data_ptr = torch.Tensor.data_ptr


@dataclass(frozen=True)
class CacheStats:
    """Counts since the runtime's start or last reset: ``hits`` (cached copy reused), ``misses``
    (fake-quantized and kept), ``uncached`` (fake-quantized, nothing kept); ``refills``: the misses
    that re-quantized into the copy kept across an optimizer step (:meth:`ModuleState.release`)
    instead of making a new one."""

    hits: int
    misses: int
    uncached: int
    refills: int


class CacheClock:
    """What every :class:`ModuleState` of one runtime shares: the cache ``epoch`` (bumped to
    invalidate every copy at once), whether ``caching`` is on, and the :class:`CacheStats` counts."""

    __slots__ = ("epoch", "caching", "hits", "misses", "uncached", "refills")

    def __init__(self, caching: bool):
        self.epoch = 0
        self.caching = caching
        self.hits = self.misses = self.uncached = self.refills = 0

    def stats(self) -> CacheStats:
        return CacheStats(self.hits, self.misses, self.uncached, self.refills)


def carry_attributes(source: torch.Tensor, fake: torch.Tensor) -> None:
    """Give ``fake`` every Python attribute of ``source`` (same objects: ``main_grad`` stays the
    Parameter's buffer view). Values are those at the time of the call."""
    attributes = getattr(source, "__dict__", None)
    if attributes:
        fake.__dict__.update(attributes)


class FakeWeightsSTE(torch.autograd.Function):
    """Forward: aliases (``detach``: same storage) of the given fake-quantized tensors, which are not
    inputs (their values come from outside the graph). Backward: identity to each master weight;
    sets ``grad_added_to_main_grad`` on its owner (see the module docstring)."""

    @staticmethod
    def forward(ctx, fakes: list, flag_owners: tuple, backwards: list, *weights: torch.Tensor):  # type: ignore[override]
        ctx.flag_owners = flag_owners
        ctx.backwards = backwards  # [count] of backward passes through this node (ModuleState reads it)
        ctx.set_materialize_grads(False)  # TE's None stays None: no zero tensor is allocated for it
        return tuple(f.detach() for f in fakes)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        ctx.backwards[0] += 1
        for owner, grad in zip(ctx.flag_owners, grads):
            if owner is not None and grad is not None:
                owner.grad_added_to_main_grad = True
        return (None, None, None, *grads)


def flag_owners(weights, fuse_wgrad_accumulation: bool) -> tuple:
    """Per weight: the Parameter whose ``grad_added_to_main_grad`` the node sets, or None."""
    return tuple(w if (fuse_wgrad_accumulation and w.requires_grad and hasattr(w, FLAG)) else None for w in weights)


def connect_fake_weights(fakes: list, weights, fuse_wgrad_accumulation: bool, owners: tuple | None = None,
                         backwards: list | None = None) -> list:
    """N tensors holding ``fakes``' values, connected straight-through to ``weights`` (the master
    Parameters), each carrying its master's attributes. Call with autograd recording. ``backwards``:
    a one-element list the node increments on every backward pass through it."""
    if owners is None:
        owners = flag_owners(weights, fuse_wgrad_accumulation)
    outs = FakeWeightsSTE.apply(fakes, owners, [0] if backwards is None else backwards, *weights)
    for w, q in zip(weights, outs):
        carry_attributes(w, q)
    return list(outs)


def _no_state():
    return None


def _drop_on_load(module, incompatible_keys) -> None:
    state = module.__dict__.get(STATE_ATTR)
    if state is not None:
        state.drop()


_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", torch.cuda.is_current_stream_capturing)


def _storage_refs(tensor: torch.Tensor) -> int:
    """How many tensors hold ``tensor``'s storage (views, aliases, autograd's saved copies), plus one."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def _python_refs(tensors) -> int:
    """The largest Python reference count among ``tensors`` (a list kept by the state): above the
    state's own when a caller still holds one of them."""
    return max(map(sys.getrefcount, tensors), default=0)


class ModuleState:
    """One patched module's quantizers, recorded ``is_first_microbatch`` flag and cached copy.

    ``quantizer`` is the module's own :class:`megatron_qat.mxfp4.GroupedFakeQuantizer` of the weights
    (its kernel launch is prepared once per weight set); ``activations`` its
    :class:`megatron_qat.mxfp4.ActivationFakeQuantizer` of the GEMM input under an activation recipe
    (run on every call, never cached). A deep copy or pickle of the module starts without a state
    (its weights are new objects).

    **Host cost.** A hit is four attribute reads per weight (object, pointer, version,
    requires_grad) and, for CUDA weights, one capture query. The masters of the last copy stay
    known (:meth:`held_masters`), so with TE's own hook the runtime finds them without calling it.

    **The copy across optimizer steps** (:meth:`release`, then a miss). When no micro-batch still
    needs the copy (every grad-mode hand-out of the connected tensors has been matched by a backward
    pass through their node: no graph is pending; the node counts its passes) and nobody made a view
    or alias of it (the storage's reference count is the state's own; autograd's saved copies count
    too), an optimizer step (or ``invalidate_cache()``) keeps its tensors and straight-through node,
    and the next miss on the same weight set re-quantizes INTO them (:meth:`_refill`; on CUDA a replay
    of a CUDA graph of the launch, captured at the first refill): no new tensors,
    no new node, no unbind; the shared version counter is bumped and the Parameters' attributes are
    carried again. Otherwise the copy is dropped and a new one made.

    The step also frees the copy's memory (``untyped_storage().resize_(0)``) when no one else holds
    the tensor objects (their Python reference counts are the state's own). When someone does, the
    memory stays and the next miss overwrites it, so a holder never reads freed memory: it reads the
    old values until the next forward's miss, then the new ones with the version counter bumped, as
    it reads a Parameter across an optimizer step (a caller who wants one step's values keeps a
    clone). In Megatron training someone always does: TE 2.20.2's ``_GroupedLinear.forward`` keeps
    the tensors it was handed in ``ctx.main_grad_funcs``' closures (``module/grouped_linear.py``,
    fused wgrad), and megatron-core 0.19.2's token dispatchers keep the last forward's routing
    probabilities on the module (``token_dispatcher.py``: ``self.probs``, ``self.local_probs``),
    whose graph reaches every earlier layer's finished TE nodes until the next forward. Those
    holders never read the values again (their backward has run and freed what it saved), and a
    second backward through them would fail on the bumped version counter instead of reading new
    values. Memory is what it was before the refill existed: such holders kept a dropped copy alive
    too, next to the new one.
    """

    __slots__ = ("clock", "module_ref", "quantizer", "activations", "flag", "load_hook", "guarded", "epoch",
                 "masters", "versions", "ptrs", "grads", "plain", "plain_carried", "connected", "requires_grad", "fuse",
                 "keys", "own_refs", "py_refs", "owners", "handed", "backwards", "nbytes", "__weakref__")

    def __init__(self, clock: CacheClock, module, quantizer, activations=None):
        self.clock = clock
        self.module_ref = weakref.ref(module)
        self.quantizer = quantizer
        self.activations = activations  # the module's mxfp4.ActivationFakeQuantizer, or None (BF16 activations)
        self.flag = None
        self.guarded = None  # (ids, pointers) of the weight set the guards last accepted
        self.masters = self.keys = None  # the weights of the last copy (strong refs: ids stay unique), their names
        self.load_hook = module.register_load_state_dict_post_hook(_drop_on_load)
        self.drop()

    def __reduce__(self):
        return (_no_state, ())

    def drop(self) -> None:
        """Forget the cached copy (the next call fake-quantizes again). The masters it was made of
        stay known (``held_masters``), as long as the module holds them."""
        self.epoch = -1
        self.versions = self.ptrs = self.grads = None
        self.plain = self.connected = self.owners = None
        self.plain_carried = False
        self.own_refs, self.handed, self.backwards, self.nbytes = -1, 0, [0], 0
        self.py_refs = (0, 0)  # _python_refs of plain and of connected when the state made them

    def release(self) -> None:
        """The copy is stale (an optimizer step, ``invalidate_cache()``): keep its tensors for
        :meth:`_refill` when only finished graphs can reach them, freeing the memory when no one else
        holds them either; else drop it."""
        if self.plain and self.quantizer.wrote(self.plain) and self._refillable():
            storage = self.plain[0].untyped_storage()
            if storage.nbytes() and self._unheld():
                self.nbytes = storage.nbytes()
                storage.resize_(0)
            self.epoch = -1
        else:
            self.drop()

    def _refillable(self) -> bool:
        """No pending graph (every grad-mode hand-out matched by a backward pass through the node) and
        no view or alias of the copy but the state's own."""
        return self.own_refs >= 0 and self.handed == self.backwards[0] and _storage_refs(self.plain[0]) == self.own_refs

    def _unheld(self) -> bool:
        """No one but the state holds the copy's tensor objects (their memory may be freed)."""
        return (_python_refs(self.plain), _python_refs(self.connected or ())) == self.py_refs

    def remove(self) -> None:
        """Drop the copy and the load hook and leave the module (the runtime closes)."""
        self.drop()
        self.masters = self.keys = None
        self.load_hook.remove()
        module = self.module_ref()
        if module is not None and module.__dict__.get(STATE_ATTR) is self:
            del module.__dict__[STATE_ATTR]

    def held_masters(self, module):
        """The kept masters when ``module`` still holds exactly them as its parameters ``weight0..N-1``
        (and no grouped ``weight``), else None. What TE 2.20's own ``_get_weight_tensors`` returns in
        that case (``runtime.hook_reads_parameters``), read without calling it."""
        keys = self.keys
        if keys is None:
            return None
        params = module._parameters
        if "weight" in params:
            return None
        get = params.get
        for key, master in zip(keys, self.masters):
            if get(key) is not master:
                return None
        return self.masters

    def _guard(self, module, weights: list, ptrs: list, guard) -> None:
        key = (tuple(map(id, weights)), tuple(ptrs))
        if key != self.guarded:
            guard(module, weights)
            self.guarded = key

    def _quantize(self, module, weights: list, ptrs: list, guard) -> list:
        self._guard(module, weights, ptrs, guard)
        with torch.no_grad():
            return self.quantizer(weights)

    def fake_weights(self, module, weights, guard, same_objects: bool = False) -> list:
        """What TE gets instead of ``weights`` (N tensors ``[out, in]``, one dtype and device): the same
        shapes and dtype, fake-quantized; connected straight-through to ``weights`` with autograd
        recording and a weight requiring grad, plain tensors otherwise. ``same_objects``: the caller
        already knows ``weights`` are the kept masters (:meth:`held_masters`)."""
        clock = self.clock
        flag = self.flag
        grad = torch.is_grad_enabled()
        ptrs = list(map(_data_ptr, weights))
        if flag is None or not clock.caching or (weights[0].is_cuda and _capturing()):
            return self._uncached(module, weights, ptrs, guard, grad)
        versions = list(map(_version_of, weights))
        grads = list(map(_requires_grad_of, weights))
        masters = self.masters
        same = same_objects or (masters is not None and all(map(operator.is_, weights, masters)))
        if flag is False and same and self.epoch == clock.epoch and ptrs == self.ptrs and versions == self.versions \
                and grads == self.grads:
            clock.hits += 1
        elif torch.is_inference_mode_enabled():
            return self._uncached(module, weights, ptrs, guard, grad)  # keep the old copy
        else:
            clock.misses += 1
            if same and ptrs == self.ptrs and self._refill(module, weights, ptrs, guard):
                clock.refills += 1
            else:
                self.drop()  # the old copy goes before the new one is allocated
                self.plain = self._quantize(module, weights, ptrs, guard)
                if not same:
                    self.masters = tuple(weights)
                    self.keys = _parameter_keys(module, self.masters)
                self.fuse = bool(getattr(module, "fuse_wgrad_accumulation", False))
                self.own_refs = _storage_refs(self.plain[0]) if self.plain else -1
                self.py_refs = (_python_refs(self.plain), 0)
            self.versions, self.ptrs, self.grads = versions, ptrs, grads
            self.requires_grad = any(grads)
            self.epoch = clock.epoch
        if grad and self.requires_grad:
            if self.connected is None:
                self.owners = flag_owners(self.masters, self.fuse)
                self.connected = connect_fake_weights(self.plain, list(self.masters), self.fuse, self.owners,
                                                      self.backwards)
                if self.own_refs >= 0:  # one alias per output (FakeWeightsSTE.forward's detach)
                    expected = self.own_refs + len(self.connected)
                    self.own_refs = expected if _storage_refs(self.plain[0]) == expected else -1
                self.py_refs = (self.py_refs[0], _python_refs(self.connected))
            self.handed += 1
            return list(self.connected)
        if not self.plain_carried:  # only when the plain copy is handed out (no grad, or frozen experts)
            for w, f in zip(self.masters, self.plain):
                carry_attributes(w, f)
            self.plain_carried = True
        return list(self.plain)

    def _refill(self, module, weights, ptrs: list, guard) -> bool:
        """Re-quantize the kept masters into the kept copy (see the class docstring); True when done,
        False (nothing changed) when it cannot be done in place."""
        plain = self.plain
        if (not plain or torch.compiler.is_compiling() or not self._refillable()
                or self.fuse != bool(getattr(module, "fuse_wgrad_accumulation", False))):
            return False
        # No guard call: ``weights`` are the kept masters at the pointers of the last fill, the weight
        # set the guards accepted then (guard work is once per module and weight set).
        storage = plain[0].untyped_storage()
        if not storage.nbytes() and self.nbytes:
            storage.resize_(self.nbytes)
        with torch.no_grad():
            if not self.quantizer.quantize_into(weights, plain, ptrs):
                return False  # the caller drops the copy
        # One counter: the views, their base and the connected aliases share it. (A bare tensor given to
        # torch._C._increment_version is iterated: one bump per row, 1.6 ms for [1536, 2048] on a CPU VM.)
        torch.autograd.graph.increment_version(plain[0])
        self.plain_carried = False  # the Parameters' attributes as of now, when the plain copy is next handed out
        if self.connected is not None:
            if all(map(operator.is_, flag_owners(weights, self.fuse), self.owners)):
                for w, q in zip(weights, self.connected):
                    carry_attributes(w, q)  # e.g. a main_grad buffer re-created since the last step
            else:  # a weight's requires_grad or grad_added_to_main_grad attribute changed: a new node
                self.own_refs -= len(self.connected)
                self.connected = self.owners = None
                self.handed, self.backwards = 0, [0]
                self.py_refs = (self.py_refs[0], 0)
        return True

    def _uncached(self, module, weights: list, ptrs: list, guard, grad: bool) -> list:
        """Fake-quantize for this call only; the kept copy (if any) stays as it is."""
        self.clock.uncached += 1
        fakes = self._quantize(module, weights, ptrs, guard)
        if grad and any(w.requires_grad for w in weights):
            return connect_fake_weights(fakes, weights, bool(getattr(module, "fuse_wgrad_accumulation", False)))
        for w, f in zip(weights, fakes):
            carry_attributes(w, f)
        return fakes


def _parameter_keys(module, masters: tuple):
    """``("weight0", ..., "weightN-1")`` when ``module``'s parameters of those names are exactly
    ``masters`` (so :meth:`ModuleState.held_masters` can find them again), else None."""
    params = module._parameters
    keys = tuple(f"weight{i}" for i in range(len(masters)))
    if "weight" in params or any(params.get(k) is not m for k, m in zip(keys, masters)):
        return None
    return keys
