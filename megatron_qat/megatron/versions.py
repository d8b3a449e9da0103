"""Locate ``TEGroupedLinear`` and explain, with installed versions, why it cannot be patched.

Supported: megatron-core >= 0.13 (``megatron.core.extensions.transformer_engine.TEGroupedLinear``)
on Transformer Engine >= 2.5 (``GroupedLinear._get_weight_tensors``, TE PR #1814). Megatron
imports its TE extension module even without TE (``HAVE_TE = False``) and then defines
``TEGroupedLinear = None``; that case is a
:class:`~megatron_qat.megatron.failclosed.FakeQATUnavailableError` here, as is a TE too old to have
the weight hook. Never an ``ImportError``: Megatron imports its TE extension module inside
``try/except ImportError`` blocks, which would swallow it.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import re

from .failclosed import FakeQATUnavailableError

EXTENSIONS_MODULE = "megatron.core.extensions.transformer_engine"
MOE_LAYER_MODULE = "megatron.core.transformer.moe.moe_layer"
MIN_MEGATRON_CORE = (0, 13)
MIN_TRANSFORMER_ENGINE = (2, 5)
_TE_DISTRIBUTIONS = ("transformer-engine", "transformer_engine", "transformer-engine-torch", "transformer_engine_torch")


def installed_version(*distributions: str) -> str | None:
    """Version string of the first installed distribution among ``distributions``, else None."""
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _leading_numbers(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:2])


def versions_line() -> str:
    """``megatron-core X (need >= 0.13), transformer-engine Y (need >= 2.5)`` for error messages."""
    mcore = installed_version("megatron-core", "megatron_core") or "not installed"
    te = installed_version(*_TE_DISTRIBUTIONS) or "not installed"
    return (
        f"installed: megatron-core {mcore} (need >= 0.13), transformer-engine {te} (need >= 2.5; "
        "pip install 'megatron-qat[megatron,te]')"
    )


def load_te_grouped_linear():
    """Return ``(extensions_module, TEGroupedLinear)`` or raise :class:`FakeQATUnavailableError` naming
    the installed versions and the minimums."""
    mcore = installed_version("megatron-core", "megatron_core")
    if mcore is not None and _leading_numbers(mcore) < MIN_MEGATRON_CORE:
        raise FakeQATUnavailableError(f"megatron_qat fake-QAT needs megatron-core >= 0.13; {versions_line()}")
    try:
        ext = importlib.import_module(EXTENSIONS_MODULE)
    except ImportError as exc:
        raise FakeQATUnavailableError(f"megatron_qat fake-QAT cannot import {EXTENSIONS_MODULE}: {exc}; {versions_line()}") from exc
    cls = getattr(ext, "TEGroupedLinear", None)
    if cls is None:
        raise FakeQATUnavailableError(
            f"megatron_qat fake-QAT: {EXTENSIONS_MODULE}.TEGroupedLinear is None (Megatron found no usable "
            f"Transformer Engine, HAVE_TE={getattr(ext, 'HAVE_TE', '?')}); {versions_line()}"
        )
    if not callable(getattr(cls, "_get_weight_tensors", None)):
        raise FakeQATUnavailableError(
            "megatron_qat fake-QAT: TEGroupedLinear has no _get_weight_tensors (added in Transformer Engine "
            f"2.5); {versions_line()}"
        )
    return ext, cls
