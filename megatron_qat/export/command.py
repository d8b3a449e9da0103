"""``megatron-qat export``: flags and the run function (registered in megatron_qat/cli.py, which
reports refusals and interruptions the one way, :mod:`megatron_qat.tools.errors`).

    megatron-qat export SRC --format gpt-oss|compressed-tensors --out DST [--layout F] [--device cuda] [--recipe R]
    megatron-qat export --verify DST --source SRC      # shipped bytes decode to fake_quantize(SRC)

Exit codes: 0 done (verify: identical), 1 verify found a difference, 2 a refused input or usage
error (one line on stderr, nothing written), 128+N ended by signal N (nothing written).
``--verify`` is :func:`megatron_qat.export.verify.run_check`, the door ``megatron-qat parity DST
--source SRC`` uses too.
"""

from __future__ import annotations

import argparse

from .. import layouts
from ..numerics.rules import RECIPES
from .offline import OFFLINE_FORMATS

VERIFY_RERUN = "megatron-qat export --verify {dst} --source {src}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", nargs="?", metavar="SRC", help="BF16 HF checkpoint: a directory, a *.safetensors.index.json or a *.safetensors file (config.json next to it)")
    parser.add_argument("--format", choices=OFFLINE_FORMATS, help="gpt-oss MXFP4 (*_blocks/*_scales) or compressed-tensors mxfp4-pack-quantized (per expert weight_packed/weight_scale)")
    parser.add_argument("--out", metavar="DST", help="new output directory (must not exist; written as DST.partial-* and renamed when complete)")
    parser.add_argument("--layout", choices=layouts.FAMILIES, help="checkpoint family (default: from SRC's config.json; may override it only with a family stored alike)")
    parser.add_argument(
        "--recipe", choices=tuple(RECIPES), metavar="RECIPE",
        help="the fake-QAT recipe whose WEIGHT rule makes the bytes (default: MEGATRON_QAT_RECIPE, else flashinfer-w4a16; "
        f"docs/engines.md); with --verify, the export's recorded rule must be its weight rule. Accepted: {', '.join(RECIPES)}",
    )
    parser.add_argument("--device", default="cpu", help="where to quantize: cpu (PyTorch reference), cuda or cuda:N (Triton kernel, bit-identical); default cpu")
    parser.add_argument("--max-shard-gib", default="2", metavar="GIB", help="output shard size in GiB, a positive number (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    parser.add_argument("--verify", metavar="DST", help="instead of exporting: check that DST's MXFP4 bytes decode to exactly fake_quantize(--source) (same check as megatron-qat parity DST --source SRC)")
    parser.add_argument("--source", metavar="SRC", help="the BF16 source checkpoint for --verify")


def run(args: argparse.Namespace) -> int:
    from .codec import ExportError

    if args.verify:
        if not args.source or args.src or args.format or args.out:
            raise ExportError("--verify DST takes --source SRC (and optionally --layout) only")
        from .verify import run_check

        return run_check(args.verify, args.source, family=args.layout, recipe=args.recipe, rerun=VERIFY_RERUN)
    if not (args.src and args.format and args.out):
        raise ExportError("usage: megatron-qat export SRC --format gpt-oss|compressed-tensors --out DST (or --verify DST --source SRC)")
    from .offline import check_device, convert_checkpoint, shard_bytes

    summary = convert_checkpoint(
        args.src, args.out, args.format, family=args.layout, device=check_device(args.device), recipe=args.recipe,
        max_shard_bytes=shard_bytes(args.max_shard_gib), progress=not args.no_progress,
    )
    print(f"export: wrote {summary['dst']} ({summary['expert_tensors']} expert tensor(s) MXFP4-encoded under rule {summary['rule']}, "
          f"{summary['copied_tensors']} copied, {summary['bytes_written'] / 2**20:.1f} MiB)")
    return 0
