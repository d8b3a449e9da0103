"""What the metrics read from the environment and from Megatron's training globals, lazily.

| source | what | when absent |
|---|---|---|
| ``MEGATRON_QAT_METRICS_INTERVAL`` | non-negative integer; ``0`` turns the metrics off | follow Megatron |
| ``megatron.training.get_args().log_interval`` | Megatron's ``--log-interval`` | :data:`DEFAULT_INTERVAL` |
| ``get_args().iteration`` / ``.curr_iteration`` | resumed iteration / iteration in progress | own count |
| ``get_tensorboard_writer()`` / ``get_wandb_writer()`` | Megatron's writers (last rank only) | nothing written |

The pip ``megatron-core`` package has no ``megatron.training``: an ``ImportError`` for
``megatron.training`` itself is the "not present" case; any other error while importing it
(a broken dependency inside it) propagates.
"""

from __future__ import annotations

from typing import Mapping

from ..config import METRICS_INTERVAL as INTERVAL_ENV
from ..config import metrics_interval

DEFAULT_INTERVAL = 100  # Megatron's own --log-interval default, used when there is no Megatron args


def interval_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The interval ``MEGATRON_QAT_METRICS_INTERVAL`` asks for, or ``None`` when unset/empty.

    Raises:
        ValueError: anything but a non-negative decimal integer (:func:`megatron_qat.config.read`'s
            one rule: the message names the variable and the accepted values).
    """
    return metrics_interval(environ)


def megatron_training():
    """The ``megatron.training`` package, or ``None`` when it is not installed (pip megatron-core)."""
    try:
        import megatron.training as training
    except ImportError as e:
        if e.name in ("megatron", "megatron.training"):
            return None
        raise
    return training


def megatron_args():
    """Megatron's parsed arguments, or ``None`` when ``megatron.training`` is absent or its arguments
    are not set yet (``get_args`` asserts that they are initialised; that assertion is its answer)."""
    training = megatron_training()
    if training is None:
        return None
    try:
        return training.get_args()
    except AssertionError:  # global_vars._ensure_var_is_initialized: "args is not initialized."
        return None


def resolve_interval(environ: Mapping[str, str] | None = None) -> int:
    """The interval in force: the environment variable, else Megatron's ``log_interval``, else 100."""
    value = interval_from_env(environ)
    if value is not None:
        return value
    args = megatron_args()
    if args is not None and getattr(args, "log_interval", None) is not None:
        log_interval = args.log_interval
        if isinstance(log_interval, bool) or not isinstance(log_interval, int) or log_interval < 0:
            raise ValueError(f"megatron args.log_interval={log_interval!r}: expected a non-negative integer")
        return log_interval
    return DEFAULT_INTERVAL


def megatron_iteration(attr: str) -> int | None:
    """``get_args().<attr>`` (``iteration`` or ``curr_iteration``) as an int, or ``None``."""
    args = megatron_args()
    value = getattr(args, attr, None) if args is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def megatron_writers() -> tuple:
    """``(tensorboard_writer, wandb_writer)`` from ``megatron.training``; each may be ``None``."""
    training = megatron_training()
    if training is None:
        return None, None
    return training.get_tensorboard_writer(), training.get_wandb_writer()
