"""enable / disable / is_enabled / enable_from_env: install and remove the two class patches.

- ``TEGroupedLinear._get_weight_tensors`` (:func:`_patch_get_weight_tensors`): the weight hook.
- ``MoELayer.__init__`` (:func:`_patch_moe_layer_init`): guards at model build.

Each patch wraps what attribute resolution gives on the class, records whether the class had its
own attribute (``__dict__``), marks the wrapper with :data:`hook.SENTINEL` (idempotence) and is
undone exactly: the previous own attribute is put back, or ours is deleted when there was none.

``MoELayer``'s module imports ``megatron.core.extensions.transformer_engine`` half-way through its
own import, so when the autoload fires there the ``MoELayer`` class may not exist yet; the
autoload finder watches that module too and calls :func:`on_moe_layer_imported` when it is done.
"""

from __future__ import annotations

import importlib
import sys

from .hook import SENTINEL, make_get_weight_tensors, make_moe_layer_init
from .versions import EXTENSIONS_MODULE, MOE_LAYER_MODULE, load_te_grouped_linear

_block_size: int | None = None
_undo: dict[str, tuple] = {}  # symbol -> (class, attribute name, had own attribute, previous own value)
_grouped_linear_cls = None
_MISSING = object()


def _current_block_size() -> int:
    return _block_size if _block_size is not None else 32


def _current_grouped_linear_cls():
    return _grouped_linear_cls


def _wrap_class_attribute(symbol: str, cls, name: str, make_wrapper) -> None:
    current = getattr(cls, name)
    if getattr(current, SENTINEL, False):
        return  # already ours
    own = cls.__dict__.get(name, _MISSING)
    setattr(cls, name, make_wrapper(current))
    _undo[symbol] = (cls, name, own is not _MISSING, own)


def _restore(symbol: str) -> None:
    cls, name, had_own, own = _undo.pop(symbol)
    if had_own:
        setattr(cls, name, own)
    else:
        delattr(cls, name)


def _check_subclass_overrides(cls) -> None:
    """A subclass with its own ``_get_weight_tensors`` would shadow the wrapper on ``cls``."""
    pending = list(cls.__subclasses__())
    while pending:
        sub = pending.pop()
        pending.extend(sub.__subclasses__())
        if "_get_weight_tensors" in sub.__dict__ and not getattr(sub.__dict__["_get_weight_tensors"], SENTINEL, False):
            raise RuntimeError(
                f"MXFP4 fake-QAT: {sub.__module__}.{sub.__qualname__} overrides _get_weight_tensors, so the wrapper "
                f"installed on {cls.__qualname__} would not run for it; move that override onto TEGroupedLinear "
                "(the wrapper then runs after it)"
            )


def _patch_get_weight_tensors(cls) -> None:
    _check_subclass_overrides(cls)
    _wrap_class_attribute(
        "TEGroupedLinear._get_weight_tensors",
        cls,
        "_get_weight_tensors",
        lambda original: make_get_weight_tensors(original, _current_block_size),
    )


def _patch_moe_layer_init(cls) -> None:
    _wrap_class_attribute(
        "MoELayer.__init__",
        cls,
        "__init__",
        lambda original: make_moe_layer_init(original, _current_grouped_linear_cls, _current_block_size),
    )


def on_moe_layer_imported() -> None:
    """Called by the autoload finder once ``megatron.core.transformer.moe.moe_layer`` has executed."""
    module = sys.modules.get(MOE_LAYER_MODULE)
    if is_enabled() and module is not None and hasattr(module, "MoELayer"):
        _patch_moe_layer_init(module.MoELayer)


def _patch_moe_layer(from_autoload: bool) -> None:
    module = sys.modules.get(MOE_LAYER_MODULE)
    if module is None and not from_autoload:
        module = importlib.import_module(MOE_LAYER_MODULE)
    if module is None:
        return  # not imported yet: the autoload finder patches it when it is
    if hasattr(module, "MoELayer"):
        _patch_moe_layer_init(module.MoELayer)
        return
    from . import autoload

    if not autoload.is_watching(MOE_LAYER_MODULE):
        raise RuntimeError(
            f"megatron_qat.enable() was called while {MOE_LAYER_MODULE} is half-imported; call it after the "
            "Megatron imports (or rely on OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG=1 autoload)"
        )


def enable(block_size: int | None = None, *, _from_autoload: bool = False) -> None:
    """Turn MXFP4 fake-QAT on for every ``TEGroupedLinear`` (routed MoE experts).

    Args:
        block_size: elements per E8M0 scale along K (``None``: ``OPEN_TRAINING_MXFP4_BLOCK_SIZE``,
            default 32 = FlashInfer). Calling again only updates the block size.
    Raises:
        ImportError: megatron-core or Transformer Engine missing or too old (the message names the
            installed versions and the minimums 0.13 / 2.5).
        RuntimeError: a subclass of ``TEGroupedLinear`` overrides ``_get_weight_tensors``.
    """
    global _block_size, _grouped_linear_cls
    from ..config import from_env
    from ..numerics.format import check_block_size

    if block_size is None:
        block_size = from_env().block_size
    check_block_size(block_size, "block_size")
    _, cls = load_te_grouped_linear()
    was_enabled = is_enabled()
    try:
        _patch_get_weight_tensors(cls)
        _grouped_linear_cls = cls
        _block_size = block_size
        _patch_moe_layer(_from_autoload)
    except BaseException:
        if not was_enabled:
            disable()  # all or nothing
        raise


def disable() -> None:
    """Undo :func:`enable` exactly (no-op when not enabled)."""
    global _block_size, _grouped_linear_cls
    for symbol in list(_undo):
        _restore(symbol)
    _block_size = None
    _grouped_linear_cls = None


def is_enabled() -> bool:
    """True while ``TEGroupedLinear._get_weight_tensors`` is wrapped by :func:`enable`."""
    return "TEGroupedLinear._get_weight_tensors" in _undo


def enable_from_env(environ=None, *, _from_autoload: bool = False) -> bool:
    """Enable when ``OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG=1`` (block size from
    ``OPEN_TRAINING_MXFP4_BLOCK_SIZE``). Returns whether fake-QAT is on afterwards.

    Raises:
        ValueError: a variable holds an unaccepted value. RuntimeError: the INT4 flag is on too.
        ImportError: the flag is on but megatron-core / Transformer Engine cannot be patched.
    """
    from ..config import from_env

    cfg = from_env(environ)
    if cfg.enabled:
        enable(cfg.block_size, _from_autoload=_from_autoload)
    return is_enabled()


__all__ = ["enable", "disable", "is_enabled", "enable_from_env", "EXTENSIONS_MODULE"]
