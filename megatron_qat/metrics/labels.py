"""Names of the observed modules: ``layer_<L>/fc1`` and ``layer_<L>/fc2``.

A ``TEGroupedLinear`` does not know its layer: megatron-core's ``TEGroupedMLP`` builds it with
``tp_comm_buffer_name='fc1' | 'fc2'`` (Transformer Engine keeps that as ``ub_name``) and the layer
number lives on the ``MoELayer`` (``layer_number``, 1-based and global across pipeline stages, set by
``TransformerLayer.set_layer_number`` after the layer is built). :func:`register_moe_layer` gives each
grouped linear of a built ``MoELayer`` a weak reference to it; the label is read when first needed.

Resolution order in :func:`label_of`: an explicit ``label``; a registered ``MoELayer`` with an int
``layer_number``; a ``layer_number`` attribute on the module itself (some forks set one); else
``module_<k>`` numbered in order of first observation on this rank (prefixed ``pp<r>_`` under
pipeline parallelism so that two stages never share a name).
"""

from __future__ import annotations

import weakref

OWNER_ATTR = "_megatron_qat_metrics_owner"
_ROLES = ("fc1", "fc2")


def register_moe_layer(moe_layer) -> int:
    """Label the routed-expert grouped linears of ``moe_layer`` (``moe_layer.experts.linear_fc1/2``).

    Returns how many modules were registered (0 for experts that are not grouped linears, e.g.
    ``SequentialMLP``). Holds only a weak reference to ``moe_layer``."""
    experts = getattr(moe_layer, "experts", None)
    ref = weakref.ref(moe_layer)
    n = 0
    for role in _ROLES:
        linear = getattr(experts, f"linear_{role}", None)
        if linear is not None:
            object.__setattr__(linear, OWNER_ATTR, (ref, role))
            n += 1
    return n


def _role(module) -> str:
    owner = getattr(module, OWNER_ATTR, None)
    if owner is not None:
        return owner[1]
    ub_name = getattr(module, "ub_name", None)
    return ub_name if ub_name in _ROLES else "experts"


def _int_or_none(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _owner(module):
    owner = getattr(module, OWNER_ATTR, None)
    return owner[0]() if owner is not None else None


def layer_number(module) -> int | None:
    """The Megatron layer number of ``module``'s MoE layer, when known."""
    moe = _owner(module)
    if moe is not None and _int_or_none(getattr(moe, "layer_number", None)) is not None:
        return moe.layer_number
    return _int_or_none(getattr(module, "layer_number", None))


def expert_ids(module, n_experts: int):
    """Global expert ids of ``module``'s ``n_experts`` local experts (``MoELayer.local_expert_indices``
    when registered and of the right length), else ``None`` (local indices are used)."""
    moe = _owner(module)
    ids = getattr(moe, "local_expert_indices", None) if moe is not None else None
    if ids is not None and len(ids) == n_experts:
        return tuple(int(i) for i in ids)
    return None


class Labeller:
    """Assigns the ordinal fallback names; one per recorder (see the module docstring)."""

    def __init__(self):
        self._ordinals: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._next = 0

    def label_of(self, module, label: str | None = None) -> str:
        if label is not None:
            if not isinstance(label, str) or not label or label.startswith("/") or label.endswith("/"):
                raise ValueError(f"megatron_qat.metrics: label must be a non-empty 'a/b' style string, got {label!r}")
            return label
        n = layer_number(module)
        if n is not None:
            return f"layer_{n}/{_role(module)}"
        if module not in self._ordinals:
            self._ordinals[module] = f"{_pipeline_prefix()}module_{self._next}/{_role(module)}"
            self._next += 1
        return self._ordinals[module]

    def reset(self) -> None:
        self._ordinals.clear()
        self._next = 0


def _pipeline_prefix() -> str:
    from .reduction import pipeline_rank_and_size

    rank, size = pipeline_rank_and_size()
    return f"pp{rank}_" if size > 1 else ""
