"""The ``megatron-qat`` console script: a thin argparse dispatcher over subcommands.

Add a subcommand by appending ``(name, help, add_arguments, run)`` to :data:`SUBCOMMANDS`, where
``add_arguments(parser)`` registers its flags and ``run(args) -> int`` returns the exit code.
Subcommand modules are imported only when needed (``megatron-qat --help`` stays light).
"""

from __future__ import annotations

import argparse
import sys


def _parity_arguments(parser: argparse.ArgumentParser) -> None:
    from .parity.options import add_arguments

    add_arguments(parser)


def _parity_run(args: argparse.Namespace) -> int:
    from .parity.runner import run_and_report_errors

    return run_and_report_errors(args)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    from .export.command import add_arguments

    add_arguments(parser)


def _export_run(args: argparse.Namespace) -> int:
    from .export.command import run

    return run(args)


SUBCOMMANDS = [
    (
        "parity",
        "check MXFP4 bit-parity against FlashInfer or the golden model (docs/parity.md)",
        _parity_arguments,
        _parity_run,
    ),
    (
        "export",
        "convert a BF16 HF checkpoint to MXFP4 (gpt-oss or compressed-tensors), or --verify one (docs/export.md)",
        _export_arguments,
        _export_run,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="megatron-qat", description="megatron-qat tools")
    parser.add_argument("--version", action="version", version=f"megatron-qat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add_arguments, run in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand. An argument the subcommand does not know is reported
    by the subcommand's own parser (its usage line, exit 2), not by the top-level one."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
