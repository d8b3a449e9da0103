"""``megatron-qat export``: argparse flags and the run function (registered in megatron_qat/cli.py).

    megatron-qat export SRC --format gpt-oss|compressed-tensors --out DST [--layout F] [--device cuda]
    megatron-qat export --verify DST --source SRC      # shipped bytes decode to fake_quantize(SRC)

Exit codes: 0 done (verify: identical), 1 verify found a difference, 2 a refused input or usage
error (one line on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import sys

from .. import layouts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", nargs="?", metavar="SRC", help="BF16 HF checkpoint: a directory, a *.safetensors.index.json or a *.safetensors file (config.json next to it)")
    parser.add_argument("--format", choices=("gpt-oss", "compressed-tensors"), help="gpt-oss MXFP4 (*_blocks/*_scales) or compressed-tensors mxfp4-pack-quantized (per expert weight_packed/weight_scale)")
    parser.add_argument("--out", metavar="DST", help="new output directory (must not exist; written atomically)")
    parser.add_argument("--layout", choices=layouts.FAMILIES, help="checkpoint family (default: from SRC's config.json)")
    parser.add_argument("--device", default="cpu", help="where to quantize: cpu (reference) or cuda (Triton kernel); default cpu")
    parser.add_argument("--max-shard-gib", type=float, default=2.0, help="output shard size in GiB (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    parser.add_argument("--verify", metavar="DST", help="instead of exporting: check that DST's MXFP4 bytes decode to exactly fake_quantize(--source)")
    parser.add_argument("--source", metavar="SRC", help="the BF16 source checkpoint for --verify")


def run(args: argparse.Namespace) -> int:
    from .codec import ExportError
    from .verify import EXIT_ERROR

    try:
        return _run(args)
    except (ExportError, layouts.LayoutError) as exc:
        print(f"megatron-qat export: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # unwritable --out parent, disk full, ...: the temporary output is already removed
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"megatron-qat export: error: {where}{exc.strerror or exc} (nothing written to --out)", file=sys.stderr)
        return EXIT_ERROR


def _run(args) -> int:
    from .codec import ExportError

    if args.verify:
        if not args.source or args.src or args.format or args.out:
            raise ExportError("--verify DST takes --source SRC (and optionally --layout) only")
        from .verify import verify_export

        result = verify_export(args.verify, args.source, family=args.layout)
        print(result.summary())
        return result.exit_code
    if not (args.src and args.format and args.out):
        raise ExportError("usage: megatron-qat export SRC --format gpt-oss|compressed-tensors --out DST (or --verify DST --source SRC)")
    if args.max_shard_gib <= 0:
        raise ExportError(f"--max-shard-gib must be positive, got {args.max_shard_gib}")
    from .offline import convert_checkpoint

    summary = convert_checkpoint(
        args.src, args.out, args.format, family=args.layout, device=args.device,
        max_shard_bytes=int(args.max_shard_gib * 2**30), progress=not args.no_progress,
    )
    print(f"export: wrote {summary['dst']} ({summary['expert_tensors']} expert tensor(s) MXFP4-encoded, "
          f"{summary['copied_tensors']} copied, {summary['bytes_written'] / 2**20:.1f} MiB)")
    return 0
