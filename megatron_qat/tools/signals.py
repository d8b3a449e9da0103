"""SIGINT, SIGTERM and SIGHUP as an exception, so that an interrupted command cleans up.

``timeout``, Slurm and Kubernetes send SIGTERM, a closed SSH session SIGHUP, Ctrl-C SIGINT. By
default the first two kill Python on the spot (no ``finally`` runs, a half-written output
directory stays). Inside :func:`raising`, each of the three raises :class:`Interrupted` in the main
thread instead, so ``with`` blocks and ``finally`` clauses remove what was half-written; the
command then prints one line and ends by the same signal (:func:`end_by`), so its parent (a shell,
``timeout``, Slurm) sees a process killed by that signal (shell status 128 + N).

:func:`deferred` holds :class:`Interrupted` back during a critical section (create a directory and
remember it; remove it; publish it) or a call into foreign code (safetensors' Rust calls back into
Python, and an exception raised there comes out as another error): a signal that arrives meanwhile
is recorded by the handler, and raised when the section ends. Blocking the signal instead
(``pthread_sigmask``) would not do: it masks the calling thread only, and the kernel hands a
process-directed signal to any thread that does not mask it (torch's worker threads), whose C
handler then trips the flag the main thread acts on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# the process's signal state (main thread only): how deep in deferred() sections it is, and the
# signals that arrived there, to be raised when the outermost section ends
_depth = 0
_pending: list[int] = []


class Interrupted(BaseException):
    """A handled signal arrived (a ``BaseException``, like ``KeyboardInterrupt``: ``except
    Exception`` does not swallow it)."""

    def __init__(self, signum: int):
        self.signum = signal.Signals(signum)
        super().__init__(self.signum.name)


def _raise(signum, frame):
    if _depth:
        _pending.append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def raising():
    """Within: SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` (main thread only; elsewhere
    Python cannot install handlers and this does nothing). The previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in HANDLED}
    _pending.clear()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred():
    """Within, a handled signal is recorded, not raised; the outermost section's end raises
    :class:`Interrupted` for the first one (the code inside ran to its end, or to its own error)."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending:
            signum = _pending[0]
            _pending.clear()
            raise Interrupted(signum)


def end_by(signum: int) -> None:
    """End this process by ``signum`` with its default action (what a shell expects of a child that
    was killed by it); returns only if the signal does not end the process."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
