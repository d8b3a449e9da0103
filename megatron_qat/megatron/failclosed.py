"""Versions and fail-closed: find ``TEGroupedLinear``, and the one error a requested but inapplicable
fake-QAT raises.

Supported: megatron-core >= 0.13 (``megatron.core.extensions.transformer_engine.TEGroupedLinear``)
on Transformer Engine >= 2.5 (``GroupedLinear._get_weight_tensors``, TE PR #1814). Megatron imports
its TE extension module even without TE (``HAVE_TE = False``) and then defines
``TEGroupedLinear = None``; that is a :class:`FakeQATUnavailableError` here, as is a TE too old to
have the weight hook.

Why never an ``ImportError``: Megatron wraps many of its imports of the extension module in
``try: ... except ImportError`` (megatron-core 0.13-0.15 ``models/common/embeddings/rope_utils.py``)
or a bare ``except:`` (``language_module.py``), which would swallow it and let training run
unpatched. So :func:`as_unavailable` turns an ImportError met on the way into our
``RuntimeError``, and the runtime keeps a failure sticky for the life of the process (no
``MoELayer`` build and no optimizer step: :meth:`megatron_qat.megatron.runtime.Runtime.fail`).

Torch-free: the autoload imports this module at interpreter start.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import re

EXTENSIONS_MODULE = "megatron.core.extensions.transformer_engine"
MOE_LAYER_MODULE = "megatron.core.transformer.moe.moe_layer"
MIN_MEGATRON_CORE = (0, 13)
MIN_TRANSFORMER_ENGINE = (2, 5)
_TE_DISTRIBUTIONS = ("transformer-engine", "transformer_engine", "transformer-engine-torch", "transformer_engine_torch")
FLAG_HINT = "unset OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG (or call megatron_qat.disable()) to train without fake-QAT"


class FakeQATUnavailableError(RuntimeError):
    """The MXFP4 fake-QAT was requested but cannot be applied (the message names the cause and the
    installed megatron-core / Transformer Engine versions). Deliberately not an ``ImportError``."""


def installed_version(*distributions: str) -> str | None:
    """Version string of the first installed distribution among ``distributions``, else None."""
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def megatron_core_version() -> str | None:
    return installed_version("megatron-core", "megatron_core")


def transformer_engine_version() -> str | None:
    return installed_version(*_TE_DISTRIBUTIONS)


def _leading_numbers(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:2])


def versions_line() -> str:
    """``installed: megatron-core X (need >= 0.13), transformer-engine Y (need >= 2.5; ...)``."""
    return (
        f"installed: megatron-core {megatron_core_version() or 'not installed'} (need >= 0.13), "
        f"transformer-engine {transformer_engine_version() or 'not installed'} (need >= 2.5; "
        "pip install 'megatron-qat[megatron,te]')"
    )


def load_te_grouped_linear():
    """``TEGroupedLinear``, or :class:`FakeQATUnavailableError` naming the installed versions."""
    mcore = megatron_core_version()
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
    return cls


def as_unavailable(exc: BaseException) -> BaseException:
    """``exc`` itself, or, for an ``ImportError``, a :class:`FakeQATUnavailableError` caused by it."""
    if isinstance(exc, ImportError):
        error = FakeQATUnavailableError(f"MXFP4 fake-QAT cannot be applied: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error
    return exc


def refusal(where: str, cause: BaseException) -> FakeQATUnavailableError:
    """The error every guarded action raises while a failure is recorded."""
    error = FakeQATUnavailableError(
        f"{where} refused: OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG asked for MXFP4 fake-QAT but it could not be "
        f"applied in this process ({type(cause).__name__}: {cause}). Fix the cause, or unset the flag (or "
        "call megatron_qat.disable()) to train without fake-QAT"
    )
    error.__cause__ = cause
    return error
