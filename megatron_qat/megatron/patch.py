"""enable / disable / is_enabled / enable_from_env: install and remove the two class patches.

- ``TEGroupedLinear._get_weight_tensors``: the weight hook (:func:`hook.make_get_weight_tensors`).
- TE's ``GroupedLinear.forward`` (the base ``TEGroupedLinear.forward`` reaches with
  ``is_first_microbatch``): records that flag on the module for the per-step weight cache
  (:func:`.weight_cache.make_forward_wrapper`).
- ``MoELayer.__init__``: guards at model build (:func:`hook.make_moe_layer_init`).

:func:`enable` also configures the weight cache (``MEGATRON_QAT_CACHE``, a global optimizer-step
hook that invalidates it) and the metrics (``MEGATRON_QAT_METRICS_INTERVAL``, a global
optimizer-step hook that ends a step); :func:`disable` removes both.

Each patch wraps what attribute resolution gives on the class and records the class, whether the
class had its own attribute (``__dict__``) and the EXACT function object installed. Ours is found by
identity only, never by an attribute (``functools.wraps`` copies a function's ``__dict__``, so a
foreign wrapper made with it over ours would carry any marker of ours):

- :func:`enable` when already on only updates the block size; it never mistakes a foreign wrapper
  for ours.
- :func:`disable` with ours still on top of the class attribute puts back exactly what was there
  (the previous own attribute, or none). With a foreign wrapper on top of ours it never deletes or
  replaces that wrapper: ours is switched to a pass-through, the foreign wrapper stays, and a
  warning says so. A later :func:`enable` wraps whatever is on top then.

``MoELayer``'s module imports ``megatron.core.extensions.transformer_engine`` half-way through its
own import, so when fake-QAT is turned on from there the ``MoELayer`` class may not exist yet: the
wrapper is then installed by a post-import callback (:mod:`.import_watch`) when that module is done.

Fail closed (:mod:`.failclosed`): when the flag asks for fake-QAT (:func:`enable_from_env`) and it
cannot be applied, the failure is recorded as sticky, ``MoELayer.__init__`` is wrapped anyway (as a
pure guard that raises) and every optimizer step raises.

Dependency direction: :mod:`.autoload` imports this module; this module never imports it.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from . import announce, failclosed, import_watch
from .hook import Switch, make_get_weight_tensors, make_moe_layer_init
from .versions import EXTENSIONS_MODULE, MOE_LAYER_MODULE, load_te_grouped_linear

HOOK = "TEGroupedLinear._get_weight_tensors"
FORWARD = "GroupedLinear.forward"
MOE_INIT = "MoELayer.__init__"
_MISSING = object()
_log = logging.getLogger("megatron_qat")

_active = False
_step_hooks = False  # the weight cache and the metrics are configured (their optimizer-step hooks)
_block_size: int | None = None
_grouped_linear_cls = None


@dataclass
class _Installed:
    cls: type
    name: str
    own: object  # the class's own attribute before us, or _MISSING
    function: object  # exactly what we set on the class
    switch: Switch


_installed: dict[str, _Installed] = {}


def _current_block_size() -> int:
    return _block_size if _block_size is not None else 32


def _current_grouped_linear_cls():
    return _grouped_linear_cls


def installed_function(symbol: str):
    """The function object this module installed for ``symbol`` (``HOOK`` / ``MOE_INIT``), or None."""
    record = _installed.get(symbol)
    return record.function if record is not None else None


def _install(symbol: str, cls, name: str, make_wrapper) -> None:
    record = _installed.get(symbol)
    if record is not None and record.cls is cls and record.switch.active:
        return  # ours is on cls (on top, or under a foreign wrapper): nothing to add
    if record is not None:
        _uninstall(symbol)  # a different class (its module was re-executed): let go of the old one
    switch = Switch()
    wrapper = make_wrapper(getattr(cls, name), switch)
    own = cls.__dict__.get(name, _MISSING)
    setattr(cls, name, wrapper)
    _installed[symbol] = _Installed(cls, name, own, wrapper, switch)


def _uninstall(symbol: str) -> None:
    record = _installed.pop(symbol)
    record.switch.active = False
    if record.cls.__dict__.get(record.name) is record.function:
        if record.own is _MISSING:
            delattr(record.cls, record.name)
        else:
            setattr(record.cls, record.name, record.own)
        return
    _log.warning(
        "megatron_qat.disable(): %s.%s is no longer the function megatron_qat installed (a foreign wrapper was put "
        "on top of it, or it was replaced); that attribute is left in place and megatron_qat's wrapper under it is "
        "now a pass-through",
        record.cls.__qualname__,
        record.name,
    )


def _check_subclass_overrides(cls) -> None:
    from .guards import check_no_hook_override

    pending = list(cls.__subclasses__())
    while pending:
        sub = pending.pop()
        pending.extend(sub.__subclasses__())
        check_no_hook_override(sub, cls)


def _install_moe_layer_init(cls) -> None:
    _install(
        MOE_INIT,
        cls,
        "__init__",
        lambda original, switch: make_moe_layer_init(
            original, switch, is_enabled, _current_grouped_linear_cls, _current_block_size
        ),
    )


def on_moe_layer_imported(module) -> None:
    """Post-import callback for ``megatron.core.transformer.moe.moe_layer``: wrap ``MoELayer.__init__``
    while fake-QAT is on, or as a failure guard while a failure is recorded."""
    if (_active or failclosed.failed() is not None) and hasattr(module, "MoELayer"):
        _install_moe_layer_init(module.MoELayer)


def _patch_moe_layer() -> None:
    module = sys.modules.get(MOE_LAYER_MODULE)
    if module is not None and hasattr(module, "MoELayer"):
        _install_moe_layer_init(module.MoELayer)
    else:  # not imported yet, or half-imported (it imports the TE extension module half-way)
        import_watch.when_imported(MOE_LAYER_MODULE, on_moe_layer_imported)


def enable(block_size: int | None = None) -> None:
    """Turn MXFP4 fake-QAT on for every ``TEGroupedLinear`` (routed MoE experts).

    Args:
        block_size: elements per E8M0 scale along K (``None``: ``OPEN_TRAINING_MXFP4_BLOCK_SIZE``,
            default 32 = FlashInfer). Calling again only updates the block size.
    Raises:
        FakeQATUnavailableError: megatron-core or Transformer Engine missing or too old (the
            message names the installed versions and the minimums 0.13 / 2.5).
        RuntimeError: a subclass of ``TEGroupedLinear`` overrides ``_get_weight_tensors``.
    When ``OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG`` is set in ``os.environ`` a failure is sticky (see
    :func:`enable_from_env`).
    """
    from ..config import flag_requested

    _enable_or_record(block_size, flag_requested())


def _enable_or_record(block_size, requested: bool) -> None:
    try:
        _enable(block_size)
    except Exception as exc:
        if not requested:
            raise
        error = failclosed.unavailable(exc)
        failclosed.record(error)
        _patch_moe_layer()  # MoELayer.__init__ becomes a guard that raises
        if error is exc:
            raise
        raise error from exc


def _enable(block_size: int | None) -> None:
    global _active, _block_size, _grouped_linear_cls
    from ..config import from_env, kernel_choice
    from ..numerics.format import check_block_size

    if block_size is None:
        block_size = from_env().block_size
    kernel_choice()  # a malformed MEGATRON_QAT_KERNEL is refused before anything is patched
    check_block_size(block_size, "block_size")
    _, cls = load_te_grouped_linear()
    _check_subclass_overrides(cls)
    was_active = _active
    from .. import metrics
    from . import weight_cache

    try:
        _install(
            HOOK,
            cls,
            "_get_weight_tensors",
            lambda original, switch: make_get_weight_tensors(
                original, switch, _current_block_size, _current_grouped_linear_cls
            ),
        )
        _install(
            FORWARD,
            weight_cache.grouped_linear_forward_class(cls),
            "forward",
            lambda original, switch: weight_cache.make_forward_wrapper(original, switch),
        )
        global _step_hooks
        _step_hooks = True
        weight_cache.configure()
        metrics.install()
        _grouped_linear_cls = cls
        _block_size = block_size
        _active = True
        _patch_moe_layer()
    except BaseException:
        if not was_active:
            _turn_off()  # all or nothing
        raise
    failclosed.clear()
    if not was_active:
        announce.activated(block_size)


def _turn_off() -> None:
    global _active, _block_size, _grouped_linear_cls
    for symbol in list(_installed):
        _uninstall(symbol)
    global _step_hooks
    if _step_hooks:  # set up by _enable (they import torch: never import them just to undo nothing)
        from .. import metrics
        from . import weight_cache

        weight_cache.release()
        metrics.uninstall()
        _step_hooks = False
    import_watch.cancel(MOE_LAYER_MODULE, on_moe_layer_imported)
    _active = False
    _block_size = None
    _grouped_linear_cls = None
    announce.reset()


def disable() -> None:
    """Turn fake-QAT off in this process: undo :func:`enable` (see the module docstring for a foreign
    wrapper on top), forget a recorded failure, and stop the autoload from acting on later imports
    (an explicit decision to train without fake-QAT). No-op when off."""
    _turn_off()
    failclosed.clear()
    import_watch.cancel(EXTENSIONS_MODULE)
    import_watch.cancel(MOE_LAYER_MODULE)


def is_enabled() -> bool:
    """True while the ``TEGroupedLinear._get_weight_tensors`` wrapper is installed and active."""
    return _active


def enable_from_env(environ=None) -> bool:
    """Enable when ``OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG=1`` (block size from
    ``OPEN_TRAINING_MXFP4_BLOCK_SIZE``). Returns whether fake-QAT is on afterwards.

    When the flag is set (to anything but ``0``/empty) and this fails, the failure is recorded as
    sticky (:mod:`.failclosed`) before it is raised.

    Raises:
        ValueError: a variable holds an unaccepted value. RuntimeError: the INT4 flag is on too.
        FakeQATUnavailableError: the flag is on but megatron-core / Transformer Engine cannot be
            patched (any ImportError met on the way is turned into this error).
    """
    from ..config import flag_requested, from_env

    requested = flag_requested(environ)
    try:
        cfg = from_env(environ)
    except Exception as exc:
        if requested:
            failclosed.record(exc)
            _patch_moe_layer()
        raise
    if cfg.enabled:
        _enable_or_record(cfg.block_size, requested)
    return is_enabled()


__all__ = ["enable", "disable", "is_enabled", "enable_from_env", "installed_function", "EXTENSIONS_MODULE"]
