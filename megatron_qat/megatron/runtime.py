"""The fake-QAT runtime: one object per process (created by ``enable()``, closed by ``disable()``)
that owns every class patch, every module's state, the step hooks, the metrics recorder and a
recorded failure. Its methods are the installed wrappers; the guards that refuse set-ups in which
fake-QAT would be wrong or silently inactive are at the end of this module.

A weight's route (one forward of a patched ``TEGroupedLinear``):

1. Megatron's ``TEGroupedLinear.forward`` calls TE's ``GroupedLinear.forward(inp, m_splits,
   is_first_microbatch)`` -> :meth:`Runtime.forward` records the flag on the module's
   :class:`~megatron_qat.megatron.cache.ModuleState` and, under a recipe with activation
   quantization, hands TE ``mxfp4.fake_quantize_activation(inp)`` (1 x block along K, straight-through
   backward; TE keeps that tensor for wgrad, so wgrad = dY^T Q(x), the gradient of the forward it
   saw) -- fc1's input and fc2's input (Megatron's SwiGLU output, routing probabilities applied);
2. TE calls ``self._get_weight_tensors()`` -> :meth:`Runtime.weight_tensors`: TE's own hook gives
   the N master weights ``[out, in]``; on a metrics logging step the recorder measures them;
   :meth:`ModuleState.fake_weights` returns the module's cached fake-quantized copy of this
   optimizer step, or runs the guards (once per weight set) and ONE grouped launch of the module's
   ``mxfp4.GroupedFakeQuantizer`` (the recipe's weight rule) -> ``megatron_qat.kernels``;
3. in backward TE writes wgrad into ``main_grad`` of the tensors it received (they carry the
   Parameter's attributes) and the straight-through node (``cache.FakeWeightsSTE``) hands the
   gradient to the Parameter, setting its ``grad_added_to_main_grad``.

Patches (each records the class, whether the class had its own attribute, and the EXACT function
installed; ours is found by identity only, never by a marker, since ``functools.wraps`` copies a
function's ``__dict__`` onto a foreign wrapper made over ours):

- ``TEGroupedLinear._get_weight_tensors`` (whatever attribute resolution gives: TE's
  ``GroupedLinear`` method, a fork's override, a foreign wrapper; every argument is passed through);
- TE's ``GroupedLinear.forward`` (the first base after ``TEGroupedLinear`` defining ``forward``);
- ``MoELayer.__init__`` (guards at model build; also installed, as a pure guard, while a failure is
  recorded).

Closing restores each class attribute exactly when ours is still on top; with a foreign wrapper on
top it leaves that wrapper in place (a warning says so) and ours, under it, is a pass-through (the
closed runtime is inactive). Step hooks: ONE optimizer-step pre-hook (raises while a failure is
recorded) and ONE post-hook (ends the cache epoch, ends the metrics step).
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import weakref
from dataclasses import dataclass

import torch

from .. import config, mxfp4
from ..numerics.constants import DEFAULT_BLOCK_SIZE
from ..numerics.format import check_block_size
from ..numerics.rules import DEFAULT_RECIPE, RECIPES
from .cache import STATE_ATTR, CacheClock, CacheStats, ModuleState
from .failclosed import (
    FLAG_HINT,
    MOE_LAYER_MODULE,
    FakeQATUnavailableError,
    as_unavailable,
    load_te_grouped_linear,
    megatron_core_version,
    refusal,
    transformer_engine_version,
)
from .install import ImportWatcher

HOOK = "TEGroupedLinear._get_weight_tensors"
FORWARD = "GroupedLinear.forward"
MOE_INIT = "MoELayer.__init__"
EXPERTS = "TEGroupedMLP.forward"
EXPERTS_MODULE = "megatron.core.transformer.moe.experts"
_MISSING = object()
_log = logging.getLogger("megatron_qat")


@dataclass
class Patch:
    cls: type
    name: str
    own: object  # the class's own attribute before us, or _MISSING
    function: object  # exactly what we set on the class


class Runtime:
    """Fake-QAT state of the process; see the module docstring. Lifecycle: :meth:`configure`, then
    :meth:`activate` (or :meth:`fail`), then :meth:`close`."""

    def __init__(self):
        self.active = False
        self.failure: BaseException | None = None
        self.block_size = DEFAULT_BLOCK_SIZE
        self.recipe = RECIPES[DEFAULT_RECIPE]
        self.clock = CacheClock(True)
        self.te_cls = None
        self.recorder = None
        self.patches: dict[str, Patch] = {}
        self.states: weakref.WeakSet = weakref.WeakSet()
        self._pre_hook = self._post_hook = None
        self._checked_types: weakref.WeakSet = weakref.WeakSet()
        self._warned: set[str] = set()
        self._built_layers = self._built_modules = 0

    # --- lifecycle -----------------------------------------------------------------------------------
    def configure(self, block_size: int | None, recipe: str | None) -> None:
        """Block size and recipe (``None``: from the environment). A change drops every module state."""
        if block_size is None or recipe is None:
            cfg = config.from_env()  # validates every variable and name
            block_size = cfg.block_size if block_size is None else block_size
            recipe = cfg.recipe if recipe is None else recipe
        check_block_size(block_size, "block_size")
        if recipe not in RECIPES:
            accepted = ", ".join(f'"{name}"' for name in RECIPES)
            raise ValueError(f"recipe={recipe!r}: accepted values are {accepted} (docs/engines.md)")
        if (block_size, RECIPES[recipe]) != (self.block_size, self.recipe):
            self.block_size, self.recipe = block_size, RECIPES[recipe]
            self._remove_states()
            if self.active:
                self._announce_activated()

    def activate(self) -> None:
        """Install the patches and the step hooks (all or nothing)."""
        config.kernel_choice()  # a malformed MEGATRON_QAT_KERNEL is refused before anything is patched
        cls = load_te_grouped_linear()
        _check_subclass_overrides(cls)
        self.clock = CacheClock(config.caching())
        if config.metrics_interval() != 0:
            from ..metrics import Recorder

            self.recorder = Recorder()
        try:
            self.te_cls = cls
            self._install(HOOK, cls, "_get_weight_tensors", self._weights_wrapper)
            self._install(FORWARD, grouped_linear_forward_class(cls), "forward", self._forward_wrapper)
            from torch.optim.optimizer import register_optimizer_step_post_hook

            self._post_hook = register_optimizer_step_post_hook(self._after_step)
            self.active = True
            self._patch_moe_layer()
            self._patch_experts()
        except BaseException:
            self.close()
            raise
        self._announce_activated()

    def fail(self, exc: BaseException) -> BaseException:
        """Record ``exc`` as the reason fake-QAT is unavailable (the first one is kept): from now on
        building a ``MoELayer`` and stepping any torch optimizer raise. Returns the error to raise
        (an ImportError becomes a :class:`FakeQATUnavailableError`)."""
        error = as_unavailable(exc)
        if self.failure is None:
            self.failure = error
        for symbol in [s for s in self.patches if s != MOE_INIT]:
            self._uninstall(symbol)
        self.active = False
        if self._pre_hook is None:
            from torch.optim.optimizer import register_optimizer_step_pre_hook

            self._pre_hook = register_optimizer_step_pre_hook(self._before_step)
        self._patch_moe_layer()
        return error

    def close(self) -> None:
        """Undo everything: patches (identity-safe), hooks, watched imports, module states."""
        self.active = False
        self.failure = None
        for symbol in list(self.patches):
            self._uninstall(symbol)
        for handle in (self._pre_hook, self._post_hook):
            if handle is not None:
                handle.remove()
        self._pre_hook = self._post_hook = None
        watcher = ImportWatcher.find()
        if watcher is not None:
            watcher.cancel(MOE_LAYER_MODULE, self.on_moe_layer_module)
        self._remove_states()
        self.recorder = None

    def check_failure(self, where: str) -> None:
        if self.failure is not None:
            raise refusal(where, self.failure)

    # --- class patches -------------------------------------------------------------------------------
    def _install(self, symbol: str, cls, name: str, make_wrapper) -> None:
        record = self.patches.get(symbol)
        if record is not None and record.cls is cls:
            return  # ours is on cls (on top, or under a foreign wrapper)
        if record is not None:
            self._uninstall(symbol)  # a different class (its module was re-executed): let go of the old one
        own = cls.__dict__.get(name, _MISSING)
        function = make_wrapper(getattr(cls, name))
        setattr(cls, name, function)
        self.patches[symbol] = Patch(cls, name, own, function)

    def _uninstall(self, symbol: str) -> None:
        record = self.patches.pop(symbol)
        if record.cls.__dict__.get(record.name) is record.function:
            if record.own is _MISSING:
                delattr(record.cls, record.name)
            else:
                setattr(record.cls, record.name, record.own)
            return
        _log.warning(
            "megatron_qat.disable(): %s.%s is no longer the function megatron_qat installed (a foreign wrapper was "
            "put on top of it, or it was replaced); that attribute is left in place and megatron_qat's wrapper "
            "under it is now a pass-through",
            record.cls.__qualname__,
            record.name,
        )

    def patched(self, symbol: str):
        """The function installed for ``symbol`` (``HOOK`` / ``FORWARD`` / ``MOE_INIT``), or None."""
        record = self.patches.get(symbol)
        return record.function if record is not None else None

    def _patch_moe_layer(self) -> None:
        module = sys.modules.get(MOE_LAYER_MODULE)
        if module is not None and hasattr(module, "MoELayer"):
            self.on_moe_layer_module(module)
        else:  # not imported yet, or half-imported (it imports the TE extension module half-way)
            ImportWatcher.find(create=True).when_imported(MOE_LAYER_MODULE, self.on_moe_layer_module)

    def _patch_experts(self) -> None:
        """Wrap megatron-core's ``TEGroupedMLP.forward`` once its module is loaded (at activation, or
        when the first MoELayer is built): a pass-through unless the recipe quantizes activations."""
        klass = getattr(sys.modules.get(EXPERTS_MODULE), "TEGroupedMLP", None)
        if self.active and klass is not None and "forward" in klass.__dict__:
            self._install(EXPERTS, klass, "forward", self._experts_wrapper)

    def on_moe_layer_module(self, module) -> None:
        """Wrap ``MoELayer.__init__`` once its module has executed (while active or failed)."""
        if (self.active or self.failure is not None) and hasattr(module, "MoELayer"):
            self._install(MOE_INIT, module.MoELayer, "__init__", self._moe_init_wrapper)

    # --- wrappers ------------------------------------------------------------------------------------
    def _weights_wrapper(self, original):
        runtime = self
        direct = hook_reads_parameters(original)

        @functools.wraps(original)
        def _get_weight_tensors(module, *args, **kwargs):
            return runtime.weight_tensors(original, direct, module, args, kwargs)

        _get_weight_tensors.__wrapped__ = original
        return _get_weight_tensors

    def weight_tensors(self, original, direct: bool, module, args, kwargs) -> list:
        """The patched ``_get_weight_tensors``: TE's own result, fake-quantized (module docstring).
        ``direct``: ``original`` is TE's own hook (:func:`hook_reads_parameters`), so while the module
        still holds the kept masters as its parameters they are its result, read without calling it."""
        if not self.active:
            return original(module, *args, **kwargs)
        state = module.__dict__.get(STATE_ATTR)
        if state is None or state.clock is not self.clock:
            state = self._adopt(module)
        weights = state.held_masters(module) if direct and not args and not kwargs else None
        same = weights is not None
        if not same:
            weights = list(original(module, *args, **kwargs))
        recorder = self.recorder
        if recorder is not None and recorder.due():
            recorder.observe(module, list(weights), self.block_size, rule=self.recipe.weights)
        fakes = state.fake_weights(module, weights, self._guard, same)
        if self._built_layers:
            self._announce_model(fakes)
        return fakes

    def _forward_wrapper(self, original):
        params = list(inspect.signature(original).parameters.values())
        names = [p.name for p in params]
        if "is_first_microbatch" not in names or len(names) < 2:
            raise TypeError(
                f"{getattr(original, '__qualname__', original)!r} takes no (inp, ..., is_first_microbatch) parameters "
                f"(parameters: {names}); cannot record the flag for the MXFP4 weight cache"
            )
        index = names.index("is_first_microbatch")  # position counting ``self``
        default = params[index].default if params[index].default is not inspect.Parameter.empty else None
        input_name = names[1]
        runtime = self

        @functools.wraps(original)
        def forward(module, *args, **kwargs):
            return runtime.forward(original, index, default, input_name, module, args, kwargs)

        forward.__wrapped__ = original
        return forward

    def forward(self, original, index: int, default, input_name: str, module, args, kwargs):
        """The patched TE ``GroupedLinear.forward``: record ``is_first_microbatch`` for the call and,
        under an activation recipe, fake-quantize the GEMM input."""
        if not self.active or not isinstance(module, self.te_cls):  # TE GroupedLinears outside Megatron's experts
            return original(module, *args, **kwargs)
        if "is_first_microbatch" in kwargs:
            flag = kwargs["is_first_microbatch"]
        elif len(args) >= index:
            flag = args[index - 1]
        else:
            flag = default
        state = module.__dict__.get(STATE_ATTR)
        if state is None or state.clock is not self.clock:
            state = self._adopt(module)
        quantize = state.activations
        if quantize is not None:
            if args:
                args = (quantize(args[0]), *args[1:])
            elif input_name in kwargs:
                kwargs = {**kwargs, input_name: quantize(kwargs[input_name])}
            else:
                raise RuntimeError(
                    f"MXFP4 fake-QAT recipe {self.recipe.name}: {type(module).__name__}.forward was called without "
                    f"its input ({input_name}); cannot quantize the expert activations"
                )
        previous, state.flag = state.flag, flag
        try:
            return original(module, *args, **kwargs)
        finally:
            state.flag = previous

    @staticmethod
    def _wrap(original, method):
        """The function installed over ``original``: ``method(original, obj, args, kwargs)``."""

        @functools.wraps(original)
        def wrapper(obj, *args, **kwargs):
            return method(original, obj, args, kwargs)

        wrapper.__wrapped__ = original
        return wrapper

    def _moe_init_wrapper(self, original):
        return self._wrap(original, self.moe_layer_init)

    def moe_layer_init(self, original, layer, args, kwargs) -> None:
        """The patched ``MoELayer.__init__``: sticky-failure check, config guards, structure guards."""
        self.check_failure(f"building {type(layer).__name__}")
        if not self.active:
            return original(layer, *args, **kwargs)
        cfg = kwargs.get("config", args[0] if args else None)
        for key, message in check_moe_config(cfg):
            self._warn_once(key, message)
        original(layer, *args, **kwargs)
        patched = check_built_moe_layer(layer, self.te_cls, self.block_size)
        if self.recipe.activations is not None:
            self._patch_experts()
            self._check_probs_placement(layer)
        if self.recorder is not None:
            from ..metrics import register_moe_layer

            register_moe_layer(layer)
        self._built_layers += 1
        self._built_modules += patched

    def _experts_wrapper(self, original):
        return self._wrap(original, self.experts_forward)

    def experts_forward(self, original, module, args, kwargs):
        """The patched megatron-core ``TEGroupedMLP.forward(permuted_local_hidden_states,
        tokens_per_expert, permuted_probs, ...) -> (output, bias)``: under a recipe that quantizes
        activations, the routing probability goes where the engines put it.

        megatron-core 0.13-0.19 multiplies each token's probability into fc2's INPUT (the SwiGLU
        output, ``bias_act_func``; fc2's bias by ``_apply_bias``); the engines' fused MoE kernels
        quantize the unscaled SwiGLU output for the second GEMM and weight each expert's OUTPUT in
        the finalize / combine step (docs/engines.md). So the experts run with probabilities 1 (an
        exact no-op on megatron's side: x * 1) and the output is multiplied by the probabilities
        (fp32 product, cast back to the output dtype, as megatron casts its own product): fc2's
        input QDQ then sees what the engine quantizes. Gradients follow this forward (dL/dp =
        <dL/dy, fc2 output>). Unchanged: BF16-activation recipes, ``moe_apply_probs_on_input``
        (top-1, probabilities on fc1's input; warned at build) and the op-fuser path (refused)."""
        cfg = getattr(module, "config", None)
        if (not self.active or self.recipe.activations is None or getattr(module, "_with_fused_impl", False)
                or getattr(cfg, "moe_apply_probs_on_input", False)):
            return original(module, *args, **kwargs)
        if len(args) >= 3:
            probs, args = args[2], (*args[:2], torch.ones_like(args[2]), *args[3:])
        elif "permuted_probs" in kwargs:
            probs, kwargs = kwargs["permuted_probs"], {**kwargs, "permuted_probs": torch.ones_like(kwargs["permuted_probs"])}
        else:
            raise RuntimeError(
                f"MXFP4 fake-QAT recipe {self.recipe.name}: {type(module).__name__}.forward was called without "
                "permuted_probs; cannot move the routing probabilities after fc2 as the engines apply them"
            )
        output, bias = original(module, *args, **kwargs)
        return (output * probs.unsqueeze(-1)).to(output.dtype), bias

    def _check_probs_placement(self, layer) -> None:
        """Under an activation recipe: the layer's experts must go through the patched
        ``TEGroupedMLP.forward`` (else fc2's input QDQ would see probability-scaled values)."""
        experts = layer.experts
        installed = self.patched(EXPERTS)
        if getattr(experts.config, "moe_apply_probs_on_input", False):
            self._warn_once("probs-on-input", (
                f"MXFP4 fake-QAT recipe {self.recipe.name} with moe_apply_probs_on_input=True: the routing "
                "probability scales fc1's input, which the activation QDQ then sees; the engines apply it after fc2"))
            return
        if installed is None or type(experts).forward is not installed:
            raise RuntimeError(
                f"MXFP4 fake-QAT recipe {self.recipe.name} quantizes the expert activations, but "
                f"{type(experts).__module__}.{type(experts).__qualname__} does not run megatron-core's TEGroupedMLP.forward "
                "(patched to apply the routing probabilities after fc2, as the engines do), so fc2's input would be "
                f"quantized with the probabilities in it; use TEGroupedMLP, a BF16-activation recipe, or {FLAG_HINT}"
            )

    # --- per-module state, guards, hooks -------------------------------------------------------------
    def _adopt(self, module) -> ModuleState:
        """First call for ``module`` (or after a re-configuration): the override check of its class
        and a new state with the recipe's weight quantizer."""
        klass = type(module)
        if klass not in self._checked_types:
            check_no_hook_override(klass, self.te_cls)
            self._checked_types.add(klass)
        old = module.__dict__.get(STATE_ATTR)
        if old is not None and old.clock is self.clock:
            return old
        if old is not None:
            old.remove()
        rule = self.recipe.activations
        name = f"{type(module).__name__}(name={getattr(module, 'name', None)!r}) input"
        activations = mxfp4.ActivationFakeQuantizer(rule, self.block_size, name=name) if rule is not None else None
        state = ModuleState(self.clock, module, mxfp4.GroupedFakeQuantizer(self.block_size, rule=self.recipe.weights),
                            activations)
        module.__dict__[STATE_ATTR] = state  # not nn.Module.__setattr__: no submodule / parameter logic
        self.states.add(state)
        return state

    def _remove_states(self) -> None:
        for state in list(self.states):
            state.remove()
        self.states = weakref.WeakSet()

    def _guard(self, module, weights: list) -> None:
        for key, message in check_grouped_linear_forward(module, weights, self.block_size):
            self._warn_once(key, message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _log.warning(message)

    def invalidate(self) -> None:
        """Forget every cached copy (the next forward of each module fake-quantizes again)."""
        self.clock.epoch += 1
        for state in list(self.states):
            state.release()

    def stats(self) -> CacheStats:
        return self.clock.stats()

    def reset_stats(self) -> None:
        self.clock.hits = self.clock.misses = self.clock.uncached = self.clock.refills = 0

    def _before_step(self, optimizer, args, kwargs) -> None:
        self.check_failure(f"{type(optimizer).__name__}.step()")

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.invalidate()
        if self.recorder is not None:
            self.recorder.on_optimizer_step(optimizer)

    # --- INFO lines ----------------------------------------------------------------------------------
    def _announce_activated(self) -> None:
        kernel = config.kernel_choice() or "auto (triton on CUDA, reference elsewhere)"
        activations = self.recipe.activations.name if self.recipe.activations is not None else "bf16"
        _log.info(
            "megatron_qat: MXFP4 fake-QAT active on TEGroupedLinear (routed MoE experts): recipe=%s (weights %s, "
            "activations %s), block_size=%d, kernel=%s, megatron-core %s, transformer-engine %s",
            self.recipe.name, self.recipe.weights.name, activations, self.block_size, kernel,
            megatron_core_version(), transformer_engine_version(),
        )  # fmt: skip
        if self.block_size != DEFAULT_BLOCK_SIZE:
            self._warn_once(
                f"block-size-{self.block_size}",
                f"{config.MXFP4_BLOCK_SIZE}={self.block_size}: the engines' MX kernels implement only block size "
                f"{DEFAULT_BLOCK_SIZE}; {self.block_size} is an ablation and will not match what the rollout engine ships",
            )

    def _announce_model(self, fakes: list) -> None:
        kernel = mxfp4.resolve_impl(fakes[0], None) if fakes else "none"
        _log.info(
            "megatron_qat: model built with MXFP4 fake-QAT: %d TEGroupedLinear modules patched in %d MoELayer(s), "
            "recipe=%s, block_size=%d, kernel=%s",
            self._built_modules, self._built_layers, self.recipe.name, self.block_size, kernel,
        )  # fmt: skip
        self._built_layers = self._built_modules = 0


TE_GROUPED_LINEAR_MODULE = "transformer_engine.pytorch.module.grouped_linear"
_HOOK_SOURCES_READ = ("2.20",)  # TE releases whose GroupedLinear._get_weight_tensors source was read


def hook_reads_parameters(function) -> bool:
    """True when ``function`` is exactly TE's own ``GroupedLinear._get_weight_tensors`` of a release
    in :data:`_HOOK_SOURCES_READ`. TE 2.20.2 ``module/grouped_linear.py:2407-2423``: it returns
    ``[self.weight]`` when a grouped weight is registered, else ``[self.weight0, ..., weightN-1]``,
    dequantizing only ``QuantizedTensorStorage`` weights (which the guards refuse). So while a module
    holds no ``weight`` and its ``weight{i}`` are the kept (guarded, BF16) masters, those masters are
    what it returns, and :meth:`Runtime.weight_tensors` reads them without calling it (TE's own hook
    costs ~23 us of host time at 16 experts on an H100 host). A fork's override or a foreign wrapper
    (which may do more) is always called."""
    te = sys.modules.get(TE_GROUPED_LINEAR_MODULE)
    klass = getattr(te, "GroupedLinear", None)
    if klass is None or klass.__dict__.get("_get_weight_tensors") is not function:
        return False
    version = transformer_engine_version() or ""
    return ".".join(version.split(".")[:2]) in _HOOK_SOURCES_READ


def grouped_linear_forward_class(grouped_linear_cls):
    """The class whose ``forward`` Megatron's ``TEGroupedLinear.forward`` reaches through
    ``super().forward(x, m_splits, is_first_microbatch=...)``: the first base after
    ``grouped_linear_cls`` in its MRO that defines ``forward`` (TE's ``GroupedLinear``)."""
    for klass in grouped_linear_cls.__mro__[1:]:
        if klass is torch.nn.Module or klass is object:
            break
        if "forward" in klass.__dict__:
            return klass
    raise TypeError(
        f"{grouped_linear_cls.__qualname__} has no Transformer Engine base class defining forward(inp, m_splits, "
        "is_first_microbatch=None); cannot record is_first_microbatch for the MXFP4 weight cache"
    )


# --- guards ------------------------------------------------------------------------------------------
# Three moments, plus the subclass-override check (at enable, model build and each class's first
# forward): check_moe_config before MoELayer.__init__, check_built_moe_layer right after it,
# check_grouped_linear_forward when a module's weight set is new. Refusals raise; warnings are
# returned as (key, message) pairs for the runtime to log once.

SINGLE_WEIGHT_MESSAGE = (
    "the single grouped expert weight (config moe_single_grouped_weight=True / "
    "NVTE_GROUPED_LINEAR_SINGLE_PARAM=1: TE hands the hook one GroupedTensor) is not supported by "
    "megatron_qat MXFP4 fake-QAT (megatron-core 0.19 also ties it to use_transformer_engine_op_fuser=True, "
    "which bypasses the weight hook); set moe_single_grouped_weight=False and unset "
    "NVTE_GROUPED_LINEAR_SINGLE_PARAM (discrete weight0..weightN-1), or " + FLAG_HINT
)
_QUANTIZED_TYPE_NAMES = {
    "QuantizedTensor", "QuantizedTensorStorage", "QuantizedTensorBase", "Float8Tensor", "MXFP8Tensor",
    "NVFP4Tensor", "Float8BlockwiseQTensor",
}  # fmt: skip
_GROUPED_TYPE_NAMES = {"GroupedTensor", "GroupedTensorStorage"}
_CONFIG_REFUSALS = (
    ("use_transformer_engine_op_fuser", "the TE op-fuser grouped MLP reads weight0..N-1 itself and never calls "
     "TEGroupedLinear._get_weight_tensors; set use_transformer_engine_op_fuser=False"),
    ("moe_use_legacy_grouped_gemm", "legacy GroupedMLP (moe_use_legacy_grouped_gemm=True) does not use "
     "TEGroupedLinear; set moe_use_legacy_grouped_gemm=False"),
    ("delay_wgrad_compute", "delayed wgrad (delay_wgrad_compute=True) re-calls the weight hook in backward_dw() "
     "and sets .grad on the fake tensors, so the master weights would never get it; set delay_wgrad_compute=False"),
    ("overlap_dispatch_backward_with_experts_wgrad", "overlap_dispatch_backward_with_experts_wgrad=True delays "
     "the expert wgrad (same problem as delay_wgrad_compute); turn it off"),
    ("fp8_param", "FP8 primary weights (fp8_param / --fp8-param-gather) hand the hook quantized tensors, not BF16 "
     "master weights; turn fp8_param off"),
)  # fmt: skip
_FP8_WARNING = (
    "MXFP4 fake-QAT with an FP8/FP4 compute recipe: Transformer Engine re-quantizes the fake-quantized expert "
    "weights for its GEMM, so the GEMM does not see the exact MXFP4 values"
)


def _type_names(obj) -> set[str]:
    return {klass.__name__ for klass in type(obj).__mro__}


def is_quantized_tensor(tensor) -> bool:
    """True for Transformer Engine quantized tensors (FP8/MXFP8/NVFP4), by class name (no TE import)."""
    return bool(_type_names(tensor) & _QUANTIZED_TYPE_NAMES)


def _truthy_setting(value) -> bool:
    return bool(value() if callable(value) else value)


def check_moe_config(config) -> list[tuple[str, str]]:
    """Before a ``MoELayer`` is built: refuse switches that bypass or break the weight hook; returns
    the warnings. The single grouped weight goes first (its message names both switches to turn off)."""
    if _truthy_setting(getattr(config, "moe_single_grouped_weight", False)):
        raise NotImplementedError(SINGLE_WEIGHT_MESSAGE)
    for name, why in _CONFIG_REFUSALS:
        if _truthy_setting(getattr(config, name, False)):
            raise RuntimeError(f"MXFP4 fake-QAT cannot apply: {why}; or {FLAG_HINT}")
    if getattr(config, "fp8", None) or getattr(config, "fp4", None):
        return [("fp8-recipe", _FP8_WARNING)]
    return []


def _describe_layer(layer) -> str:
    number = getattr(layer, "layer_number", None)
    return f"{type(layer).__name__}(layer_number={number})" if number is not None else type(layer).__name__


def k_error(where: str, shape, block_size: int, config=None) -> ValueError:
    """The error for an in_features (K) that is not a multiple of the block size."""
    ffn = getattr(config, "moe_ffn_hidden_size", None)
    etp = getattr(config, "expert_tensor_parallel_size", None)
    return ValueError(
        f"MXFP4 fake-QAT: {where} weight has shape {list(shape)} = [out_features, in_features]; in_features "
        f"K={shape[-1]} is not a multiple of block_size={block_size}. For linear_fc1 K is hidden_size; for "
        f"linear_fc2 K is moe_ffn_hidden_size / expert-tensor-parallel size (here moe_ffn_hidden_size={ffn}, "
        f"expert_tensor_parallel_size={etp}). Choose sizes with K % {block_size} == 0, or {FLAG_HINT}"
    )


def check_built_moe_layer(layer, grouped_linear_cls, block_size: int) -> int:
    """After ``MoELayer.__init__``: the routed experts contain ``TEGroupedLinear`` modules whose hook
    is not shadowed, each with K % block_size == 0. Returns how many there are."""
    experts = getattr(layer, "experts", None)
    cfg = getattr(layer, "config", None)
    grouped = (
        [(name, m) for name, m in experts.named_modules() if isinstance(m, grouped_linear_cls)] if experts is not None else []
    )
    if not grouped:
        raise RuntimeError(
            f"MXFP4 fake-QAT cannot apply to {_describe_layer(layer)}: its experts are "
            f"{type(experts).__name__}, which does not go through TEGroupedLinear._get_weight_tensors "
            f"(moe_grouped_gemm={getattr(cfg, 'moe_grouped_gemm', '?')}: False builds SequentialMLP; "
            f"moe_use_legacy_grouped_gemm={getattr(cfg, 'moe_use_legacy_grouped_gemm', '?')}: True builds "
            "GroupedMLP; inference builds InferenceGroupedMLP). Use --moe-grouped-gemm with the Transformer "
            f"Engine spec (TEGroupedMLP), or {FLAG_HINT}"
        )
    if getattr(experts, "_with_fused_impl", False):
        raise RuntimeError(
            f"MXFP4 fake-QAT cannot apply to {_describe_layer(layer)}: its TEGroupedMLP uses the TE op fuser "
            f"(use_transformer_engine_op_fuser=True), which bypasses the weight hook; turn it off, or {FLAG_HINT}"
        )
    for name, module in grouped:
        check_no_hook_override(type(module), grouped_linear_cls)
        k = getattr(module, "in_features", None)
        if k is not None and k % block_size:
            raise k_error(f"{_describe_layer(layer)}.experts.{name}", [getattr(module, "out_features", "?"), k],
                          block_size, cfg)  # fmt: skip
    return len(grouped)


def check_no_hook_override(klass, grouped_linear_cls) -> None:
    """Refuse ``klass`` when a class between it and ``TEGroupedLinear`` defines its own
    ``_get_weight_tensors``: that override shadows the wrapper, which would never run for it."""
    if grouped_linear_cls is None:
        return
    for sub in klass.__mro__:
        if sub is grouped_linear_cls:
            return
        if "_get_weight_tensors" in sub.__dict__:
            raise RuntimeError(
                f"MXFP4 fake-QAT: {sub.__module__}.{sub.__qualname__} overrides _get_weight_tensors, so the wrapper "
                f"installed on {grouped_linear_cls.__qualname__} would not run for it; move that override onto "
                f"TEGroupedLinear (the wrapper then runs after it), or {FLAG_HINT}"
            )


def _check_subclass_overrides(cls) -> None:
    pending = list(cls.__subclasses__())
    while pending:
        sub = pending.pop()
        pending.extend(sub.__subclasses__())
        check_no_hook_override(sub, cls)


def check_grouped_linear_forward(module, weights: list, block_size: int) -> list[tuple[str, str]]:
    """When a patched module's weight set is new, before anything is quantized: refuse delayed wgrad,
    the single grouped weight, quantized primary weights, Megatron-FSDP and GTP weights, and a K that
    is not a multiple of the block size. Returns the warnings."""
    cfg = getattr(module, "config", None)
    delay = getattr(module, "delay_wgrad_compute", None)
    if delay is None:
        delay = getattr(cfg, "delay_wgrad_compute", False)
    store = getattr(module, "wgrad_store", None)
    if _truthy_setting(delay) or (store is not None and _truthy_setting(getattr(store, "delay_wgrad_compute", False))):
        raise RuntimeError(
            f"MXFP4 fake-QAT: {type(module).__name__} has delay_wgrad_compute on; backward_dw() would re-call "
            f"the weight hook and the master weights would never receive their gradient; turn it off, or {FLAG_HINT}"
        )
    if len(weights) == 1 and (getattr(module, "num_gemms", 1) > 1 or weights[0].dim() != 2) or any(
        _type_names(w) & _GROUPED_TYPE_NAMES for w in weights
    ):
        raise NotImplementedError(SINGLE_WEIGHT_MESSAGE)
    params = list(module.parameters(recurse=False))
    if getattr(module, "primary_weights_in_fp8", False) or _truthy_setting(getattr(cfg, "fp8_param", False)) or any(
        is_quantized_tensor(t) for t in params + list(weights)
    ):
        raise RuntimeError(
            f"MXFP4 fake-QAT: {type(module).__name__} holds FP8/quantized primary weights (fp8_param / "
            f"--fp8-param-gather / TE fp8_model_init); BF16 master weights are required; {FLAG_HINT}"
        )
    for t in params + list(weights):
        if hasattr(t, "__fsdp_param__"):
            raise RuntimeError(
                "MXFP4 fake-QAT does not support Megatron-FSDP parameters (__fsdp_param__): they take main_grad "
                f"through get_main_grad; use Megatron DDP (optionally with the distributed optimizer), or {FLAG_HINT}"
            )
        if getattr(t, "is_distributed_weight", False):
            raise RuntimeError(
                "MXFP4 fake-QAT does not support TE distributed (GTP) weights (is_distributed_weight): TE "
                f"materializes and reduces them itself; turn that sharding off, or {FLAG_HINT}"
            )
    for i, w in enumerate(weights):
        if w.shape[-1] % block_size:
            raise k_error(f"{type(module).__name__}(name={getattr(module, 'name', None)!r}) weight{i}", tuple(w.shape),
                          block_size, cfg)  # fmt: skip
    if getattr(module, "fp8", False):
        return [("fp8-module", "MXFP4 fake-QAT inside an FP8/FP4 autocast: Transformer Engine re-quantizes the "
                 "fake-quantized expert weights for its GEMM, so the GEMM does not see the exact MXFP4 values")]
    return []


__all__ = [
    "Runtime",
    "HOOK",
    "FORWARD",
    "MOE_INIT",
    "EXPERTS",
    "FakeQATUnavailableError",
    "grouped_linear_forward_class",
    "hook_reads_parameters",
    "check_moe_config",
    "check_built_moe_layer",
    "check_no_hook_override",
    "check_grouped_linear_forward",
    "k_error",
    "is_quantized_tensor",
    "SINGLE_WEIGHT_MESSAGE",
]
