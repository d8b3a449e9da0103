"""The error that ends a parity run with exit code 2 (the exit codes: :class:`megatron_qat.tools.errors.ExitCode`)."""

from __future__ import annotations

from ..tools.errors import ToolError


class ParityError(ToolError):
    """A usage or environment problem of a parity run: bad flag, unusable reference or kernel,
    unknown tensor layout. The message (one line) names the file, tensor, flag or variable at fault
    and what is accepted; exit code 2."""
