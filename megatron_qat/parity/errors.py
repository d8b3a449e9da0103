"""Errors that end a parity run with exit code 2 (usage or environment problem)."""

from __future__ import annotations

EXIT_EQUAL = 0
EXIT_MISMATCH = 1
EXIT_ERROR = 2


class ParityError(Exception):
    """A usage or environment problem: bad flag, missing/corrupt file, unusable reference.
    The message names the file, tensor or flag at fault and what is accepted; exit code 2."""
