"""Stream MXFP4 expert weights out of a live Megatron model (any EP / expert-TP / PP).

:func:`export_mxfp4` walks the model chunks of THIS pipeline stage, finds every routed-expert
``TEGroupedMLP`` (a module whose ``linear_fc1`` and ``linear_fc2`` are megatron-core
``TEGroupedLinear``), and per layer:

1. encodes each module's local BF16 master weights (``weight0..N-1`` or the single grouped
   ``weight``, NOT the fake-quantized tensors the patched ``_get_weight_tensors`` returns) with
   the training numerics (:func:`megatron_qat.export.codec.quantize_experts`, one call per
   module), so the decoded bytes equal the forward's ``fake_quantize(W)`` bit for bit;
2. gathers codes and scale bytes over expert-TP then EP (:mod:`megatron_qat.export.gather`):
   fc1 with the GLU re-split, fc2 along K (refused unless ``(moe_ffn_hidden_size / ETP) % 32 == 0``);
3. yields the layer's engine-ready ``(name, tensor)`` pairs (:mod:`megatron_qat.export.formats`)
   before touching the next layer, so peak memory is one layer's experts (plus one module's
   local codes).

Layer numbers are global: the nearest ancestor with ``layer_number`` (megatron-core
``TransformerLayer``: 1-based, pipeline offset included) gives ``layer_number - 1``. Every rank of
the expert grid must call the generator and iterate it to the end (the gathers are collectives);
with ``dst`` set, only that rank receives tensors, the others iterate an empty stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from ..mxfp4.payload import MXPayload
from ..numerics.rules import Recipe, Rule
from .codec import ExportError, check_in_features, quantize_experts
from .formats import LayerBytes, check_format, check_numerics, emit_layer
from .gather import ExpertGroups, gather_experts, group_size, groups_from_parallel_state, locate


@dataclass
class ExpertsModule:
    """One routed-expert MLP found in the model."""

    name: str  # module path inside its chunk
    module: torch.nn.Module  # the TEGroupedMLP
    layer: int  # global 0-based layer index


def _te_grouped_linear_cls():
    try:
        import megatron.core.extensions.transformer_engine as ext
    except ImportError as exc:
        raise ExportError(f"megatron-core is needed to export a live Megatron model ({exc})") from exc
    cls = getattr(ext, "TEGroupedLinear", None)
    if cls is None:
        raise ExportError(
            "megatron.core.extensions.transformer_engine.TEGroupedLinear is None (Transformer Engine is not "
            "installed), so the model has no TEGroupedLinear experts to export"
        )
    return cls


def find_expert_modules(chunks: Iterable[torch.nn.Module]) -> list[ExpertsModule]:
    """Every TEGroupedMLP of the chunks, in chunk order then module order.

    Refuses (ExportError) routed experts that are not TEGroupedLinear-based (SequentialMLP's
    ``local_experts``) and an experts module with no ``layer_number`` ancestor."""
    cls = _te_grouped_linear_cls()
    found = []
    for chunk in chunks:
        modules = dict(chunk.named_modules())
        for name, m in modules.items():
            if hasattr(m, "local_experts") and isinstance(getattr(m, "local_experts"), torch.nn.ModuleList):
                raise ExportError(
                    f"{name}: SequentialMLP experts (local_experts) are not exported; build the model with "
                    "moe_grouped_gemm=True (TEGroupedMLP)"
                )
            fc1, fc2 = getattr(m, "linear_fc1", None), getattr(m, "linear_fc2", None)
            if not (isinstance(fc1, cls) and isinstance(fc2, cls)):
                continue
            found.append(ExpertsModule(name, m, _global_layer(name, modules)))
    return found


def _global_layer(name: str, modules: dict) -> int:
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = modules.get(".".join(parts[:cut]))
        number = getattr(owner, "layer_number", None)
        if isinstance(number, int):
            return number - 1
    raise ExportError(f"{name}: no enclosing module with a layer_number (megatron TransformerLayer); cannot name its layer")


def raw_weights(linear: torch.nn.Module) -> list[torch.Tensor]:
    """The BF16 master weights of a TEGroupedLinear, ``[out, in]`` each, local expert order."""
    params = linear._parameters
    if "weight" in params and params["weight"] is not None:
        w = params["weight"]
        return list(w.detach().unbind(0)) if w.dim() == 3 else [w.detach()]
    n = int(linear.num_gemms)
    missing = [i for i in range(n) if params.get(f"weight{i}") is None]
    if missing:
        raise ExportError(f"TEGroupedLinear has num_gemms={n} but no weight{missing[0]} parameter")
    return [params[f"weight{i}"].detach() for i in range(n)]


def raw_biases(linear: torch.nn.Module, n: int) -> torch.Tensor | None:
    """Stacked ``bias0..N-1`` ``[N, out]`` when the module has non-empty biases, else None."""
    params = linear._parameters
    biases = [params.get(f"bias{i}") for i in range(n)]
    if all(b is None or b.numel() == 0 for b in biases):
        return None
    if any(b is None or b.numel() == 0 for b in biases):
        raise ExportError("TEGroupedLinear has biases for some experts only")
    return torch.stack([b.detach() for b in biases])


def groups_for(experts: torch.nn.Module, groups: ExpertGroups | None) -> ExpertGroups:
    """``groups``, else the expert-TP / EP groups ``experts`` (a TEGroupedMLP) was built with, else
    megatron's ``parallel_state``."""
    if groups is not None:
        return groups
    if hasattr(experts, "ep_group") and hasattr(experts, "tp_group"):
        # the groups the TEGroupedMLP was built with (pg_collection.ep / .expt_tp; None = size 1)
        return ExpertGroups(etp=experts.tp_group, ep=experts.ep_group)
    return groups_from_parallel_state()


def gather_payload(payload: MXPayload, kind: str, groups: ExpertGroups, where, glu: bool) -> MXPayload | None:
    """:func:`~megatron_qat.export.gather.gather_experts` of codes and scales alike (``None`` on a
    rank that receives nothing)."""
    codes = gather_experts(payload.codes, kind, groups, where, glu=glu)
    scales = gather_experts(payload.scales, kind, groups, where, glu=glu)
    return None if codes is None else MXPayload(codes, scales, payload.block_size, payload.rule)


def _layer_bytes(item: ExpertsModule, groups: ExpertGroups, where, block_size: int, rule: Rule, impl) -> LayerBytes | None:
    m = item.module
    config = m.config
    if getattr(config, "moe_mlp_glu_interleave_size", None):
        raise ExportError(f"{item.name}: moe_mlp_glu_interleave_size is set; only the [gate; up] fc1 layout is exported")
    glu = bool(config.gated_linear_unit)
    etp = group_size(groups.etp)
    out = {}
    for role, kind in (("fc1", "column"), ("fc2", "row")):
        linear = getattr(m, f"linear_{role}")
        weights = raw_weights(linear)
        names = [f"{item.name}.linear_{role}.weight{i}" for i in range(len(weights))]
        if role == "fc2":
            check_in_features(names[0], weights[0].shape[-1], block_size, shard=etp > 1)
        try:
            payload = quantize_experts(weights, names, block_size, rule=rule, impl=impl)
            error = None
        except ExportError as exc:  # re-raised below on every rank of the grid (no rank left waiting)
            error, payload = exc, None
        _agree_or_raise(error, groups, names[0])
        out[role] = gather_payload(payload, kind, groups, where, glu and role == "fc1")
        del payload
        bias = raw_biases(linear, len(weights))
        bias_kind = "column" if role == "fc1" else "replicated"
        out[f"{role}_bias"] = None if bias is None else gather_experts(bias, bias_kind, groups, where, glu=glu and role == "fc1")
    if out["fc1"] is None:
        return None
    return LayerBytes(item.layer, glu, **out)


def _agree_or_raise(error: ExportError | None, groups: ExpertGroups, name: str) -> None:
    """Every rank of the grid learns whether any rank refused its local weights; all raise then,
    so no rank is left blocked in a gather. The refusing rank raises its own one-line message."""
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
    import torch.distributed as dist

    for group in (groups.etp, groups.ep):
        if group_size(group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if error is not None:
        raise error
    if int(flag[0]):
        raise ExportError(f"{name}: another rank of the expert grid refused its local expert weights (see its error)")


def export_mxfp4(
    model,
    fmt: str = "raw",
    *,
    family: str | None = None,
    groups: ExpertGroups | None = None,
    dst: int | None = None,
    block_size: int | None = None,
    rule: Rule | None = None,
    impl: str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every routed-expert weight of this stage, one layer at a time.

    Args:
        model: a module or a list of model chunks (virtual pipeline stages) of this PP stage.
        fmt: ``"gpt-oss"``, ``"compressed-tensors"`` or ``"raw"`` (:mod:`~.formats`).
        family: checkpoint family naming the compressed-tensors tensors (``qwen3_moe``,
            ``deepseek_v3``, ...; see :data:`megatron_qat.layouts.FAMILIES`).
        groups: expert-TP / EP groups; default: the groups each experts module was built with
            (``ep_group`` / ``tp_group`` of megatron's TEGroupedMLP, i.e. its ``pg_collection``),
            else megatron's ``parallel_state``.
        dst: ``None``: every rank of the expert grid receives every tensor (all_gather); a global
            rank of the grid: only it receives (gather), the others yield nothing.
        block_size, rule: ``None``: what the fake-QAT forward uses (:func:`training_numerics`: the
            running fake-QAT's block size and its recipe's weight rule, else
            ``OPEN_TRAINING_MXFP4_BLOCK_SIZE`` / ``MEGATRON_QAT_RECIPE``). The engine formats take only
            32-element E2M1 blocks (raw takes any).
        impl: numerics implementation (``None`` = dispatch default, as in training).
    Raises:
        ExportError: no TEGroupedMLP in the model, a non-finite weight, fc2's local K not a
            multiple of 32, a format/family mismatch, ``dst`` outside the grid.
    """
    check_format(fmt, family)
    trained_block_size, trained_recipe = training_numerics()
    block_size = trained_block_size if block_size is None else block_size
    rule = trained_recipe.weights if rule is None else rule
    check_numerics(fmt, block_size, rule)
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    items = find_expert_modules(chunks)
    if not items:
        raise ExportError("no routed-expert TEGroupedMLP (linear_fc1/linear_fc2 TEGroupedLinear) found in the model")
    where_of = {}
    for item in items:
        g = groups_for(item.module, groups)
        key = (id(g.etp), id(g.ep))
        if key not in where_of:
            where_of[key] = locate(dst, g)
        data = _layer_bytes(item, g, where_of[key], block_size, rule, impl)
        if data is not None:
            yield from emit_layer(data, fmt, family)
        del data


def training_numerics() -> tuple[int, Recipe]:
    """``(block size, recipe)`` the fake-QAT forward uses (its ``recipe.weights`` is the weight rule):
    those of the running fake-QAT (:func:`megatron_qat.megatron.current`), else the environment's
    (``OPEN_TRAINING_MXFP4_BLOCK_SIZE``, default 32; ``MEGATRON_QAT_RECIPE``, default
    ``flashinfer-w4a16``, whose weight rule is FLASHINFER_MXFP4)."""
    from ..config import from_env
    from ..megatron import current
    from ..numerics.rules import RECIPES

    runtime = current()
    if runtime is not None and runtime.active:
        return runtime.block_size, runtime.recipe
    cfg = from_env()
    return cfg.block_size, RECIPES[cfg.recipe]


__all__ = ["export_mxfp4", "find_expert_modules", "ExpertsModule", "raw_weights", "raw_biases", "groups_for",
           "gather_payload", "training_numerics"]
