"""Per-layer MXFP4 statistics of the fake-quantized expert weights, on logging steps only.

The Megatron weight hook calls, per forward of each patched ``TEGroupedLinear``::

    if metrics.due():
        metrics.observe(module, master_weights, block_size)

:func:`due` is one attribute read (the answer is computed once per step); on a logging step
:func:`observe` measures the module's master weights once in a separate pass
(:mod:`.block_stats`; the bit-exact QDQ kernel is untouched), and when the step ends (the optimizer
steps) the statistics are reduced over the expert x pipeline ranks and published: Megatron's
TensorBoard / W&B writers under ``megatron_qat/layer_<L>/fc1/<metric>``, one INFO summary line,
subscribers, :func:`snapshot`. docs/metrics.md says what each metric means.

Interval: ``MEGATRON_QAT_METRICS_INTERVAL`` (non-negative integer; 0 = off), else Megatron's
``--log-interval``, else 100. What a step is: :mod:`.recorder`.
"""

from __future__ import annotations

from typing import Callable

from .labels import register_moe_layer
from .megatron_env import INTERVAL_ENV, interval_from_env
from .recorder import Recorder
from .reduction import METRICS

__all__ = [
    "INTERVAL_ENV",
    "METRICS",
    "due",
    "observe",
    "install",
    "uninstall",
    "register_moe_layer",
    "subscribe",
    "snapshot",
    "last_step",
    "step_end",
    "set_step",
    "interval",
    "interval_from_env",
    "reset",
]

_recorder = Recorder()


def due() -> bool:
    """Whether the step in progress is a logging step (cheap: call it on every forward)."""
    return _recorder.due()


def observe(module, master_weights, block_size: int, label: str | None = None) -> None:
    """Measure ``module``'s master weights for this logging step (once per module per step).

    Args:
        module: the patched ``TEGroupedLinear`` (its label comes from :func:`register_moe_layer`).
        master_weights: what the original ``_get_weight_tensors`` returned: N tensors
            ``[out, in]`` or one ``[N, out, in]``, float16/bfloat16/float32, one device.
        block_size: the MXFP4 block size in force.
        label: overrides the derived ``layer_<L>/fc1`` name (e.g. ``"layer_3/fc1"``).
    A no-op on other steps. Does not synchronise with the device."""
    _recorder.observe(module, master_weights, block_size, label)


def install() -> None:
    """Validate ``MEGATRON_QAT_METRICS_INTERVAL`` now (a bad value raises ValueError naming it) and
    register the optimizer step post-hook that ends steps. Idempotent; :func:`due` installs it too.
    Called again after :func:`uninstall` (``disable()`` then ``enable()``), it resolves the interval
    again, so a changed variable is followed."""
    _recorder.install()


def uninstall() -> None:
    """Remove the optimizer step post-hook (pending statistics are kept)."""
    _recorder.uninstall()


def subscribe(fn: Callable[[dict, int], None]) -> Callable[[], None]:
    """Call ``fn(values, step)`` after each logging step, on every rank, with the reduced values
    (``{"megatron_qat/layer_3/fc1/rel_rmse": 0.09, ...}``) and the iteration count Megatron logs at.
    Returns a function that unsubscribes. Exceptions raised by ``fn`` propagate."""
    return _recorder.subscribe(fn)


def snapshot() -> dict[str, float]:
    """A copy of the last published values (``{}`` before the first logging step)."""
    return dict(_recorder.last)


def last_step() -> int | None:
    """The step of :func:`snapshot`'s values (Megatron's iteration count), ``None`` before any."""
    return _recorder.last_step


def step_end() -> None:
    """End the step by hand (the optimizer post-hook does it in training): publish a logging step's
    statistics, then advance. A collective over the expert x pipeline group on logging steps."""
    _recorder.step_end()


def set_step(step: int) -> None:
    """Set the 0-based number of the step in progress (e.g. an RL framework's own step counter)."""
    _recorder.set_step(step)


def interval() -> int:
    """The logging interval in force (resolved on first use)."""
    if not _recorder.started:
        _recorder.start()
    return _recorder.interval


def reset() -> None:
    """Forget all state and remove the hook (tests; a new run in the same process)."""
    global _recorder
    _recorder.uninstall()
    _recorder = Recorder()
