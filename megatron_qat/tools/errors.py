"""The one error hierarchy and exit-code table of ``megatron-qat parity`` and ``megatron-qat export``.

=====  ===========================================================================================
exit   meaning
=====  ===========================================================================================
0      done; for a check: every selected tensor compared and bit-identical
1      a check found a difference (parity mismatch, export verification mismatch), and only that
2      a refused input or environment problem (:class:`ToolError`): one line on stderr naming the
       file / tensor / flag / variable and what is accepted; nothing left half-written
3      parity: identical where compared, but something selected was not compared
128+N  ended by signal N (SIGINT 130, SIGHUP 129, SIGTERM 143) after removing what was half-written
       (:mod:`.signals`): the process re-raises the signal, as a shell expects of a killed child
=====  ===========================================================================================

Library callers see the same classes: :class:`megatron_qat.export.ExportError`,
:class:`megatron_qat.layouts.LayoutError` and :class:`megatron_qat.parity.errors.ParityError` are
:class:`ToolError` subclasses (the first two also ``ValueError``).
"""

from __future__ import annotations

import enum
import sys


class ExitCode(enum.IntEnum):
    OK = 0
    MISMATCH = 1
    ERROR = 2
    INCOMPLETE = 3


class ToolError(Exception):
    """A user or environment error; its message is one line (what is wrong, with what, what to do)."""

    exit_code = ExitCode.ERROR


class CheckpointError(ToolError):
    """A checkpoint path that does not exist, is not what the command reads, or is corrupt."""


def message(exc: BaseException) -> str:
    """``exc``'s text as one line."""
    return " ".join(str(exc).splitlines()) or type(exc).__name__


def report(command: str, text: str) -> None:
    """Print ``megatron-qat COMMAND: error: TEXT`` on stderr; a stderr that is gone (a closed SSH
    session's terminal, a closed pipe) is not a second error."""
    try:
        print(f"megatron-qat {command}: error: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
