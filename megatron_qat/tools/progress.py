"""The one progress line of the command-line tools (stderr, no dependency).

``{label}: {items}/{total} {noun}, {amount}/{total amount} ({percent}%)``. On a terminal the line
overwrites itself (``\\r``), redrawn at most every 0.2 s; into a file or pipe (a Slurm log) a full
line is written at most every 30 s. Used as a context manager, its end finishes the line (a
newline after a drawn, unfinished line), so whatever is printed next (an error message, the
summary) starts on its own line.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

TERMINAL_INTERVAL_S = 0.2
LOG_INTERVAL_S = 30.0


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


class Progress:
    """Progress over ``total_items`` items (``noun``) weighing ``total_amount`` (shown by ``show``).

    ``enabled=False`` writes nothing. ``stream`` defaults to ``sys.stderr``."""

    def __init__(self, label: str, total_items: int, total_amount: int, *, noun: str, show: Callable[[int], str] = count,
                 enabled: bool = True, stream=None):
        self.label, self.noun, self.show = label, noun, show
        self.total_items, self.total_amount = total_items, total_amount
        self.items = self.amount = 0
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = None  # when the line was last drawn
        self._open = False  # a drawn line without its newline

    def advance(self, amount: int = 0, items: int = 0) -> None:
        self.amount += amount
        self.items += items
        if not self.enabled:
            return
        now = time.monotonic()
        interval = TERMINAL_INTERVAL_S if self.terminal else LOG_INTERVAL_S
        if self._last is None or now - self._last >= interval:
            self._last = now
            self._draw()

    def _text(self) -> str:
        pct = 100.0 * self.amount / self.total_amount if self.total_amount else 100.0
        return (f"{self.label}: {self.items}/{self.total_items} {self.noun}, "
                f"{self.show(self.amount)}/{self.show(self.total_amount)} ({pct:.0f}%)")

    def _draw(self) -> None:
        try:
            if self.terminal:
                self.stream.write("\r" + self._text())
                self._open = True
            else:
                self.stream.write(self._text() + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # stderr gone (closed terminal): progress is not worth an error
            self.enabled = False

    def close(self) -> None:
        """Finish the line: the final state when everything was done, else just the newline."""
        if not self.enabled:
            return
        if self.items == self.total_items and self.amount == self.total_amount:
            self._draw()  # the final state, also into a log
        try:
            if self._open:
                self.stream.write("\n")
                self.stream.flush()
        except (OSError, ValueError):
            pass
        self._open = False
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
