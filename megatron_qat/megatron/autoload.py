"""Zero-code activation: ``OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG=1`` in a process's environment patches
Megatron the moment ``megatron.core.extensions.transformer_engine`` is imported.

The wheel ships ``megatron_qat_autoload.pth`` into site-packages. Its one line reads only
``os.environ``: with the flag off (or ``MEGATRON_QAT_AUTOLOAD=0``) nothing else is imported. With the
flag on it imports this module (no torch) and calls :func:`install`, which puts a finder at the front
of ``sys.meta_path``. The finder ignores every module except two; for those it lets the normal
finders build the spec and wraps the loader so that, right after the module has executed:

- ``megatron.core.extensions.transformer_engine`` -> :func:`megatron_qat.megatron.enable_from_env`
  (errors propagate: the import fails loudly when the flag is on but cannot apply);
- ``megatron.core.transformer.moe.moe_layer`` -> the ``MoELayer.__init__`` guard (that module
  imports the extension module half-way through, so its class exists only later).

The finder removes itself after both have fired. A module already imported when :func:`install`
runs is handled at once.
"""

from __future__ import annotations

import os
import sys

FLAG = "OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG"
AUTOLOAD = "MEGATRON_QAT_AUTOLOAD"
EXTENSIONS_MODULE = "megatron.core.extensions.transformer_engine"
MOE_LAYER_MODULE = "megatron.core.transformer.moe.moe_layer"


def _on_extensions_imported() -> None:
    from .patch import enable_from_env

    enable_from_env(_from_autoload=True)


def _on_moe_layer_imported() -> None:
    from .patch import on_moe_layer_imported

    on_moe_layer_imported()


_CALLBACKS = {EXTENSIONS_MODULE: _on_extensions_imported, MOE_LAYER_MODULE: _on_moe_layer_imported}


class _PostExecLoader:
    """Delegates to the real loader, then runs the callback once the module has executed."""

    def __init__(self, loader, finder: "_PostImportFinder", fullname: str):
        self._loader = loader
        self._finder = finder
        self._fullname = fullname

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._finder.fire(self._fullname)

    def __getattr__(self, name):  # get_source, get_code, is_package, ... of the real loader
        return getattr(self._loader, name)


class _PostImportFinder:
    """A ``sys.meta_path`` finder that only wraps the loaders of :data:`_CALLBACKS`' modules."""

    def __init__(self):
        self.pending = set(_CALLBACKS)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PostExecLoader(spec.loader, self, fullname)
                return spec
        return None

    def fire(self, fullname: str) -> None:
        self.pending.discard(fullname)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        _CALLBACKS[fullname]()


_finder: _PostImportFinder | None = None


def flag_requests_autoload(environ=None) -> bool:
    """The .pth condition: fake-QAT flag not off, and ``MEGATRON_QAT_AUTOLOAD`` not ``"0"``."""
    env = os.environ if environ is None else environ
    return env.get(FLAG, "").strip() not in ("", "0") and env.get(AUTOLOAD, "1").strip() != "0"


def install() -> None:
    """Install the finder (idempotent); modules already imported are handled now."""
    global _finder
    if _finder is None:
        _finder = _PostImportFinder()
        sys.meta_path.insert(0, _finder)
    for name in (EXTENSIONS_MODULE, MOE_LAYER_MODULE):
        module = sys.modules.get(name)
        if name in _finder.pending and module is not None and (
            name != MOE_LAYER_MODULE or hasattr(module, "MoELayer")
        ):
            _finder.fire(name)


def is_watching(fullname: str) -> bool:
    """Whether the finder will still fire for ``fullname``."""
    return _finder is not None and fullname in _finder.pending and _finder in sys.meta_path


def uninstall() -> None:
    """Remove the finder (tests)."""
    global _finder
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    _finder = None
