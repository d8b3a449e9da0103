"""Command-line flags of ``megatron-qat parity`` (shared by the console script and
``python -m megatron_qat.parity``). Imports nothing heavy."""

from __future__ import annotations

import argparse

from ..layouts import FAMILIES
from ..numerics.rules import RECIPES

# Routed expert weights in common namings; a name matches when re.search finds this pattern.
# The leading (?:^|\.) stops "shared_experts." (and "shared_expert.") from matching, and the
# trailing $ stops biases, *_blocks / *_scales, routers and norms.
DEFAULT_INCLUDE = (
    r"(?:^|\.)experts\."
    r"(?:"
    r"(?:local_experts\.)?\d+\.(?:gate_proj|up_proj|down_proj|w1|w2|w3|linear_fc1|linear_fc2)\.weight"  # per-expert
    r"|(?:mlp\.)?(?:w1|w2|w3)(?:\.weight)?"  # fused experts.w1 / experts.mlp.w1 (DBRX-style)
    r"|(?:gate_up_proj|down_proj)(?:\.weight)?"  # fused 3-D (gpt-oss, Llama-4, transformers v5)
    r"|linear_fc[12]\.weight\d*"  # Megatron TEGroupedLinear: weight0..weightN-1, or grouped .weight
    r")$"
)
DEFAULT_CHUNK_ELEMENTS = 1 << 21
EXIT_CODES_HELP = (
    "Exit 0: every selected tensor compared (in full, or the --sample-rows sample) and bit-identical; "
    "1: a mismatch; 2: usage or environment error; 3: identical where compared but incomplete "
    "(tensors skipped, rows excluded as non-finite, a tensor with no finite row; --allow-incomplete makes it 0)."
)
REFERENCES = ("auto", "golden", "flashinfer")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.epilog = EXIT_CODES_HELP
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="checkpoint(s): a .safetensors file, a directory, a *.safetensors.index.json, or a torch "
        ".pt/.pth/.bin state dict (nested dicts are flattened with dotted names). "
        "No PATH: the built-in --synthetic families.",
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="check the built-in adversarial tensors (bf16 and fp16); the default when no PATH is given",
    )
    parser.add_argument(
        "--include",
        default=DEFAULT_INCLUDE,
        metavar="REGEX",
        help="select tensors whose name matches (re.search); default: routed expert weights "
        "(experts.N.{gate,up,down}_proj.weight, experts.N.w1/w2/w3.weight, fused experts.gate_up_proj / "
        "experts.down_proj, Megatron experts.linear_fc1/fc2.weight[N], experts.local_experts.N.linear_fc*.weight); "
        "routers and shared experts are not matched. Ignored with --synthetic.",
    )
    parser.add_argument(
        "--layout",
        choices=FAMILIES,
        default=None,
        metavar="FAMILY",
        help="checkpoint family, which decides the in_features dim the 32-blocks run along in fused expert "
        "tensors (gpt_oss stores [E, in, out], transformers-v5 qwen3_moe [E, out, in]); default: read from the "
        f"config.json next to the checkpoint (model_type / architectures). Accepted: {', '.join(FAMILIES)}",
    )
    parser.add_argument(
        "--source",
        metavar="SRC",
        default=None,
        help="PATH is an MXFP4 export (megatron-qat export) of the BF16 checkpoint SRC: check that every shipped "
        "expert tensor's codes and scale bytes decode to exactly fake_quantize(SRC) and that every other tensor is "
        "byte-identical (docs/export.md). Exit codes as below.",
    )
    parser.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="exit 0 instead of 3 when everything compared is identical but some selected tensors were skipped "
        "or had non-finite rows excluded (the summary still says INCOMPLETE; a run that compared nothing stays 3)",
    )
    parser.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default=None,
        metavar="RECIPE",
        help="the fake-QAT recipe to check (docs/engines.md): ours is compared with the golden model under the recipe's "
        "WEIGHT rule (FlashInfer's own quantizer for flashinfer-mxfp4); an MXFP8 activation rule is compared with "
        "flashinfer.mxfp8_quantize on a GPU of compute capability >= 10.0 (elsewhere it is not compared, and the run "
        "is INCOMPLETE). Default: MEGATRON_QAT_RECIPE, else flashinfer-w4a16. With --source, the export's recorded "
        f"rule must be the recipe's weight rule. Accepted: {', '.join(RECIPES)}",
    )
    parser.add_argument(
        "--reference",
        choices=REFERENCES,
        default="auto",
        help="what to compare against: golden (independent NumPy model, any machine), flashinfer "
        "(flashinfer.fp4_quantize on a CUDA GPU with compute capability >= 10.0), or auto (flashinfer "
        "when importable on such a GPU, else golden; the report says which and why). Default: auto.",
    )
    parser.add_argument(
        "--allow-unsupported-gpu",
        action="store_true",
        help="with --reference flashinfer: skip the compute-capability >= 10.0 check (the canary still "
        "runs and refuses a GPU whose FlashInfer MXFP4 kernel returns wrong codes, e.g. sm_90)",
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default=None,
        help="where megatron_qat.mxfp4 runs (ours); default cuda if available, else cpu",
    )
    parser.add_argument(
        "--impl",
        choices=("reference", "triton"),
        default=None,
        help="megatron_qat.mxfp4 implementation; default: what megatron_qat.mxfp4 dispatch picks",
    )
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="check at most N selected tensors")
    parser.add_argument(
        "--sample-rows",
        type=int,
        default=None,
        metavar="N",
        help="check N evenly spaced rows of each tensor (row floor(i*R/N), i=0..N-1, R = rows of K); default all",
    )
    parser.add_argument(
        "--chunk-elements",
        type=int,
        default=DEFAULT_CHUNK_ELEMENTS,
        metavar="N",
        help=f"elements per comparison step (bounds memory; default {DEFAULT_CHUNK_ELEMENTS})",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load .pt files with torch.load(weights_only=False) (runs arbitrary pickle code: only for "
        "files you trust, e.g. a Megatron model_optim_rng.pt holding argparse args)",
    )
    parser.add_argument("--json", metavar="PATH", default=None, help="write the full report as JSON (docs/parity.md)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--max-rows-shown", type=int, default=50, metavar="N", help="table rows printed on stdout (all are in --json)"
    )
    return parser
