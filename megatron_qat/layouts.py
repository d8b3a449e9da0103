"""Checkpoint-family layouts of routed-expert weights: the one table parity and export read.

For each routed-expert tensor of a checkpoint, :func:`classify` says which stored dimension is
``in_features`` (MXFP4 blocks of 32 ALWAYS run along it), which is the expert axis of a fused 3-D
tensor, the tensor's role, and how gate/up share a fused ``gate_up`` / ``fc1`` output dimension.
A fused 3-D tensor whose family is unknown is refused (:class:`LayoutError`, naming ``--layout``):
the same name means ``[E, in, out]`` in gpt-oss and ``[E, out, in]`` in transformers-v5 Qwen3-MoE,
so the name alone cannot decide and nothing here guesses from shapes.

The table (verified against transformers 5.24 ``modeling_*.py`` and what ``save_pretrained``
writes; tests/test_layouts.py saves tiny models with the real classes and checks every entry;
transformers itself marks ``GptOssExperts`` ``use_experts_implementation(is_concatenated=False,
is_transposed=True)`` and the others with the defaults, concatenated and not transposed):

==============  ==========================================================  ===========  ==========
family          stored tensor (``model.layers.L.`` prefix)                   shape        in_dim
==============  ==========================================================  ===========  ==========
any HF          ``...experts.N.{gate_proj,up_proj,down_proj}.weight``        ``[out, in]``  1
                (Qwen3-MoE, Qwen2-MoE, DeepSeek-V2/V3 ``save_pretrained``)
any HF          ``block_sparse_moe.experts.N.{w1=gate,w3=up,w2=down}.weight`` ``[out, in]``  1
                (Mixtral ``save_pretrained``)
qwen3_moe,      ``mlp.experts.gate_up_proj``  (gate/up CONCAT, ``chunk(2)``)  ``[E, 2I, H]`` 2
qwen2_moe,      ``mlp.experts.down_proj``                                    ``[E, H, I]``  2
deepseek_v3/v2, (the transformers-v5 in-memory layout, ``F.linear(x, w[e])``;
mixtral         ``save_pretrained`` converts back to per-expert, but a raw
                ``state_dict()`` dump stores it)
gpt_oss         ``mlp.experts.gate_up_proj`` (gate/up INTERLEAVED, even=gate) ``[E, H, 2I]`` 1
                ``mlp.experts.down_proj``  (``x @ w[e]``; stored as is)       ``[E, I, H]``  1
llama4          ``feed_forward.experts.gate_up_proj`` (CONCAT, ``chunk(2)``)  ``[E, H, 2I]`` 1
                ``feed_forward.experts.down_proj`` (``torch.bmm(x, w)``)      ``[E, I, H]``  1
megatron        ``...experts.linear_fc{1,2}.weightN`` (TEGroupedLinear)       ``[out, in]``  1
                ``...experts.linear_fc{1,2}.weight`` (single grouped weight)  ``[N, out, in]`` 2
                ``...experts.local_experts.N.linear_fc{1,2}.weight``         ``[out, in]``  1
                (SequentialMLP). fc1 of a gated MLP is ``[gate; up]`` CONCAT
                along out (per expert-TP shard: ``[gate_shard; up_shard]``)
==============  ==========================================================  ===========  ==========

Megatron names (``linear_fc1`` / ``linear_fc2`` under ``experts``) exist only in Megatron, so
they are classified as ``megatron`` whatever family is given; per-expert HF ``nn.Linear``
weights are ``[out, in]`` in every family (PyTorch's convention), so they need no family either.
gpt-oss biases (``*_bias``) and MXFP4 storage (``*_blocks`` / ``*_scales``) are not weights here.
DBRX-style fused ``experts.mlp.w1/w2/w3`` is not in the table and is refused.

Torch-light: importing this module imports nothing but the standard library.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from .tools.errors import ToolError

# --layout values. Order: the families whose fused tensors differ first (docs list them so).
FAMILIES: tuple[str, ...] = ("gpt_oss", "llama4", "qwen3_moe", "qwen2_moe", "deepseek_v3", "deepseek_v2", "mixtral", "megatron")

ROLES = ("gate", "up", "down", "gate_up", "fc1", "fc2")


class LayoutError(ToolError, ValueError):
    """A tensor's layout cannot be determined (unknown family, ambiguous fused tensor, or a shape
    that contradicts the family). One-line message naming ``--layout`` and the accepted values."""


@dataclass(frozen=True)
class _Family:
    fused: str | None  # "in_out": fused 3-D [E, in, out]; "out_in": [E, out, in]; None: no HF fused tensors
    glu: str | None  # how gate/up share the fused gate_up out dim: "interleaved" | "concat"
    model_types: tuple[str, ...]
    arch_prefixes: tuple[str, ...]  # config.json "architectures" entries starting with one of these


_TABLE: dict[str, _Family] = {
    "gpt_oss": _Family("in_out", "interleaved", ("gpt_oss",), ("GptOss",)),
    "llama4": _Family("in_out", "concat", ("llama4", "llama4_text"), ("Llama4",)),
    "qwen3_moe": _Family("out_in", "concat", ("qwen3_moe",), ("Qwen3Moe",)),
    "qwen2_moe": _Family("out_in", "concat", ("qwen2_moe",), ("Qwen2Moe",)),
    "deepseek_v3": _Family("out_in", "concat", ("deepseek_v3",), ("DeepseekV3",)),
    "deepseek_v2": _Family("out_in", "concat", ("deepseek_v2",), ("DeepseekV2",)),
    "mixtral": _Family("out_in", "concat", ("mixtral",), ("Mixtral",)),
    "megatron": _Family(None, None, (), ()),
}
assert tuple(_TABLE) == FAMILIES

_ACCEPTED = ", ".join(FAMILIES)
_PER_EXPERT_ROLE = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_MEGATRON_TE = re.compile(r"(?:^|\.)experts\.linear_fc([12])\.weight(\d*)$")
_MEGATRON_SEQ = re.compile(r"(?:^|\.)experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")
_HF_PER_EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_HF_FUSED = re.compile(r"(?:^|\.)experts\.(gate_up_proj|down_proj)(?:\.weight)?$")
_DBRX_FUSED = re.compile(r"(?:^|\.)experts\.(?:mlp\.)?(w1|w2|w3)(?:\.weight)?$")


@dataclass(frozen=True)
class ExpertTensor:
    """Where a routed-expert tensor's axes are. Dims are non-negative indices into the STORED shape.

    ``family``: the table row that decided (``None``: an ``nn.Linear`` ``[out, in]`` per-expert
    weight classified without a family). ``expert``: the expert index for per-expert tensors
    (``None`` for fused ones, whose ``expert_dim`` is 0). ``glu``: for ``gate_up`` (and Megatron
    ``fc1`` when the model is gated) how gate and up share the out dim: ``"interleaved"``
    (even = gate) or ``"concat"`` (first half = gate); ``None`` for every other role."""

    name: str
    family: str | None
    role: str
    layer: int | None
    expert: int | None
    in_dim: int
    out_dim: int
    expert_dim: int | None
    glu: str | None

    @property
    def fused(self) -> bool:
        return self.expert_dim is not None


def check_family(family: str | None) -> str | None:
    """``family`` if it is ``None`` or one of :data:`FAMILIES`, else LayoutError."""
    if family is not None and family not in _TABLE:
        raise LayoutError(f"--layout {family!r}: unknown checkpoint family (accepted: {_ACCEPTED})")
    return family


def family_from_config(config: dict) -> str:
    """The family of an HF ``config.json`` (its ``model_type`` and ``architectures``).

    LayoutError when neither is known, when they disagree, or when ``config`` is not a dict."""
    if not isinstance(config, dict):
        raise LayoutError(f"config.json must hold a JSON object, got {type(config).__name__}; pass --layout (accepted: {_ACCEPTED})")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    archs = archs if isinstance(archs, list) else [archs]
    by_type = next((f for f, row in _TABLE.items() if model_type in row.model_types), None)
    by_arch = sorted({f for a in archs if isinstance(a, str) for f, row in _TABLE.items() if row.arch_prefixes and a.startswith(row.arch_prefixes)})
    if by_type and by_arch and by_arch != [by_type]:
        raise LayoutError(
            f"config.json model_type {model_type!r} means {by_type} but architectures {archs} mean {', '.join(by_arch)}; "
            f"pass --layout (accepted: {_ACCEPTED})"
        )
    if by_type:
        return by_type
    if len(by_arch) == 1:
        return by_arch[0]
    raise LayoutError(
        f"config.json model_type {model_type!r} / architectures {archs} is not a known checkpoint family; "
        f"pass --layout (accepted: {_ACCEPTED})"
    )


def _stored(family: str) -> str:
    row = _TABLE[family]
    axes = "[E, in, out]" if row.fused == "in_out" else "[E, out, in]"
    return f"fused experts {axes} with gate/up {'interleaved' if row.glu == 'interleaved' else 'concatenated'}"


def check_override(layout: str, config_family: str, config_path: str) -> None:
    """``--layout`` may override the family of ``config_path`` only where both store their fused
    expert tensors alike (same axes, same gate/up arrangement, e.g. qwen3_moe for mixtral): the
    stored bytes are a fact about the checkpoint, which the config describes. LayoutError otherwise
    (e.g. ``--layout gpt_oss`` on a Llama-4 checkpoint, whose gate/up rows are concatenated: no
    gpt-oss loader would read its experts right)."""
    want, have = _TABLE[layout], _TABLE[config_family]
    if want.fused is None or have.fused is None or (want.fused, want.glu) == (have.fused, have.glu):
        return
    alike = [f for f, row in _TABLE.items() if (row.fused, row.glu) == (have.fused, have.glu)]
    raise LayoutError(
        f"--layout {layout} contradicts {config_path} (family {config_family}): {config_family} stores {_stored(config_family)}, "
        f"{layout} {_stored(layout)}; the checkpoint is not {layout}. --layout can override config.json only with a family "
        f"stored alike ({', '.join(alike)}): fix config.json or drop --layout"
    )


def family_from_config_file(path: str) -> str:
    """:func:`family_from_config` of a ``config.json`` file; LayoutError names an unreadable file."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise LayoutError(f"{path}: cannot read the model config ({type(exc).__name__}: {exc}); pass --layout (accepted: {_ACCEPTED})") from exc
    try:
        return family_from_config(config)
    except LayoutError as exc:
        raise LayoutError(f"{path}: {exc}") from None


def config_path_for(checkpoint: str) -> str:
    """Where the ``config.json`` of a checkpoint path lives: inside a directory, else next to the file."""
    base = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    return os.path.join(base, "config.json")


def _layer(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _need_ndim(name: str, shape: tuple[int, ...], ndim: int, what: str) -> None:
    if len(shape) != ndim:
        raise LayoutError(f"{name}: stored shape {list(shape)} but {what} is {ndim}-D; check --layout (accepted: {_ACCEPTED})")


def classify(name: str, shape: tuple[int, ...], family: str | None) -> ExpertTensor | None:
    """Classify one stored tensor. ``None``: not a routed-expert weight this table knows.

    Raises LayoutError for a fused 3-D tensor when ``family`` is None or has no fused layout, for
    a shape that contradicts the table, and for an unknown ``family``."""
    check_family(family)
    shape = tuple(int(d) for d in shape)
    layer = _layer(name)
    m = _MEGATRON_TE.search(name)
    if m:
        role = f"fc{m.group(1)}"
        glu = "concat" if role == "fc1" else None
        if m.group(2):
            _need_ndim(name, shape, 2, "a TEGroupedLinear weightN [out, in]")
            return ExpertTensor(name, "megatron", role, layer, int(m.group(2)), 1, 0, None, glu)
        if len(shape) == 3:  # single grouped weight, logical [N, out, in]
            return ExpertTensor(name, "megatron", role, layer, None, 2, 1, 0, glu)
        _need_ndim(name, shape, 2, "a Megatron grouped weight [out, in] (or [N, out, in])")
        return ExpertTensor(name, "megatron", role, layer, None, 1, 0, None, glu)
    m = _MEGATRON_SEQ.search(name)
    if m:
        _need_ndim(name, shape, 2, "a SequentialMLP expert weight [out, in]")
        role = f"fc{m.group(2)}"
        return ExpertTensor(name, "megatron", role, layer, int(m.group(1)), 1, 0, None, "concat" if role == "fc1" else None)
    m = _HF_PER_EXPERT.search(name)
    if m:
        _need_ndim(name, shape, 2, "a per-expert nn.Linear weight [out, in]")
        return ExpertTensor(name, family, _PER_EXPERT_ROLE[m.group(2)], layer, int(m.group(1)), 1, 0, None, None)
    m = _HF_FUSED.search(name)
    if m:
        role = "gate_up" if m.group(1) == "gate_up_proj" else "down"
        if family is None:
            raise LayoutError(
                f"{name} {list(shape)}: a fused expert tensor whose layout depends on the checkpoint family "
                f"([E, in, out] in gpt_oss/llama4, [E, out, in] in transformers-v5 qwen3_moe/mixtral/...) and the "
                f"family is not known; pass --layout (accepted: {_ACCEPTED})"
            )
        row = _TABLE[family]
        if row.fused is None:
            raise LayoutError(f"{name}: family {family!r} has no fused expert tensor of this name; pass the right --layout (accepted: {_ACCEPTED})")
        _need_ndim(name, shape, 3, f"{family}'s fused {m.group(1)}")
        in_dim, out_dim = (1, 2) if row.fused == "in_out" else (2, 1)
        glu = row.glu if role == "gate_up" else None
        if glu and shape[out_dim] % 2:
            raise LayoutError(f"{name} {list(shape)}: {family}'s gate_up out dim {out_dim} must be even (gate and up); check --layout (accepted: {_ACCEPTED})")
        return ExpertTensor(name, family, role, layer, None, in_dim, out_dim, 0, glu)
    m = _DBRX_FUSED.search(name)
    if m:
        raise LayoutError(f"{name} {list(shape)}: a fused DBRX-style expert tensor; its layout is not in the table (accepted --layout: {_ACCEPTED})")
    return None


def check_fused_pairs(tensors, family: str | None) -> None:
    """Cross-check the fused ``gate_up`` / ``down`` tensors of each layer against ``family``'s layout.

    ``tensors``: ``(name, stored shape)`` pairs (other tensors are ignored). Under the family's
    layout, a layer's ``gate_up`` ``[E, 2I, H]`` (logical) and ``down`` ``[E, H, I]`` must agree:
    same E, gate_up's in_features = down's out_features (H) and gate_up's out = 2 x down's in (I).
    A wrong ``--layout`` (e.g. ``qwen3_moe`` on a gpt-oss checkpoint, which would block along
    out_features) breaks this even for gpt-oss-120b's H == I, so it is refused (LayoutError naming
    both tensors and ``--layout``) instead of silently blocking along the wrong axis."""
    pairs: dict[tuple[str, int | None], dict[str, tuple[ExpertTensor, tuple[int, ...]]]] = {}
    for name, shape in tensors:
        shape = tuple(int(d) for d in shape)
        info = classify(name, shape, family)
        if info is None or not info.fused or info.family == "megatron" or info.role not in ("gate_up", "down"):
            continue
        prefix = name[: name.rindex("experts.")]
        pairs.setdefault((prefix, info.layer), {})[info.role] = (info, shape)
    for roles in pairs.values():
        if len(roles) != 2:
            continue
        (gu, gs), (dn, ds) = roles["gate_up"], roles["down"]
        hidden_gu, hidden_dn = gs[gu.in_dim], ds[dn.out_dim]
        inter_gu, inter_dn = gs[gu.out_dim], ds[dn.in_dim]
        if gs[0] != ds[0] or hidden_gu != hidden_dn or inter_gu != 2 * inter_dn:
            raise LayoutError(
                f"{gu.name} {list(gs)} and {dn.name} {list(ds)} contradict family {gu.family}'s layout "
                f"(gate_up in_features {hidden_gu} vs down out_features {hidden_dn}, gate_up out {inter_gu} vs 2 x down "
                f"in_features {2 * inter_dn}); the checkpoint is not {gu.family}: check --layout / config.json (accepted: {_ACCEPTED})"
            )


def blocked_shape(shape: tuple[int, ...], info: ExpertTensor) -> tuple[int, ...]:
    """``shape`` with ``in_features`` moved last (other dims keep their order)."""
    dims = [d for d in range(len(shape)) if d != info.in_dim] + [info.in_dim]
    return tuple(shape[d] for d in dims)


def blocked_view(t, info: ExpertTensor):
    """``t`` (the stored tensor) as ``[..., out, in]``: ``in_features`` last, the expert axis first
    for fused tensors. A view (``movedim``): a transposed, non-contiguous one for ``[E, in, out]``."""
    if t.dim() <= info.in_dim:
        raise LayoutError(f"{info.name}: a {t.dim()}-D tensor has no in_features dim {info.in_dim}")
    return t if info.in_dim == t.dim() - 1 else t.movedim(info.in_dim, -1)


def hf_expert_names(family: str, layer: int) -> dict[str, str]:
    """Role -> tensor name of layer ``layer`` in ``family``'s HF checkpoint (``save_pretrained``
    layout). Per-expert names keep an ``{E}`` placeholder for the expert index; fused families
    (gpt_oss, llama4) give the fused names (append ``_blocks`` / ``_scales`` for gpt-oss MXFP4).
    ``megatron`` gives the TEGroupedLinear names (``{E}`` = local expert index)."""
    check_family(family)
    if family is None:
        raise LayoutError(f"hf_expert_names needs a family (accepted: {_ACCEPTED})")
    p = f"model.layers.{layer}"
    if family == "gpt_oss":
        return {"gate_up": f"{p}.mlp.experts.gate_up_proj", "down": f"{p}.mlp.experts.down_proj"}
    if family == "llama4":
        return {"gate_up": f"{p}.feed_forward.experts.gate_up_proj", "down": f"{p}.feed_forward.experts.down_proj"}
    if family == "mixtral":
        e = f"{p}.block_sparse_moe.experts.{{E}}"
        return {"gate": f"{e}.w1.weight", "up": f"{e}.w3.weight", "down": f"{e}.w2.weight"}
    if family == "megatron":
        e = f"decoder.layers.{layer}.mlp.experts"
        return {"fc1": f"{e}.linear_fc1.weight{{E}}", "fc2": f"{e}.linear_fc2.weight{{E}}"}
    e = f"{p}.mlp.experts.{{E}}"
    return {"gate": f"{e}.gate_proj.weight", "up": f"{e}.up_proj.weight", "down": f"{e}.down_proj.weight"}


__all__ = [
    "FAMILIES",
    "ROLES",
    "LayoutError",
    "ExpertTensor",
    "check_family",
    "family_from_config",
    "family_from_config_file",
    "check_override",
    "config_path_for",
    "classify",
    "check_fused_pairs",
    "blocked_shape",
    "blocked_view",
    "hf_expert_names",
]
