"""Zero-code activation: ``OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG=1`` in a process's environment patches
Megatron the moment ``megatron.core.extensions.transformer_engine`` is imported.

The wheel ships ``megatron_qat_autoload.pth`` into site-packages. Its one line reads only
``os.environ``: with the flag unset/empty/``0`` (or ``MEGATRON_QAT_AUTOLOAD=0``) nothing else is
imported. Otherwise it imports this module (no torch) and calls :func:`install`, which registers two
post-import callbacks (:mod:`megatron_qat.megatron.import_watch`):

- ``megatron.core.extensions.transformer_engine`` executed -> :func:`megatron_qat.megatron.enable_from_env`;
- ``megatron.core.transformer.moe.moe_layer`` executed -> make sure fake-QAT is on (same call),
  then wrap ``MoELayer.__init__`` (that module imports the extension module half-way through, so
  its class exists only at the end).

Fail closed: every variable is validated then (a malformed value such as ``FLAG=yes`` or
``MEGATRON_QAT_AUTOLOAD=maybe`` is an error there, not at interpreter start, where ``site`` would
only print it). If the patch cannot be applied the callback raises a
:class:`~megatron_qat.megatron.failclosed.FakeQATUnavailableError` (not an ``ImportError``, which
Megatron's own ``try/except ImportError`` around these imports would swallow), the failure is
recorded as sticky (no MoE layer build, no optimizer step), and the callback stays registered, so
every later import attempt fails again.

Dependency direction: this module imports :mod:`.patch` (inside the callbacks); :mod:`.patch`
never imports this module.
"""

from __future__ import annotations

import sys

from . import import_watch
from .versions import EXTENSIONS_MODULE, MOE_LAYER_MODULE


def _on_extensions_imported(module) -> None:
    from .patch import enable_from_env

    enable_from_env()


def _on_moe_layer_imported(module) -> None:
    from .patch import enable_from_env, is_enabled, on_moe_layer_imported

    if not is_enabled():
        enable_from_env()
    on_moe_layer_imported(module)


def install() -> None:
    """Register the two callbacks (idempotent); modules already imported are handled now."""
    import_watch.when_imported(EXTENSIONS_MODULE, _on_extensions_imported)
    import_watch.when_imported(MOE_LAYER_MODULE, _on_moe_layer_imported)
    for name, callback in ((EXTENSIONS_MODULE, _on_extensions_imported), (MOE_LAYER_MODULE, _on_moe_layer_imported)):
        module = sys.modules.get(name)
        if module is not None and (name != MOE_LAYER_MODULE or hasattr(module, "MoELayer")):
            callback(module)
            import_watch.cancel(name, callback)


def is_installed() -> bool:
    """Whether the autoload still waits for one of its modules."""
    return import_watch.is_watching(EXTENSIONS_MODULE, _on_extensions_imported) or import_watch.is_watching(
        MOE_LAYER_MODULE, _on_moe_layer_imported
    )


def uninstall() -> None:
    """Unregister the callbacks (tests)."""
    import_watch.cancel(EXTENSIONS_MODULE, _on_extensions_imported)
    import_watch.cancel(MOE_LAYER_MODULE, _on_moe_layer_imported)
