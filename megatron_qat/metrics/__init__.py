"""Per-layer MXFP4 statistics of the fake-quantized expert weights, on logging steps only.

The fake-QAT runtime (:mod:`megatron_qat.megatron.runtime`) owns one :class:`Recorder` while it is
active (unless ``MEGATRON_QAT_METRICS_INTERVAL=0``). Per forward of each patched
``TEGroupedLinear`` it asks ``recorder.due()`` (one attribute read: the answer is computed once per
step); on a logging step ``recorder.observe`` measures the module's master weights once, in a
separate pass (:mod:`.block_stats`; the bit-exact QDQ kernel is untouched), and when the step ends
(the runtime's optimizer-step post-hook) the statistics are reduced over the expert x pipeline
ranks and published: Megatron's TensorBoard / W&B writers under
``megatron_qat/layer_<L>/fc1/<metric>``, one INFO summary line, subscribers, :func:`snapshot`.
docs/metrics.md says what each metric means.

Interval: ``MEGATRON_QAT_METRICS_INTERVAL`` (non-negative integer; 0 = off), else Megatron's
``--log-interval``, else 100. What a step is: :mod:`.recorder`.

The functions below act on the active runtime's recorder; they raise RuntimeError when fake-QAT is
not enabled or its metrics are off.
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
    "Recorder",
    "register_moe_layer",
    "current_recorder",
    "subscribe",
    "snapshot",
    "last_step",
    "step_end",
    "set_step",
    "interval",
    "interval_from_env",
]


def current_recorder() -> Recorder:
    """The active fake-QAT runtime's recorder.

    Raises:
        RuntimeError: fake-QAT is not enabled in this process, or ``MEGATRON_QAT_METRICS_INTERVAL=0``.
    """
    from ..megatron.install import current

    runtime = current()
    if runtime is None or not runtime.active:
        raise RuntimeError(
            "megatron_qat.metrics: MXFP4 fake-QAT is not enabled in this process (call megatron_qat.enable(), "
            "or set OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG=1 and import megatron.core)"
        )
    if runtime.recorder is None:
        raise RuntimeError(f"megatron_qat.metrics: the statistics are off ({INTERVAL_ENV}=0)")
    return runtime.recorder


def subscribe(fn: Callable[[dict, int], None]) -> Callable[[], None]:
    """Call ``fn(values, step)`` after each logging step, on every rank, with the reduced values
    (``{"megatron_qat/layer_3/fc1/rel_rmse": 0.09, ...}``) and the iteration count Megatron logs at.
    Returns a function that unsubscribes. Exceptions raised by ``fn`` propagate."""
    return current_recorder().subscribe(fn)


def snapshot() -> dict[str, float]:
    """A copy of the last published values (``{}`` before the first logging step)."""
    return dict(current_recorder().last)


def last_step() -> int | None:
    """The step of :func:`snapshot`'s values (Megatron's iteration count), ``None`` before any."""
    return current_recorder().last_step


def step_end() -> None:
    """End the step by hand (the optimizer post-hook does it in training): publish a logging step's
    statistics, then advance. A collective over the expert x pipeline group on logging steps."""
    current_recorder().step_end()


def set_step(step: int) -> None:
    """Set the 0-based number of the step in progress (e.g. an RL framework's own step counter)."""
    current_recorder().set_step(step)


def interval() -> int:
    """The logging interval in force (resolved on first use)."""
    rec = current_recorder()
    rec.start()
    return rec.interval
