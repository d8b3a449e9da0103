"""Install and remove the fake-QAT runtime: ``enable`` / ``disable`` / ``enable_from_env``, and the
zero-code autoload.

The process holds at most ONE :class:`megatron_qat.megatron.runtime.Runtime`, created by
:func:`enable` (or by a failed :func:`enable_from_env`, to keep the failure sticky) and closed by
:func:`disable`. It is the only mutable state of this package, reached through :func:`current`.

**Autoload.** The wheel ships ``megatron_qat_autoload.pth``; its one line reads only ``os.environ``.
When the MXFP4 flag is set (to anything but ``0``/empty), or any ``MEGATRON_QAT_*`` /
``OPEN_TRAINING_MXFP4_*`` name is (a misspelt flag must not train silently), and
``MEGATRON_QAT_AUTOLOAD`` is not ``0``, it calls :func:`autoload` (no torch), which asks the
post-import watcher (:class:`ImportWatcher`, living in ``sys.meta_path``) to run, right after
Megatron's modules execute:

- ``megatron.core.extensions.transformer_engine`` -> :func:`enable_from_env` (every variable and
  every own-prefixed name is validated here, not at interpreter start, where ``site`` would only
  print an error);
- ``megatron.core.transformer.moe.moe_layer`` -> the same, then the runtime wraps
  ``MoELayer.__init__`` (that module imports the extension module half-way through its own import,
  so its class exists only at the end).

A callback stays registered until it returns normally: when the patch cannot be applied the import
fails with :class:`FakeQATUnavailableError` (never an ImportError, which Megatron's own
``try/except ImportError`` around these imports would swallow), the runtime records the failure
(no MoE layer build, no optimizer step), and every later import attempt fails again.

Torch-free at import: the ``.pth`` imports this module at interpreter start.
"""

from __future__ import annotations

import sys
from typing import Callable

from .failclosed import EXTENSIONS_MODULE, MOE_LAYER_MODULE, FakeQATUnavailableError

_runtime = None  # the one handle: the Runtime of this process, or None


def current():
    """The process's runtime (active, or holding a recorded failure), or ``None``."""
    return _runtime


def enable(block_size: int | None = None, recipe: str | None = None) -> None:
    """Turn MXFP4 fake-QAT on for every ``TEGroupedLinear`` (routed MoE experts).

    Args:
        block_size: elements per E8M0 scale along K (``None``: ``OPEN_TRAINING_MXFP4_BLOCK_SIZE``,
            default 32 = FlashInfer; others are ablations).
        recipe: a name of ``megatron_qat.numerics.rules.RECIPES`` (``None``: ``MEGATRON_QAT_RECIPE``,
            default ``flashinfer-w4a16``): the weight rule and the expert-activation rule (docs/engines.md).
    Calling it again while on re-configures block size and recipe (the cached copies are dropped).

    Raises:
        FakeQATUnavailableError: megatron-core or Transformer Engine missing or too old.
        ValueError / RuntimeError: a malformed variable or argument; a ``TEGroupedLinear`` subclass
            overriding ``_get_weight_tensors``.
    With ``OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG`` set in ``os.environ`` a failure is sticky.
    """
    from ..config import flag_requested

    _enable(block_size, recipe, flag_requested())


def _enable(block_size, recipe, requested: bool) -> None:
    global _runtime
    from .runtime import Runtime

    if _runtime is not None and _runtime.active:
        _runtime.configure(block_size, recipe)
        return
    if _runtime is not None:  # a recorded failure: this attempt replaces it, if it succeeds
        _runtime.close()
        _runtime = None
    runtime = Runtime()
    try:
        runtime.configure(block_size, recipe)
        runtime.activate()
    except Exception as exc:
        if not requested:
            runtime.close()
            raise
        _runtime = runtime
        error = runtime.fail(exc)
        if error is exc:
            raise
        raise error from exc
    _runtime = runtime


def enable_from_env(environ=None) -> bool:
    """Enable when ``OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG=1`` (block size and recipe from their
    variables). Returns whether fake-QAT is on afterwards.

    Every variable and every own-prefixed name is checked (:func:`megatron_qat.config.from_env`),
    flag on or off. When the flag is set (to anything but ``0``/empty) and this fails, or the
    environment is refused while any own-prefixed name is set (a misspelt flag), the failure is
    recorded as sticky before it is raised.

    Raises:
        ValueError: a malformed value or unknown own-prefixed name. RuntimeError: the INT4 flag is on
            too. FakeQATUnavailableError: the flag is on but the patch cannot be applied.
    """
    global _runtime
    from ..config import flag_requested, from_env, own_names_present

    requested = flag_requested(environ)
    try:
        cfg = from_env(environ)
    except Exception as exc:
        if requested or own_names_present(environ):  # a misspelt flag is a request too
            from .runtime import Runtime

            if _runtime is None or _runtime.active:
                if _runtime is not None:
                    _runtime.close()
                _runtime = Runtime()
            _runtime.fail(exc)
        raise
    if cfg.enabled:
        _enable(cfg.block_size, cfg.recipe, requested)
    return is_enabled()


def disable() -> None:
    """Turn fake-QAT off in this process: close the runtime (class patches restored exactly, a
    foreign wrapper put on top left in place; optimizer hooks and per-module state removed), forget a
    recorded failure, and stop the autoload from acting on later imports (an explicit decision to
    train without fake-QAT). No-op when off."""
    global _runtime
    if _runtime is not None:
        _runtime.close()
        _runtime = None
    watcher = ImportWatcher.find()
    if watcher is not None:
        watcher.cancel(EXTENSIONS_MODULE)
        watcher.cancel(MOE_LAYER_MODULE)


def is_enabled() -> bool:
    """True while fake-QAT is active (the weight hook is installed and on)."""
    return _runtime is not None and _runtime.active


def invalidate_cache() -> None:
    """Forget every cached fake-quantized expert weight copy (see docs/usage.md, "Cache contract")."""
    if _runtime is not None:
        _runtime.invalidate()


# --- autoload ----------------------------------------------------------------------------------------


def _on_extensions_imported(module) -> None:
    enable_from_env()


def _on_moe_layer_imported(module) -> None:
    if not is_enabled():
        enable_from_env()
    if _runtime is not None:
        _runtime.on_moe_layer_module(module)


def autoload() -> None:
    """Register the two post-import callbacks (idempotent); modules already imported are handled now."""
    watcher = ImportWatcher.find(create=True)
    watcher.when_imported(EXTENSIONS_MODULE, _on_extensions_imported)
    watcher.when_imported(MOE_LAYER_MODULE, _on_moe_layer_imported)
    for name, callback in ((EXTENSIONS_MODULE, _on_extensions_imported), (MOE_LAYER_MODULE, _on_moe_layer_imported)):
        module = sys.modules.get(name)
        if module is not None and (name != MOE_LAYER_MODULE or hasattr(module, "MoELayer")):
            callback(module)
            watcher.cancel(name, callback)


def autoload_pending() -> bool:
    """Whether the autoload still waits for one of its modules."""
    watcher = ImportWatcher.find()
    return watcher is not None and (
        watcher.is_watching(EXTENSIONS_MODULE, _on_extensions_imported)
        or watcher.is_watching(MOE_LAYER_MODULE, _on_moe_layer_imported)
    )


# --- post-import watcher -----------------------------------------------------------------------------


class _PostExecLoader:
    """Delegates to the real loader, then runs the module's callbacks."""

    def __init__(self, loader, fullname: str, watcher: "ImportWatcher"):
        self._loader, self._fullname, self._watcher = loader, fullname, watcher

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._watcher.fire(self._fullname, module)

    def __getattr__(self, name):  # get_source, get_code, is_package, ... of the real loader
        return getattr(self._loader, name)


class ImportWatcher:
    """A ``sys.meta_path`` finder that runs callbacks right after a watched module has executed (while
    it is still being imported: a callback's exception fails that import, and the import system
    removes the half-made module from ``sys.modules``). It returns None (no opinion) for every other
    name, and leaves ``sys.meta_path`` once nothing is watched. Its callbacks live on the instance;
    the instance lives in ``sys.meta_path`` (found by :meth:`find`), so no module global is needed.
    """

    def __init__(self):
        self.callbacks: dict[str, list[Callable]] = {}

    @classmethod
    def find(cls, create: bool = False) -> "ImportWatcher | None":
        for finder in sys.meta_path:
            if getattr(finder, "_megatron_qat_import_watcher", False):
                return finder
        if not create:
            return None
        watcher = cls()
        sys.meta_path.insert(0, watcher)
        return watcher

    _megatron_qat_import_watcher = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PostExecLoader(spec.loader, fullname, self)
                return spec
        return None

    def fire(self, fullname: str, module) -> None:
        for callback in list(self.callbacks.get(fullname, ())):
            callback(module)  # raises: stays registered, the import fails
            self.cancel(fullname, callback)

    def when_imported(self, fullname: str, callback: Callable) -> None:
        """Call ``callback(module)`` after ``fullname`` next finishes executing (idempotent per pair)."""
        pending = self.callbacks.setdefault(fullname, [])
        if callback not in pending:
            pending.append(callback)
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def cancel(self, fullname: str, callback: Callable | None = None) -> None:
        """Unregister ``callback`` (None: every callback) for ``fullname``; no-op when not registered."""
        pending = self.callbacks.get(fullname)
        if not pending:
            return
        for registered in list(pending) if callback is None else [callback]:
            if registered in pending:
                pending.remove(registered)
        if not pending:
            del self.callbacks[fullname]
        if not self.callbacks and self in sys.meta_path:
            sys.meta_path.remove(self)

    def is_watching(self, fullname: str, callback: Callable | None = None) -> bool:
        pending = self.callbacks.get(fullname, ())
        return (callback in pending) if callback is not None else bool(pending)


__all__ = [
    "enable",
    "disable",
    "is_enabled",
    "enable_from_env",
    "invalidate_cache",
    "current",
    "autoload",
    "autoload_pending",
    "ImportWatcher",
    "FakeQATUnavailableError",
]
