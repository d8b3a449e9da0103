"""Say it is on: INFO lines on the ``megatron_qat`` logger.

- :func:`activated`: one line each time fake-QAT goes from off to on (once per process in normal
  use): block size, the kernel setting, the installed megatron-core / Transformer Engine versions.
- One line per model build. A "model build" is the set of ``MoELayer`` objects constructed (through
  the guarded ``MoELayer.__init__``) before the first patched forward that follows them: each build
  adds its patched ``TEGroupedLinear`` count (:func:`moe_layer_built`), and the first forward of a
  patched module after that reports the totals once (:func:`first_forward`), with the kernel that
  really ran (``triton`` / ``reference``, resolved on the weight tensor as the quantizer does). A
  model whose chunks are built one after another before any forward is one line; a second model
  built later (e.g. a reference model) gets its own line at its first forward.

The hot path costs one integer test (:func:`pending`).
"""

from __future__ import annotations

import logging

_log = logging.getLogger("megatron_qat")
_layers = 0
_modules = 0


def activated(block_size: int) -> None:
    from ..config import kernel_choice
    from .versions import installed_version

    kernel = kernel_choice() or "auto (triton on CUDA, reference elsewhere)"
    _log.info(
        "megatron_qat: MXFP4 fake-QAT active on TEGroupedLinear (routed MoE experts): block_size=%d, kernel=%s, "
        "megatron-core %s, transformer-engine %s",
        block_size,
        kernel,
        installed_version("megatron-core", "megatron_core"),
        installed_version("transformer-engine", "transformer_engine", "transformer-engine-torch"),
    )


def moe_layer_built(patched_modules: int) -> None:
    global _layers, _modules
    _layers += 1
    _modules += patched_modules


def pending() -> bool:
    return _layers > 0


def first_forward(fake_weights: list, block_size: int) -> None:
    global _layers, _modules
    from ..mxfp4 import resolve_impl

    kernel = resolve_impl(fake_weights[0], None) if fake_weights else "none"
    _log.info(
        "megatron_qat: model built with MXFP4 fake-QAT: %d TEGroupedLinear modules patched in %d MoELayer(s), "
        "block_size=%d, kernel=%s",
        _modules,
        _layers,
        block_size,
        kernel,
    )
    _layers = _modules = 0


def reset() -> None:
    global _layers, _modules
    _layers = _modules = 0
