"""Run a callback right after a given module has executed (a ``sys.meta_path`` post-import hook).

:func:`when_imported` registers ``callback(module)`` for a module name. One finder at the front of
``sys.meta_path`` ignores every other name; for a watched one it lets the normal finders build the
spec and wraps the loader so that the callbacks run once the module's body has executed (while the
module is still being imported: an exception from a callback fails that import, and the import
system removes the half-made module from ``sys.modules``).

A callback stays registered until it has RETURNED normally: if it raises, the next import of the
module (Megatron re-executes a module whose first import failed) runs it again. This is what makes
a refused patch sticky even when some ``try/except`` swallowed the first error. The finder removes
itself once nothing is watched.

No torch, no megatron-qat import: the autoload ``.pth`` may load this at interpreter start.
"""

from __future__ import annotations

import sys
from typing import Callable

_callbacks: dict[str, list[Callable]] = {}


class _PostExecLoader:
    """Delegates to the real loader, then runs the module's callbacks."""

    def __init__(self, loader, fullname: str):
        self._loader = loader
        self._fullname = fullname

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        self._loader.exec_module(module)
        _fire(self._fullname, module)

    def __getattr__(self, name):  # get_source, get_code, is_package, ... of the real loader
        return getattr(self._loader, name)


class _PostImportFinder:
    """Wraps the loaders of the watched modules; returns None (no opinion) for every other name."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PostExecLoader(spec.loader, fullname)
                return spec
        return None


_finder = _PostImportFinder()


def _fire(fullname: str, module) -> None:
    for callback in list(_callbacks.get(fullname, ())):
        callback(module)  # raises: stays registered, the import fails
        _discard(fullname, callback)


def _discard(fullname: str, callback) -> None:
    pending = _callbacks.get(fullname)
    if pending and callback in pending:
        pending.remove(callback)
        if not pending:
            del _callbacks[fullname]
    if not _callbacks and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def when_imported(fullname: str, callback: Callable) -> None:
    """Call ``callback(module)`` after ``fullname`` next finishes executing (idempotent per pair)."""
    pending = _callbacks.setdefault(fullname, [])
    if callback not in pending:
        pending.append(callback)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def cancel(fullname: str, callback: Callable | None = None) -> None:
    """Unregister ``callback`` (None: every callback) for ``fullname``; no-op when not registered."""
    for registered in list(_callbacks.get(fullname, ())) if callback is None else [callback]:
        _discard(fullname, registered)


def is_watching(fullname: str, callback: Callable | None = None) -> bool:
    """Whether a callback (``callback``, or any) is still registered for ``fullname``."""
    pending = _callbacks.get(fullname, ())
    return (callback in pending) if callback is not None else bool(pending)
