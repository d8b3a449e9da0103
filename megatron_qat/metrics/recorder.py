"""The step clock and the per-step state behind :mod:`megatron_qat.metrics`.

A *step* is one training iteration. ``step`` is the 0-based number of the iteration in progress.
It ends when an optimizer steps: the fake-QAT runtime's optimizer-step post-hook calls
:meth:`Recorder.on_optimizer_step`, which counts ONE optimizer
(the first one seen stepping, weakly referenced; when it is gone the next one to step takes its
place), so that Megatron's ``ChainedOptimizer`` (dense + expert optimizers) ends one step, not two.

- It starts at Megatron's ``args.iteration`` (the resumed iteration) when Megatron args are set,
  else 0, and advances by one at each step end.
- Megatron's ``args.curr_iteration`` (set by its training loop before each ``train_step``) is
  followed whenever it changes, at the next forward or step end, so iterations Megatron counts
  without an optimizer step (fp16 overflow, ``--iterations-to-skip``) keep the two clocks aligned.
  A value that never changes (a framework that does not maintain it) is ignored. The statistics
  of a logging iteration whose optimizer step was skipped are dropped, not published late.
- :func:`megatron_qat.metrics.step_end` ends a step by hand (an RL worker with no optimizer) and
  :func:`megatron_qat.metrics.set_step` sets the number.

Every rank takes the same publish decision from the same clock, so the collectives of
:mod:`.reduction` (run at step end, never from a forward) match across the group.

A step is a logging step when ``interval > 0 and (step + 1) % interval == 0``: the same iterations at
which Megatron's ``training_log`` writes (``iteration % log_interval == 0`` after the increment).
The answer is computed once per step, so :func:`due` is an attribute read (plus, under Megatron, one\ncomparison with ``args.curr_iteration``).

Within a logging step each module is measured once (its first forward: micro-batches, activation
recompute and no-grad log-prob passes see the same master weights). At the step's end the pending
statistics are reduced (:mod:`.reduction`) and published (:mod:`.sinks`, subscribers, snapshot).
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch

from . import megatron_env, sinks
from ..numerics.rules import FLASHINFER_MXFP4, Rule
from .block_stats import GroupedStats, LocalStats, split_experts
from .labels import Labeller, expert_ids
from .reduction import reduce, reduction_group, scalars


def _capturing(weights) -> bool:
    """Whether a CUDA-graph capture is in progress on the current stream (CUDA weights only: the
    query itself needs a CUDA build)."""
    return bool(weights) and getattr(weights[0], "is_cuda", False) and torch.cuda.is_current_stream_capturing()


class Recorder:
    def __init__(self):
        self.started = False
        self.interval = 0
        self.step = 0
        self.is_due = False
        self.pending: dict[str, LocalStats] = {}
        self.pending_step: int | None = None
        self._args = None  # Megatron's args Namespace, when set
        self._seen_iteration: int | None = None
        self._observed: set[int] = set()
        self._labeller = Labeller()
        self._subscribers: dict[int, Callable] = {}
        self._next_subscriber = 0
        self.last: dict[str, float] = {}
        self.last_step: int | None = None
        self._warned: set[tuple[str, int]] = set()
        self._clock_optimizer = None
        self._stats: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> its GroupedStats

    # -- clock ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Resolve the interval and the first step number (first forward or first optimizer step)."""
        if self.started:
            return
        self.interval = megatron_env.resolve_interval()
        self._args = megatron_env.megatron_args()
        resumed = megatron_env.megatron_iteration("iteration")
        self.step = resumed if resumed is not None else 0
        self.started = True
        self._update_due()
        self.sync_megatron()

    def sync_megatron(self) -> None:
        """Follow ``args.curr_iteration`` when it has changed since last seen."""
        current = getattr(self._args, "curr_iteration", None)
        if current != self._seen_iteration and isinstance(current, int) and not isinstance(current, bool):
            self._seen_iteration = current
            if current != self.step:
                self._move_to(current)

    def _update_due(self) -> None:
        self.is_due = self.interval > 0 and (self.step + 1) % self.interval == 0

    def on_optimizer_step(self, optimizer) -> None:
        """An optimizer stepped (the runtime's post-hook): end the step if it is the clock optimizer."""
        clock = self._clock_optimizer() if self._clock_optimizer is not None else None
        if clock is None:
            self._clock_optimizer = weakref.ref(optimizer)
        elif clock is not optimizer:
            return
        self.step_end()

    def step_end(self) -> None:
        """End the step in progress: publish it if it is a logging step, then advance the clock."""
        self.start()
        if self._args is None:
            self._args = megatron_env.megatron_args()  # set after the first forward
        self.sync_megatron()
        if self.is_due:
            self.flush()
        self._move_to(self.step + 1)

    def set_step(self, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"megatron_qat.metrics.set_step: step must be a non-negative int, got {step!r}")
        self.start()
        self._move_to(step)

    def _move_to(self, step: int) -> None:
        self.step = step
        self._observed.clear()
        self._update_due()

    def due(self) -> bool:
        if not self.started:
            self.start()
        if self._args is not None and getattr(self._args, "curr_iteration", None) != self._seen_iteration:
            self.sync_megatron()
        return self.is_due

    # -- measuring -----------------------------------------------------------------------------
    def observe(self, module, master_weights, block_size: int, label: str | None = None,
                rule: Rule = FLASHINFER_MXFP4) -> None:
        """Measure ``module``'s master weights under the weight ``rule`` once in a logging step (its
        :class:`GroupedStats` keeps the statistics kernel's launch state across steps)."""
        if not self.is_due or id(module) in self._observed:
            return
        weights = list(master_weights)
        if _capturing(weights):
            # kernels recorded into a CUDA graph do not run now: the statistics would be read at the
            # step's end from memory no kernel has written. Measure at the next eager forward.
            return
        self._observed.add(id(module))
        if self.pending_step != self.step:
            self.pending, self.pending_step = {}, self.step  # a logging step that never ended: dropped
        name = self._labeller.label_of(module, label)
        ids = expert_ids(module, len(split_experts(weights)))
        grouped = self._stats.get(module)
        if grouped is None or grouped.block_size != block_size or grouped.rule != rule:
            grouped = self._stats[module] = GroupedStats(block_size, rule=rule)
        stats = grouped(weights, ids)
        previous = self.pending.get(name)
        self.pending[name] = stats if previous is None else previous.merged(stats)

    # -- publishing ----------------------------------------------------------------------------
    def flush(self) -> dict[str, float]:
        """Reduce and publish the pending statistics (a collective over the reduction group)."""
        pending = self.pending if self.pending_step == self.step else {}
        self.pending = {}
        raw = reduce(pending, reduction_group())
        step = self.step + 1
        self._warn_nonfinite(pending, raw, step)
        if not raw:
            return {}
        values = {sinks.tag(label, metric): value for label, r in raw.items() for metric, value in scalars(r).items()}
        self.last, self.last_step = values, step
        sinks.write_to_megatron(values, step)
        sinks.log_summary(raw, values, step)
        for fn in list(self._subscribers.values()):
            fn(dict(values), step)
        return values

    def _warn_nonfinite(self, pending: dict[str, LocalStats], raw: dict, step: int) -> None:
        for label, stats in pending.items():
            if raw.get(label, {}).get("nonfinite_blocks", 0) == 0:
                continue  # healthy everywhere: no extra host copy
            for expert, blocks in zip(stats.expert_ids, stats.nonfinite_per_expert.tolist()):
                if blocks and (label, expert) not in self._warned:
                    self._warned.add((label, expert))
                    sinks.warn_nonfinite(label, expert, blocks, stats.block_size, step)

    def subscribe(self, fn: Callable) -> Callable[[], None]:
        if not callable(fn):
            raise TypeError(f"megatron_qat.metrics.subscribe: expected a callable fn(values, step), got {fn!r}")
        key = self._next_subscriber
        self._next_subscriber += 1
        self._subscribers[key] = fn

        def unsubscribe() -> None:
            self._subscribers.pop(key, None)

        return unsubscribe
