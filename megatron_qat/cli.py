"""The ``megatron-qat`` console script: one argparse dispatcher, one way to end a command.

Every subcommand (:data:`COMMANDS`: ``parity``, ``export``) runs through :func:`execute`, which

1. checks the environment first (:func:`megatron_qat.config.from_env`: every variable's value, and
   any ``MEGATRON_QAT_*`` / ``OPEN_TRAINING_MXFP4_*`` name that is not ours, e.g. a misspelt one);
2. turns SIGINT / SIGTERM / SIGHUP into an exception while the command runs
   (:mod:`megatron_qat.tools.signals`), so what it was writing is removed;
3. ends every refused input the same way (:mod:`megatron_qat.tools.errors`): one line
   ``megatron-qat COMMAND: error: ...`` on stderr, exit 2; an interruption: one line, then the
   exception again (``KeyboardInterrupt`` for SIGINT), which :func:`console_main` turns into the
   process ending by that signal.

Subcommand modules are imported only when needed (``megatron-qat --help`` stays light).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable

from .tools import errors, signals


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    # writes what the command records about a refusal (parity: the --json report); returns a note
    # for the error line ("" if none)
    record_error: Callable[[argparse.Namespace, str], str] | None = None
    # what an interrupted or failed run left (the end of its error line), e.g. "nothing written to DST"
    unwritten: Callable[[argparse.Namespace], str] = lambda args: "nothing written"


def _parity_arguments(parser: argparse.ArgumentParser) -> None:
    from .parity.options import add_arguments

    add_arguments(parser)


def _parity_run(args: argparse.Namespace) -> int:
    from .parity.runner import run

    return run(args)


def _parity_record_error(args: argparse.Namespace, text: str) -> str:
    from .parity.runner import record_error

    return record_error(args, text)


def _parity_unwritten(args: argparse.Namespace) -> str:
    return f"nothing written to {args.json}" if args.json else "nothing written"


def _export_unwritten(args: argparse.Namespace) -> str:
    if not args.out:
        return "nothing written"
    if os.path.isdir(args.out):  # a signal that came right after the rename into place
        return f"{args.out} had been written completely"
    return f"nothing written to {args.out}"


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    from .export.command import add_arguments

    add_arguments(parser)


def _export_run(args: argparse.Namespace) -> int:
    from .export.command import run

    return run(args)


COMMANDS = (
    Command(
        "parity",
        "check MXFP4 bit-parity against FlashInfer or the golden model (docs/parity.md)",
        _parity_arguments,
        _parity_run,
        record_error=_parity_record_error,
        unwritten=_parity_unwritten,
    ),
    Command(
        "export",
        "convert a BF16 HF checkpoint to MXFP4 (gpt-oss or compressed-tensors), or --verify one (docs/export.md)",
        _export_arguments,
        _export_run,
        unwritten=_export_unwritten,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="megatron-qat", description="megatron-qat tools")
    parser.add_argument("--version", action="version", version=f"megatron-qat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_command=command, _parser=p)
    return parser


def check_environment() -> None:
    """The variables' strict rule (:func:`megatron_qat.config.from_env`) as a one-line ToolError."""
    from . import config

    try:
        config.from_env()
    except (ValueError, RuntimeError) as exc:
        raise errors.ToolError(errors.message(exc)) from None


def execute(command: Command, args: argparse.Namespace) -> int:
    """Run ``command`` (see the module docstring); returns its exit code."""
    with signals.raising():
        try:
            check_environment()
            return int(command.run(args))
        except errors.ToolError as exc:
            text = errors.message(exc)
        except OSError as exc:  # disk full, permission, file size limit: what and where, in one line
            where = f"{exc.filename}: " if exc.filename else ""
            text = f"{where}{exc.strerror or errors.message(exc)} ({command.unwritten(args)})"
        except (signals.Interrupted, KeyboardInterrupt) as exc:
            signum = exc.signum if isinstance(exc, signals.Interrupted) else signal.SIGINT
            errors.report(command.name, f"interrupted by {signum.name}; {command.unwritten(args)}")
            if signum == signal.SIGINT and not isinstance(exc, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            raise
    note = command.record_error(args, text) if command.record_error else ""
    errors.report(command.name, text + note)
    return int(errors.ExitCode.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; returns the exit code. An interruption is raised again
    after cleanup (``KeyboardInterrupt`` for SIGINT, :class:`~megatron_qat.tools.signals.Interrupted`
    for SIGTERM / SIGHUP). An argument the subcommand does not know is reported by the subcommand's
    own parser (its usage line, exit 2), not by the top-level one."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return execute(args._command, args)


def console_main(argv: list[str] | None = None) -> None:
    """The ``megatron-qat`` executable: :func:`main`, then exit with its code, or end by the signal
    that interrupted it (after its one-line message and the cleanup)."""
    try:
        code = main(argv)
    except signals.Interrupted as exc:
        signals.end_by(exc.signum)
        code = 128 + exc.signum
    except KeyboardInterrupt:
        signals.end_by(signal.SIGINT)
        code = 128 + signal.SIGINT
    sys.exit(code)


if __name__ == "__main__":
    console_main()
