"""SIGINT, SIGTERM and SIGHUP as an exception, so that an interrupted command cleans up.

``timeout``, Slurm and Kubernetes send SIGTERM, a closed SSH session SIGHUP, Ctrl-C SIGINT. By
default the first two kill Python on the spot (no ``finally`` runs, a half-written output
directory stays). Inside :func:`raising`, each of the three raises :class:`Interrupted` in the main
thread instead, so ``with`` blocks and ``finally`` clauses remove what was half-written; the
command then prints one line and ends by the same signal (:func:`end_by`), so its parent (a shell,
``timeout``, Slurm) sees a process killed by that signal (shell status 128 + N).

:func:`deferred` holds the three signals back during a critical section (create a directory and
remember it; remove it; publish it) and delivers them when it ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A handled signal arrived (a ``BaseException``, like ``KeyboardInterrupt``: ``except
    Exception`` does not swallow it)."""

    def __init__(self, signum: int):
        self.signum = signal.Signals(signum)
        super().__init__(self.signum.name)


def _raise(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def raising():
    """Within: SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` (main thread only; elsewhere
    Python cannot install handlers and this does nothing). The previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in HANDLED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred():
    """Hold SIGINT, SIGTERM and SIGHUP back within (they stay pending); deliver them at the end."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def end_by(signum: int) -> None:
    """End this process by ``signum`` with its default action (what a shell expects of a child that
    was killed by it); returns only if the signal does not end the process."""
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
