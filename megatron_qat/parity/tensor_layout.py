"""Which dimension of each selected tensor the MXFP4 blocks run along (``in_features``).

The checkpoint family comes from ``--layout`` or from the ``config.json`` next to the checkpoint
(``model_type`` / ``architectures``, :func:`megatron_qat.layouts.family_from_config`); ``--layout``
may override the config only with a family stored alike (:func:`megatron_qat.layouts.check_override`); every
selected tensor is then classified by :func:`megatron_qat.layouts.classify`:

- a routed-expert tensor of the table: its ``in_dim`` (gpt-oss ``[E, in, out]``: dim 1);
- any other 2-D ``*.weight`` the user selected with ``--include``: PyTorch's ``nn.Linear``
  ``[out, in]`` convention (dim 1); a 1-D tensor: its only dim;
- anything else (a fused 3-D tensor with no family, a tensor the table does not know): refused
  before the run with a one-line error naming ``--layout`` (exit 2). Never guessed from shapes.
"""

from __future__ import annotations

import os

from ..layouts import (
    FAMILIES,
    LayoutError,
    check_family,
    check_fused_pairs,
    check_override,
    classify,
    config_path_for,
    family_from_config_file,
)
from .errors import ParityError
from .sources import TensorEntry


def run_family(layout: str | None, paths: list[str], notes: list[str]) -> tuple[str | None, str, str | None]:
    """(family or None, how it was decided, why no family when None) for the run."""
    try:
        check_family(layout)
    except LayoutError as exc:
        raise ParityError(str(exc)) from None
    found: dict[str, str] = {}
    problem = None
    for p in paths:
        cfg = config_path_for(p)
        if not os.path.isfile(cfg) or cfg in found:
            continue
        try:
            found[cfg] = family_from_config_file(cfg)
        except LayoutError as exc:
            problem = str(exc)
    if layout is not None:
        for cfg, fam in found.items():
            check_override(layout, fam, cfg)  # only a family stored alike (LayoutError: exit 2)
            if fam != layout:
                notes.append(f"--layout {layout} overrides {cfg} (which says {fam})")
        return layout, "--layout", None
    if problem is not None:
        return None, "none", problem
    families = sorted(set(found.values()))
    if len(families) > 1:
        raise ParityError(f"the checkpoints' config.json files name different families ({', '.join(f'{c}: {f}' for c, f in found.items())}); check one at a time or pass --layout")
    if families:
        return families[0], next(iter(found)), None
    return None, "none", "no config.json next to the checkpoint"


def assign(entry: TensorEntry, family: str | None, why_no_family: str | None) -> None:
    """Set ``entry.in_dim`` and ``entry.layout``; ParityError (exit 2) when it cannot be determined."""
    try:
        info = classify(entry.name, entry.shape, family)
    except LayoutError as exc:
        raise ParityError(f"{exc}{f' ({why_no_family})' if why_no_family and family is None else ''}") from None
    if info is not None:
        entry.in_dim = info.in_dim
        entry.layout = {"family": info.family, "role": info.role, "blocked_dim": info.in_dim, "expert_dim": info.expert_dim,
                        "glu": info.glu, "rule": "layout table" if info.family else "per-expert nn.Linear [out, in]"}
    elif len(entry.shape) == 2 and entry.name.endswith(".weight"):
        entry.in_dim = 1
        entry.layout = {"family": None, "role": None, "blocked_dim": 1, "expert_dim": None, "glu": None, "rule": "nn.Linear [out, in]"}
    elif len(entry.shape) <= 1:
        entry.in_dim = 0 if entry.shape else None
        entry.layout = {"family": None, "role": None, "blocked_dim": entry.in_dim, "expert_dim": None, "glu": None, "rule": "1-D"}
    else:
        raise ParityError(
            f"{entry.name} {list(entry.shape)}: not a routed-expert tensor of the layout table (megatron_qat/layouts.py), so "
            f"which dim is in_features is unknown; narrow --include or pass --layout (accepted: {', '.join(FAMILIES)})"
        )


def check_pairs(entries: list[TensorEntry], family: str | None) -> None:
    """ParityError (exit 2) when a layer's fused gate_up / down shapes contradict ``family``'s
    layout (:func:`megatron_qat.layouts.check_fused_pairs`: a wrong ``--layout``)."""
    try:
        check_fused_pairs([(e.name, e.shape) for e in entries], family)
    except LayoutError as exc:
        raise ParityError(str(exc)) from None


def synthetic_layout(entry: TensorEntry) -> None:
    """Built-in tensors are ``[..., out, in]`` by construction."""
    entry.layout = {"family": None, "role": None, "blocked_dim": len(entry.shape) - 1, "expert_dim": 0 if len(entry.shape) == 3 else None,
                    "glu": None, "rule": "synthetic"}
