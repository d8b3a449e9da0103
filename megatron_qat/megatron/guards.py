"""Refuse configurations in which the fake-QAT would be wrong or silently inactive.

Three moments (plus the subclass-override check, :func:`check_no_hook_override`, run at ``enable()``,
at model build and on the first patched forward of each class):

- :func:`check_moe_config` before ``MoELayer.__init__`` (config switches);
- :func:`check_built_moe_layer` right after it (do the routed experts go through
  ``TEGroupedLinear._get_weight_tensors``? is every K a multiple of the block size?);
- :func:`check_grouped_linear_forward` on every forward of a patched ``TEGroupedLinear`` (attributes
  that appear only once the model is wrapped: Megatron-FSDP, GTP, quantized primary weights).

Every refusal raises; the FP8/FP4 compute recipe only warns once (TE re-quantizes the fake weights
for its GEMM, so the GEMM does not see the exact MXFP4 grid).
"""

from __future__ import annotations

import logging

_log = logging.getLogger("megatron_qat")
_warned: set[str] = set()

FLAG_HINT = "unset OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG (or call megatron_qat.disable()) to train without fake-QAT"
SINGLE_WEIGHT_MESSAGE = (
    "the single grouped expert weight (config moe_single_grouped_weight=True / "
    "NVTE_GROUPED_LINEAR_SINGLE_PARAM=1: TE hands the hook one GroupedTensor) is not supported by "
    "megatron_qat MXFP4 fake-QAT (megatron-core 0.19 also ties it to use_transformer_engine_op_fuser=True, "
    "which bypasses the weight hook); set moe_single_grouped_weight=False and unset "
    "NVTE_GROUPED_LINEAR_SINGLE_PARAM (discrete weight0..weightN-1), or " + FLAG_HINT
)
_QUANTIZED_TYPE_NAMES = {
    "QuantizedTensor",
    "QuantizedTensorStorage",
    "QuantizedTensorBase",
    "Float8Tensor",
    "MXFP8Tensor",
    "NVFP4Tensor",
    "Float8BlockwiseQTensor",
}
_GROUPED_TYPE_NAMES = {"GroupedTensor", "GroupedTensorStorage"}


def _type_names(obj) -> set[str]:
    return {klass.__name__ for klass in type(obj).__mro__}


def is_quantized_tensor(tensor) -> bool:
    """True for Transformer Engine quantized tensors (FP8/MXFP8/NVFP4 primary weights), by class name
    so that the check works without importing TE."""
    return bool(_type_names(tensor) & _QUANTIZED_TYPE_NAMES)


def _truthy_setting(value) -> bool:
    if callable(value):
        value = value()
    return bool(value)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        _log.warning(message)


def check_moe_config(config) -> None:
    """Before a ``MoELayer`` is built: refuse config switches that bypass or break the weight hook."""
    refusals = [
        ("use_transformer_engine_op_fuser", "the TE op-fuser grouped MLP reads weight0..N-1 itself and never calls "
         "TEGroupedLinear._get_weight_tensors; set use_transformer_engine_op_fuser=False"),
        ("moe_use_legacy_grouped_gemm", "legacy GroupedMLP (moe_use_legacy_grouped_gemm=True) does not use "
         "TEGroupedLinear; set moe_use_legacy_grouped_gemm=False"),
        ("delay_wgrad_compute", "delayed wgrad (delay_wgrad_compute=True) re-calls the weight hook in "
         "backward_dw() and sets .grad on the fake tensors, so the master weights would never get it; set "
         "delay_wgrad_compute=False"),
        ("overlap_dispatch_backward_with_experts_wgrad", "overlap_dispatch_backward_with_experts_wgrad=True delays "
         "the expert wgrad (same problem as delay_wgrad_compute); turn it off"),
        ("fp8_param", "FP8 primary weights (fp8_param / --fp8-param-gather) hand the hook quantized tensors, not "
         "BF16 master weights; turn fp8_param off"),
    ]
    # First: megatron-core 0.19 accepts the single grouped weight only together with the op fuser,
    # and the single-weight message is the one that names both switches to turn off.
    if _truthy_setting(getattr(config, "moe_single_grouped_weight", False)):
        raise NotImplementedError(SINGLE_WEIGHT_MESSAGE)
    for name, why in refusals:
        if _truthy_setting(getattr(config, name, False)):
            raise RuntimeError(f"MXFP4 fake-QAT cannot apply: {why}; or {FLAG_HINT}")
    if getattr(config, "fp8", None) or getattr(config, "fp4", None):
        _warn_once(
            "fp8-recipe",
            "MXFP4 fake-QAT with an FP8/FP4 compute recipe: Transformer Engine re-quantizes the fake-quantized "
            "expert weights for its GEMM, so the GEMM does not see the exact MXFP4 values",
        )


def _describe_layer(layer) -> str:
    number = getattr(layer, "layer_number", None)
    return f"{type(layer).__name__}(layer_number={number})" if number is not None else type(layer).__name__


def k_error(where: str, shape, block_size: int, config=None) -> ValueError:
    """The error for an in_features (K) that is not a multiple of the MXFP4 block size."""
    ffn = getattr(config, "moe_ffn_hidden_size", None)
    etp = getattr(config, "expert_tensor_parallel_size", None)
    return ValueError(
        f"MXFP4 fake-QAT: {where} weight has shape {list(shape)} = [out_features, in_features]; in_features "
        f"K={shape[-1]} is not a multiple of block_size={block_size}. For linear_fc1 K is hidden_size; for "
        f"linear_fc2 K is moe_ffn_hidden_size / expert-tensor-parallel size (here moe_ffn_hidden_size={ffn}, "
        f"expert_tensor_parallel_size={etp}). Choose sizes with K % {block_size} == 0, or {FLAG_HINT}"
    )


def check_built_moe_layer(layer, grouped_linear_cls, block_size: int) -> int:
    """After ``MoELayer.__init__``: the routed experts must contain ``TEGroupedLinear`` modules
    (whose ``_get_weight_tensors`` is patched, not shadowed by a subclass override) and each of them
    must have K % block_size == 0. Returns how many there are."""
    experts = getattr(layer, "experts", None)
    config = getattr(layer, "config", None)
    grouped = [(name, m) for name, m in experts.named_modules() if isinstance(m, grouped_linear_cls)] if experts is not None else []
    if not grouped:
        raise RuntimeError(
            f"MXFP4 fake-QAT cannot apply to {_describe_layer(layer)}: its experts are "
            f"{type(experts).__name__}, which does not go through TEGroupedLinear._get_weight_tensors "
            f"(moe_grouped_gemm={getattr(config, 'moe_grouped_gemm', '?')}: False builds SequentialMLP; "
            f"moe_use_legacy_grouped_gemm={getattr(config, 'moe_use_legacy_grouped_gemm', '?')}: True builds "
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
            shape = [getattr(module, "out_features", "?"), k]
            raise k_error(f"{_describe_layer(layer)}.experts.{name}", shape, block_size, config)
    return len(grouped)


def check_no_hook_override(klass, grouped_linear_cls) -> None:
    """Refuse ``klass`` (a subclass of ``TEGroupedLinear``, defined before or after ``enable()``) when a
    class between it and ``TEGroupedLinear`` defines its own ``_get_weight_tensors``: that override
    shadows the wrapper installed on ``TEGroupedLinear``, which would then never run for it."""
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


def check_grouped_linear_forward(module, weights: list, block_size: int) -> None:
    """On each forward of a patched grouped linear layer, before anything is quantized."""
    config = getattr(module, "config", None)
    delay = getattr(module, "delay_wgrad_compute", None)
    if delay is None:
        delay = getattr(config, "delay_wgrad_compute", False)
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
    if getattr(module, "primary_weights_in_fp8", False) or _truthy_setting(getattr(config, "fp8_param", False)) or any(
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
            where = f"{type(module).__name__}(name={getattr(module, 'name', None)!r}) weight{i}"
            raise k_error(where, tuple(w.shape), block_size, config)
    if getattr(module, "fp8", False):
        _warn_once(
            "fp8-module",
            "MXFP4 fake-QAT inside an FP8/FP4 autocast: Transformer Engine re-quantizes the fake-quantized expert "
            "weights for its GEMM, so the GEMM does not see the exact MXFP4 values",
        )
