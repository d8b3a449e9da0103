"""Exit codes of a parity run, and the error that ends one with exit code 2."""

from __future__ import annotations

EXIT_EQUAL = 0  # every selected tensor compared in full (or the deliberate --sample-rows sample) and identical
EXIT_MISMATCH = 1  # at least one difference
EXIT_ERROR = 2  # usage or environment error (one line on stderr)
EXIT_INCOMPLETE = 3  # identical where compared, but something selected was not compared (--allow-incomplete: 0)


class ParityError(Exception):
    """A usage or environment problem: bad flag, missing/corrupt file, unusable reference or kernel,
    unknown tensor layout. The message (one line) names the file, tensor, flag or variable at fault
    and what is accepted; exit code 2."""
