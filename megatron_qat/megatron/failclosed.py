"""Sticky failure: once the flag asked for fake-QAT and it could not be applied, no MoE layer can be
built and no optimizer step can be taken in this process.

Why sticky and why not an ImportError: Megatron wraps many of its imports of
``megatron.core.extensions.transformer_engine`` in ``try: ... except ImportError`` (e.g.
``models/common/embeddings/rope_utils.py`` in megatron-core 0.13-0.15) or even a bare ``except:``
(``language_module.py``). An error raised when that module is imported can therefore be swallowed,
and training would go on unpatched. So the error is a :class:`FakeQATUnavailableError`
(a ``RuntimeError``, never an ``ImportError``), and :func:`record` keeps it for the life of the
process:

- ``MoELayer.__init__`` (wrapped by :mod:`megatron_qat.megatron.patch`) calls :func:`check`;
- a global ``torch.optim`` step pre-hook (``torch.optim.optimizer.register_optimizer_step_pre_hook``,
  which every ``torch.optim.Optimizer`` subclass runs, including Transformer Engine's and Apex's
  fused Adam under Megatron's optimizer wrappers) calls :func:`check`.

Only :func:`clear` lifts it: a later successful ``enable()``, or ``megatron_qat.disable()`` (an
explicit decision to train without fake-QAT). This module imports torch only inside :func:`record`.
"""

from __future__ import annotations

_cause: BaseException | None = None
_hook_handle = None


class FakeQATUnavailableError(RuntimeError):
    """The MXFP4 fake-QAT was requested but cannot be applied (the message names the cause and the
    installed megatron-core / Transformer Engine versions). Deliberately not an ``ImportError``."""


def _optimizer_step_pre_hook(optimizer, args, kwargs):
    check(f"{type(optimizer).__name__}.step()")


def record(exc: BaseException) -> None:
    """Remember ``exc`` as the reason fake-QAT is unavailable (the first one is kept) and arm the
    optimizer-step guard."""
    global _cause, _hook_handle
    if _cause is None:
        _cause = exc
    if _hook_handle is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _hook_handle = register_optimizer_step_pre_hook(_optimizer_step_pre_hook)


def failed() -> BaseException | None:
    """The recorded cause, or None."""
    return _cause


def check(where: str) -> None:
    """Raise :class:`FakeQATUnavailableError` naming ``where`` and the recorded cause, if any."""
    if _cause is not None:
        raise FakeQATUnavailableError(
            f"{where} refused: OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG asked for MXFP4 fake-QAT but it could not be "
            f"applied in this process ({type(_cause).__name__}: {_cause}). Fix the cause, or unset the flag (or "
            "call megatron_qat.disable()) to train without fake-QAT"
        ) from _cause


def unavailable(exc: BaseException) -> BaseException:
    """``exc`` itself, or, for an ``ImportError``, a :class:`FakeQATUnavailableError` carrying it (an
    ImportError could be swallowed by the ``except ImportError`` around Megatron's imports)."""
    if isinstance(exc, ImportError):
        error = FakeQATUnavailableError(f"MXFP4 fake-QAT cannot be applied: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error
    return exc


def clear() -> None:
    """Forget the recorded failure and remove the optimizer-step guard."""
    global _cause, _hook_handle
    _cause = None
    if _hook_handle is not None:
        _hook_handle.remove()
        _hook_handle = None
