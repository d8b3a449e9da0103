"""Train-rollout mismatch of MXFP4 MoE experts: ours against the alternatives (issue 16).

    python benchmarks/bench_mismatch.py                  # one GPU, about 5 minutes; results in benchmarks/results/
    python benchmarks/bench_mismatch.py --smoke --out-dir DIR   # CPU, tiny, about a minute (CI: tests/test_bench_mismatch.py)
    python benchmarks/bench_mismatch.py --plot-only benchmarks/results/mismatch_<gpu>.json   # redraw the plot (CPU)

Trainer: a real megatron-core ``GPTModel`` MoE (``--layers`` transformer layers of TE attention with
QK-RMSNorm and RoPE, SwiGLU ``TEGroupedMLP`` experts, ``--experts`` experts top-``--topk``, every
in_features a multiple of 32, byte vocabulary of 256), trained with megatron-core's
``forward_backward_no_pipelining`` under Megatron DDP + distributed optimizer (Adam) with
gradient-accumulation fusion, on byte tokens of the Python standard library's sources
(``sysconfig.get_paths()["stdlib"]``, sorted ``*.py`` files, every 10th held out for prompts).
Fake-QAT goes through the product's entry point ``megatron_qat.enable(recipe=...)``.

Rollout (mismatch_rollout.py): transformers' ``Qwen3MoeForCausalLM`` built from what would be
shipped -- the BF16 non-expert weights plus, per variant, the expert weights the engine holds:

=====  ==========================  ===========================================  ====================
key    training                    rollout expert weights                       rollout activations
=====  ==========================  ===========================================  ====================
a      BF16                        BF16 (the floor)                             BF16
b      BF16                        engine re-quantizes, FlashInfer rule         BF16
c      BF16                        engine re-quantizes, vLLM online rule        BF16
d      ``modelopt-w4a16`` (ties    ``export_mxfp4`` bytes (FlashInfer rule,     BF16
       down)                       half-to-even): Megatron Lite's combination
e      ``flashinfer-w4a16`` (ours) ``export_mxfp4`` bytes                       BF16
f1     ``flashinfer-w4a16``        ``export_mxfp4`` bytes                       MXFP8 (W4A8 engine)
f2     ``flashinfer-trtllm-w4a8``  ``export_mxfp4`` bytes                       MXFP8 (W4A8 engine)
=====  ==========================  ===========================================  ====================

Four training runs (BF16, and one per recipe), all from the same initialisation (checked: one
fingerprint of the initial weights) on the same data order. Every ``--eval-every`` steps each
variant samples ``--prompts x --new-tokens`` tokens from its rollout model (the same held-out
prompts and the same uniform draws for every variant, temperature 1, KV cache); the trainer side
scores the same tokens with the Megatron model's forward (fake-QAT on for the QAT runs, exactly as
training sees it). Metrics per evaluation: mean |p_train - p_rollout| (Megatron Lite's
``rollout_probs_diff_mean``), mean and max |logp_train - logp_rollout| (miles'
``train_rollout_logprob_abs_diff``), the k3 estimate of KL(rollout || train) (samples from the
rollout, d = logp_train - logp_rollout, k3 = mean(e^d - 1 - d)), and the training loss. Noise: the
last evaluation is repeated with ``--noise-seeds`` further prompt/draw seeds; the spread over the
seeds is the evaluation noise.

Result check (exit 1 when one fails): every run's loss falls below the byte-unigram entropy of
the training text over the last tenth of the steps (GPU; smoke: below 90% of its first step), every run starts from the same
weights, the BF16 floor (a) stays below ``FLOOR_LIMIT`` (a wrong conversion gives O(1) nats), and
the shipped bytes of the FlashInfer-rule runs decode to exactly the weights their forward used
(int16 views). Exit 2: usage or environment (one line). Results are written in any case.

``--smoke`` (CPU, CI): tiny sizes, two layers, gloo world size 1, and these CPU adaptations, all
in :func:`_cpu_smoke_setup`: Transformer Engine cannot be installed on CPU, so megatron-core's
local layer spec is used for attention and norms and ``TEGroupedLinear`` is the stand-in of
tests/te_standin.py; megatron-core's CUDA-only pieces are bypassed (``torch.cuda.current_device``
answers the CPU, a no-op RNG tracker since dropout is 0, the schedule's CUDA token counter, the
missing ``te_general_gemm`` name, an explicit causal mask); Megatron DDP and its distributed
optimizer allocate CUDA buffers, so the smoke trains with torch's Adam and without fused wgrad.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import enum
import gc
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from mismatch_rollout import IMPLEMENTATION, Sizes  # noqa: E402  (torch-free at import)

BLOCK = 32
METRICS = ("probs_diff_mean", "logprob_abs_diff_mean", "logprob_abs_diff_max", "k3_kl")
METRIC_LABELS = {
    "probs_diff_mean": "mean |p_train - p_rollout|",
    "logprob_abs_diff_mean": "mean |logp_train - logp_rollout|",
    "logprob_abs_diff_max": "max |logp_train - logp_rollout|",
    "k3_kl": "k3 KL(rollout || train)",
}


class Weights(enum.Enum):
    """Which expert weights the rollout engine holds."""

    BF16 = "the BF16 master weights"
    REQUANT = "the BF16 master weights re-quantized by the engine's own rule"
    SHIPPED = "the bytes export_mxfp4 ships, decoded"


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    train_recipe: str | None  # megatron_qat recipe of the training run (None: BF16 training)
    weights: Weights
    weight_rule: str | None = None  # REQUANT: name in megatron_qat.numerics.rules
    act_rule: str | None = None  # rollout expert activations (None: BF16)


VARIANTS = (
    Variant("a", "(a) BF16 train, BF16 rollout (floor)", None, Weights.BF16),
    Variant("b", "(b) BF16 train, rollout re-quantizes: FlashInfer rule", None, Weights.REQUANT, "FLASHINFER_MXFP4"),
    Variant("c", "(c) BF16 train, rollout re-quantizes: vLLM online rule", None, Weights.REQUANT, "VLLM_ONLINE_MXFP4"),
    Variant("d", "(d) ties-down QAT (modelopt-w4a16), half-to-even export", "modelopt-w4a16", Weights.SHIPPED),
    Variant("e", "(e) ours: flashinfer-w4a16 QAT + shipped bytes", "flashinfer-w4a16", Weights.SHIPPED),
    Variant("f1", "(f1) W4A8 engine, ours weights-only QAT (flashinfer-w4a16)", "flashinfer-w4a16", Weights.SHIPPED,
            act_rule="FLASHINFER_MXFP8"),
    Variant("f2", "(f2) W4A8 engine, ours MXFP8 recipe (flashinfer-trtllm-w4a8)", "flashinfer-trtllm-w4a8",
            Weights.SHIPPED, act_rule="FLASHINFER_MXFP8"),
)
BY_KEY = {v.key: v for v in VARIANTS}
FLOOR_LIMIT = 0.1  # nats: the BF16 floor (a) must stay below this mean |logp diff| (kernel differences give ~1e-2)
SHIPS_TRAINED_BITS = ("flashinfer-w4a16", "flashinfer-trtllm-w4a8")  # runs whose export must equal the forward


@dataclass(frozen=True)
class Settings:
    sizes: Sizes
    seq_len: int
    micro_batch: int
    micro_batches: int
    steps: int
    eval_every: int
    lr: float
    warmup: int
    prompts: int
    prompt_len: int
    new_tokens: int
    noise_seeds: int
    seed: int


GPU_DEFAULTS = Settings(Sizes(layers=4, hidden=512, heads=8, kv_groups=4, experts=16, topk=4, moe_ffn=512, vocab=256,
                              max_seq=1024, rotary_base=10000.0, norm_eps=1e-6),
                        seq_len=512, micro_batch=8, micro_batches=2, steps=200, eval_every=50, lr=2e-3, warmup=20,
                        prompts=128, prompt_len=64, new_tokens=128, noise_seeds=2, seed=1234)
SMOKE_DEFAULTS = Settings(Sizes(layers=2, hidden=64, heads=4, kv_groups=2, experts=4, topk=2, moe_ffn=64, vocab=256,
                                max_seq=128, rotary_base=10000.0, norm_eps=1e-6),
                          seq_len=32, micro_batch=2, micro_batches=2, steps=4, eval_every=4, lr=1e-2, warmup=1,
                          prompts=2, prompt_len=8, new_tokens=6, noise_seeds=1, seed=1234)


class UsageError(Exception):
    """One line for stderr, exit 2."""


# --- command line --------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny sizes, TE stand-in (see the docstring)")
    ap.add_argument("--plot-only", type=Path, metavar="JSON", help="only redraw the plot from a results JSON")
    ap.add_argument("--no-plot", action="store_true", help="write the JSON and markdown only (draw later with --plot-only)")
    ap.add_argument("--variants", default=",".join(BY_KEY), help=f"comma-separated subset of {','.join(BY_KEY)}")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results", help="where results go")
    ap.add_argument("--tag", default=None, help="file name tag (default: the GPU name; smoke: cpu-smoke)")
    for name, kind in (("layers", int), ("hidden", int), ("heads", int), ("kv-groups", int), ("experts", int),
                       ("topk", int), ("moe-ffn", int), ("seq-len", int), ("micro-batch", int),
                       ("micro-batches", int), ("steps", int), ("eval-every", int), ("lr", float), ("warmup", int),
                       ("prompts", int), ("prompt-len", int), ("new-tokens", int), ("noise-seeds", int),
                       ("seed", int)):
        ap.add_argument(f"--{name}", type=kind, default=None, help="(default: see GPU_DEFAULTS / SMOKE_DEFAULTS)")
    args = ap.parse_args(argv)
    if args.plot_only is not None:
        return args, None, []
    base = SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS
    size_fields = {"layers": "layers", "hidden": "hidden", "heads": "heads", "kv_groups": "kv_groups",
                   "experts": "experts", "topk": "topk", "moe_ffn": "moe_ffn"}
    sizes = replace(base.sizes, **{f: getattr(args, a) for a, f in size_fields.items() if getattr(args, a) is not None})
    other = {f: getattr(args, f) for f in ("seq_len", "micro_batch", "micro_batches", "steps", "eval_every", "lr",
                                            "warmup", "prompts", "prompt_len", "new_tokens", "noise_seeds", "seed")
             if getattr(args, f) is not None}
    s = replace(base, sizes=replace(sizes, max_seq=max(sizes.max_seq, 2 * (other.get("seq_len", base.seq_len)))), **other)
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    bad = [k for k in keys if k not in BY_KEY]
    if bad or not keys:
        ap.error(f"--variants: unknown {bad or 'empty list'}; accepted: {','.join(BY_KEY)}")
    z = s.sizes
    if min(z.layers, z.hidden, z.heads, z.kv_groups, z.experts, z.topk, z.moe_ffn, s.seq_len, s.micro_batch,
           s.micro_batches, s.steps, s.eval_every, s.prompts, s.prompt_len, s.new_tokens) < 1 or s.noise_seeds < 0:
        ap.error("sizes, steps and counts must be positive (--noise-seeds >= 0)")
    if z.hidden % BLOCK or z.moe_ffn % BLOCK:
        ap.error(f"--hidden ({z.hidden}) and --moe-ffn ({z.moe_ffn}) must be multiples of {BLOCK} (expert in_features)")
    if z.hidden % z.heads or z.heads % z.kv_groups or z.topk > z.experts:
        ap.error("--hidden must divide by --heads, --heads by --kv-groups, and --topk <= --experts")
    if not args.smoke and (z.layers < 4 or z.experts < 16 or z.topk < 4 or s.steps < 200
                           or s.prompts * s.new_tokens < 16384):
        ap.error("the GPU benchmark needs >= 4 layers, >= 16 experts, top-k >= 4, >= 200 steps and >= 16384 sampled "
                 "tokens per evaluation (issue 16); use --smoke for a small run")
    if s.prompt_len + s.new_tokens > z.max_seq:
        ap.error(f"--prompt-len + --new-tokens must be <= {z.max_seq}")
    return args, s, [BY_KEY[k] for k in keys]


# --- requirements (checked before anything slow) --------------------------------------------------


def contract_problems(variants) -> list[str]:
    """What the selected variants need from megatron_qat (BRIEF.md contracts) and is missing."""
    import megatron_qat
    from megatron_qat import mxfp4

    try:
        rules = importlib.import_module("megatron_qat.numerics.rules")
    except ImportError as exc:
        return [f"megatron_qat.numerics.rules cannot be imported ({exc})"]
    problems = []
    names = {"FLASHINFER_MXFP4"} | {v.weight_rule for v in variants if v.weight_rule} | {v.act_rule for v in variants if v.act_rule}
    problems += [f"megatron_qat.numerics.rules has no {n}" for n in sorted(names) if not hasattr(rules, n)]
    recipes = {v.train_recipe for v in variants if v.train_recipe}
    problems += [f"megatron_qat.numerics.rules.RECIPES has no {r!r}" for r in sorted(recipes) if r not in getattr(rules, "RECIPES", {})]
    if recipes and "recipe" not in inspect.signature(megatron_qat.enable).parameters:
        problems.append("megatron_qat.enable() takes no recipe= argument yet")
    for fn in ("quantize", "dequantize", "fake_quantize"):
        if "rule" not in inspect.signature(getattr(mxfp4, fn)).parameters:
            problems.append(f"megatron_qat.mxfp4.{fn}() takes no rule= argument yet")
    if any(v.act_rule for v in variants) and not hasattr(mxfp4, "fake_quantize_activation"):
        problems.append("megatron_qat.mxfp4.fake_quantize_activation is missing")
    return problems


def rule(name: str):
    return getattr(importlib.import_module("megatron_qat.numerics.rules"), name)


def require_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("matplotlib is not installed here: install it (or carry its wheel), or run with --no-plot "
                         "and draw later with --plot-only RESULTS.json where it is installed") from None


def require_transformers() -> None:
    try:
        import transformers
        from transformers import Qwen3MoeForCausalLM  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"the rollout side needs transformers >= 5 with Qwen3MoeForCausalLM ({exc})") from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise UsageError(f"the rollout side needs transformers >= 5 (ExpertsInterface); found {transformers.__version__}")


def memory_estimate_bytes(s: Settings) -> int:
    """Generous upper estimate of the trainer's GPU memory: weights, fp32 grads, fp32 main weights and
    Adam moments, one fake-quantized copy of the experts, and one micro-batch's activations (40 bytes
    per token per hidden unit per layer for attention, the MoE's top-k copies of its inputs and
    intermediates, fp32 logits); the rollout model is a BF16 copy plus its KV cache."""
    z = s.sizes
    expert = z.layers * z.experts * 3 * z.hidden * z.moe_ffn
    params = expert + z.layers * (z.hidden * z.head_dim * (z.heads * 2 + 2 * z.kv_groups) + z.hidden * z.experts) + 2 * z.vocab * z.hidden
    tokens = s.micro_batch * s.seq_len
    acts = z.layers * tokens * (40 * z.hidden + z.topk * (3 * z.hidden + 6 * z.moe_ffn) * 2) + tokens * z.vocab * 12
    rollout = 2 * params + 4 * z.layers * s.prompts * (s.prompt_len + s.new_tokens) * z.kv_groups * z.head_dim
    return params * (2 + 4 + 12) + expert * 2 + acts + rollout


# --- data ----------------------------------------------------------------------------------------


@dataclass
class Corpus:
    train: object  # uint8 tensor
    heldout: object  # uint8 tensor
    info: dict


def load_corpus() -> Corpus:
    """Byte tokens of the standard library's ``*.py`` files (sorted; every 10th file held out)."""
    import torch

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not ({"site-packages", "dist-packages"} & set(p.relative_to(root).parts)) and p.is_file())
    if len(files) < 20:
        raise UsageError(f"the standard library at {root} has only {len(files)} .py files; expected hundreds")
    parts = {"train": [], "heldout": []}
    digest = hashlib.sha256()
    for i, path in enumerate(files):
        data = path.read_bytes()
        digest.update(data)
        parts["heldout" if i % 10 == 0 else "train"].append(data)
    train = torch.frombuffer(bytearray(b"".join(parts["train"])), dtype=torch.uint8)
    heldout = torch.frombuffer(bytearray(b"".join(parts["heldout"])), dtype=torch.uint8)
    freq = torch.bincount(train.long(), minlength=256).double()
    freq = freq[freq > 0] / freq.sum()
    info = {"root": str(root), "files": len(files), "train_bytes": train.numel(), "heldout_bytes": heldout.numel(),
            "sha256": digest.hexdigest()[:16], "unigram_entropy_nats": float(-(freq * freq.log()).sum())}
    return Corpus(train, heldout, info)


def train_batches(corpus: Corpus, s: Settings, step: int, device):
    """The micro-batches of one step: ``(tokens, labels)`` ``[micro_batch, seq_len]`` long, from
    random offsets drawn by a generator seeded with (seed, step): the same for every run."""
    import torch

    gen = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
    n = s.micro_batch * s.micro_batches
    starts = torch.randint(0, corpus.train.numel() - s.seq_len - 1, (n,), generator=gen)
    seqs = corpus.train[starts[:, None] + torch.arange(s.seq_len + 1)].long().to(device)
    return [(seqs[i : i + s.micro_batch, :-1], seqs[i : i + s.micro_batch, 1:])
            for i in range(0, n, s.micro_batch)]


def eval_prompts(corpus: Corpus, s: Settings, eval_seed: int, device):
    """Held-out prompts ``[P, prompt_len]`` and the sampler's uniform draws ``[P, new_tokens]``."""
    import torch

    gen = torch.Generator().manual_seed(10_007 * (eval_seed + 1))
    starts = torch.randint(0, corpus.heldout.numel() - s.prompt_len, (s.prompts,), generator=gen)
    prompts = corpus.heldout[starts[:, None] + torch.arange(s.prompt_len)].long()
    uniforms = torch.rand(s.prompts, s.new_tokens, generator=gen)
    return prompts.to(device), uniforms.to(device)


# --- Megatron side ---------------------------------------------------------------------------------


def _cpu_smoke_setup():
    """The CPU adaptations of ``--smoke`` (module docstring); returns the experts' grouped-linear
    classes ``(column, row)``. Only ever called in the smoke's own process."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from te_standin import StandInGroupedLinear

    import megatron.core.extensions.transformer_engine as ext
    import megatron.core.transformer.moe.moe_utils as moe_utils
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom

    class TEGroupedLinear(StandInGroupedLinear):
        """megatron-core's ``TEGroupedLinear`` over the TE stand-in: megatron's constructor, and
        ``forward(x, m_splits) -> (out, None)`` passing the module's ``is_first_microbatch`` to TE's."""

        def __init__(self, num_gemms, input_size, output_size, *, config, init_method=None, bias=False,
                     skip_bias_add=False, is_expert=False, tp_comm_buffer_name=None, pg_collection=None):
            super().__init__(num_gemms, input_size, output_size, dtype=config.params_dtype, seed=torch.initial_seed() % 2**31)
            self.config = config
            with torch.no_grad():
                for i in range(num_gemms):
                    getattr(self, f"weight{i}").mul_(config.init_method_std)

        def forward(self, x, m_splits):
            out = StandInGroupedLinear.forward(self, x, m_splits, is_first_microbatch=self.is_first_microbatch)
            self.is_first_microbatch = False
            return out, None

    class Column(TEGroupedLinear):
        pass

    class Row(TEGroupedLinear):
        pass

    class NullRNGTracker:
        def fork(self, name=None):
            return contextlib.nullcontext()

        def is_initialized(self):
            return True

        def add(self, name, seed):
            pass

        def reset(self):
            pass

    class CpuTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def zeros(*args, device=None, **kwargs):
            return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)

    ext.TEGroupedLinear = TEGroupedLinear
    torch.cuda.current_device = lambda: torch.device("cpu")
    mrandom._CUDA_RNG_STATE_TRACKER = NullRNGTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    schedules.torch = CpuTorch()
    if not hasattr(moe_utils, "te_general_gemm"):  # megatron-core 0.16.1 without TE refers to it unbound
        moe_utils.te_general_gemm = None
    return Column, Row


def init_distributed(smoke: bool):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ.setdefault("MASTER_PORT", str(sock.getsockname()[1]))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if not smoke:
            torch.cuda.set_device(0)
        dist.init_process_group("gloo" if smoke else "nccl", world_size=1, rank=0)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)


def transformer_config(s: Settings, smoke: bool):
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    z = s.sizes
    return TransformerConfig(
        num_layers=z.layers, hidden_size=z.hidden, num_attention_heads=z.heads, num_query_groups=z.kv_groups,
        kv_channels=z.head_dim, ffn_hidden_size=4 * z.hidden, num_moe_experts=z.experts, moe_ffn_hidden_size=z.moe_ffn,
        moe_router_topk=z.topk, moe_grouped_gemm=True, moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, normalization="RMSNorm", layernorm_epsilon=z.norm_eps,
        qk_layernorm=True, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, bf16=True,
        params_dtype=torch.bfloat16, gradient_accumulation_fusion=not smoke, use_cpu_initialization=smoke,
    )


def layer_spec(s: Settings, smoke: bool, grouped_linears):
    if not smoke:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(num_experts=s.sizes.experts, moe_grouped_gemm=True,
                                                          qk_layernorm=True)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import TEGroupedMLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = get_gpt_layer_local_spec(num_experts=s.sizes.experts, moe_grouped_gemm=True, qk_layernorm=True,
                                    normalization="RMSNorm")
    column, row = grouped_linears
    spec.submodules.mlp.submodules.experts = ModuleSpec(module=TEGroupedMLP,
                                                        submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row))
    return spec


@dataclass
class Trainer:
    model: object  # what the schedule runs (DDP on the GPU)
    gpt: object  # the GPTModel
    optimizer: object
    config: object
    device: object
    mask: object  # explicit causal mask (smoke) or None (TE's causal attention)
    fingerprint: str = ""
    losses: list = field(default_factory=list)


def build_trainer(s: Settings, smoke: bool, recipe: str | None, grouped_linears, device) -> Trainer:
    """A fresh GPTModel from ``s.seed`` (the same weights for every run), fake-QAT on with ``recipe``
    through ``megatron_qat.enable(recipe=...)`` before the build (so its build-time guards run)."""
    import torch
    import megatron_qat
    from megatron.core.models.gpt import GPTModel

    megatron_qat.disable()
    if recipe is not None:
        try:
            megatron_qat.enable(recipe=recipe)
        except (RuntimeError, ValueError, NotImplementedError) as exc:  # FakeQATUnavailableError is a RuntimeError
            raise UsageError(f"megatron_qat.enable(recipe={recipe!r}) refused: {exc}") from None
    torch.manual_seed(s.seed)
    if not smoke:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        torch.cuda.manual_seed(s.seed)
        model_parallel_cuda_manual_seed(s.seed)
    config = transformer_config(s, smoke)
    gpt = GPTModel(config=config, transformer_layer_spec=layer_spec(s, smoke, grouped_linears), vocab_size=s.sizes.vocab,
                   max_sequence_length=s.sizes.max_seq, position_embedding_type="rope",
                   rotary_base=int(s.sizes.rotary_base), share_embeddings_and_output_weights=False).to(device)
    digest = hashlib.sha256()
    for name, p in sorted(gpt.state_dict().items()):
        if isinstance(p, torch.Tensor) and p.is_floating_point():
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    if smoke:
        model = gpt
        optimizer = torch.optim.Adam(gpt.parameters(), lr=s.lr, betas=(0.9, 0.95))
        n = s.seq_len
        mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)[None, None]
    else:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True,
                                                   use_distributed_optimizer=True)
        model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=gpt)
        config.no_sync_func = model.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=s.lr, adam_beta2=0.95, weight_decay=0.0, bf16=True,
                            use_distributed_optimizer=True, clip_grad=1.0), [model])
        mask = None
    return Trainer(model, gpt, optimizer, config, device, mask, digest.hexdigest()[:16])


def _lr(s: Settings, step: int) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_step(tr: Trainer, s: Settings, batches, step: int) -> float:
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for group in tr.optimizer.param_groups:
        group["lr"] = _lr(s, step)
    pos = torch.arange(s.seq_len, device=tr.device).unsqueeze(0)

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        out = model(tokens, pos, tr.mask, labels=labels)

        def loss_func(per_token):
            value = per_token.float().mean()
            return value, {"lm loss": value.detach().clone()}  # the schedule divides value in place

        return out, loss_func

    if hasattr(tr.model, "zero_grad_buffer"):
        tr.model.zero_grad_buffer()
    tr.optimizer.zero_grad()
    stats = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=tr.model,
                                        num_microbatches=len(batches), seq_length=s.seq_len,
                                        micro_batch_size=s.micro_batch, forward_only=False)
    tr.optimizer.step()
    loss = sum(float(d["lm loss"]) for d in stats) / len(stats)
    tr.losses.append(loss)
    return loss


def trainer_logprobs(tr: Trainer, tokens, prompt_len: int):
    """The trainer's log-probabilities ``[P, G]`` (fp32) of ``tokens[:, prompt_len:]``: the Megatron
    model's forward over the whole sequence, fake-QAT as in training."""
    import torch

    n = tokens.shape[1] - 1
    pos = torch.arange(n, device=tr.device).unsqueeze(0)
    mask = None if tr.mask is None else torch.triu(torch.ones(n, n, dtype=torch.bool), 1)[None, None]
    tr.model.eval()
    try:
        with torch.no_grad():
            logits = tr.model(tokens[:, :-1], pos, mask)
    finally:
        tr.model.train()
    logp = torch.log_softmax(logits.float(), dim=-1).gather(2, tokens[:, 1:, None]).squeeze(2)
    return logp[:, prompt_len - 1 :]


def _expert_modules(tr: Trainer):
    from megatron_qat.export.live import find_expert_modules

    return find_expert_modules([tr.gpt])


def engine_experts(tr: Trainer, variant: Variant) -> tuple[dict, dict]:
    """``{layer: (fc1 [E, 2I, H], fc2 [E, H, I])}`` in BF16 as the variant's engine holds them, and
    diagnostics (SHIPPED: elements where the decoded bytes differ from the weights the trainer's
    forward used, and from ``fake_quantize`` of the master weights under FlashInfer's rule, int16
    views)."""
    import torch
    from megatron_qat import layouts, mxfp4
    from megatron_qat.export import export_mxfp4
    from megatron_qat.export.formats import RAW_CODES, RAW_SCALES
    from megatron_qat.export.live import raw_weights

    items = _expert_modules(tr)
    experts, info = {}, {}
    if variant.weights is not Weights.SHIPPED:
        for item in items:
            pair = []
            for role in ("fc1", "fc2"):
                w = torch.stack(raw_weights(getattr(item.module, f"linear_{role}")))
                if variant.weights is Weights.REQUANT:
                    r = rule(variant.weight_rule)
                    codes, scales = mxfp4.quantize(w, BLOCK, rule=r)
                    w = mxfp4.dequantize(codes, scales, torch.bfloat16, BLOCK, rule=r)
                pair.append(w.to(torch.bfloat16, copy=True))
            experts[item.layer] = tuple(pair)
        return experts, info
    flashinfer = rule("FLASHINFER_MXFP4")
    # the engines of the shipped variants load FlashInfer-rule bytes; (d) trains ties-down yet ships these
    shipped = dict(export_mxfp4([tr.gpt], "raw", rule=flashinfer))
    differ = not_flashinfer = total = 0
    for item in items:
        names = layouts.hf_expert_names("megatron", item.layer)
        pair = []
        for role in ("fc1", "fc2"):
            linear = getattr(item.module, f"linear_{role}")
            n = int(linear.num_gemms)
            decoded = torch.stack([
                mxfp4.dequantize(shipped.pop(names[role].format(E=e) + RAW_CODES),
                                 shipped.pop(names[role].format(E=e) + RAW_SCALES), torch.bfloat16, BLOCK, rule=flashinfer)
                for e in range(n)])
            with torch.no_grad():
                used = torch.stack([t.detach() for t in linear._get_weight_tensors()])
            master = torch.stack(raw_weights(linear))
            rule_bits = mxfp4.fake_quantize(master, BLOCK, rule=flashinfer)
            differ += int((decoded.view(torch.int16) != used.to(torch.bfloat16).view(torch.int16)).sum())
            not_flashinfer += int((decoded.view(torch.int16) != rule_bits.view(torch.int16)).sum())
            total += decoded.numel()
            pair.append(decoded)
        experts[item.layer] = tuple(pair)
    if shipped:
        raise RuntimeError(f"export_mxfp4 shipped tensors this benchmark did not expect: {sorted(shipped)[:3]}")
    info["shipped_vs_trained_differ"] = differ
    info["shipped_vs_flashinfer_rule_differ"] = not_flashinfer
    info["expert_elements"] = total
    return experts, info


# --- evaluation ------------------------------------------------------------------------------------


def mismatch_metrics(logp_train, logp_rollout) -> dict:
    import torch

    lt, lr = logp_train.double(), logp_rollout.double()
    d = lt - lr
    per_seq = (lt.exp() - lr.exp()).abs().mean(dim=1)
    return {
        "probs_diff_mean": float((lt.exp() - lr.exp()).abs().mean()),
        "logprob_abs_diff_mean": float(d.abs().mean()),
        "logprob_abs_diff_max": float(d.abs().max()),
        "k3_kl": float((torch.expm1(d) - d).mean()),
        "probs_diff_sem": float(per_seq.std() / math.sqrt(per_seq.numel())) if per_seq.numel() > 1 else 0.0,
        "tokens": int(d.numel()),
    }


def evaluate(tr: Trainer, variants, corpus: Corpus, s: Settings, eval_seed: int, rollout_device) -> dict:
    """One evaluation of each variant hanging off this training run: {key: metrics}."""
    import mismatch_rollout as mr
    import torch

    prompts, uniforms = eval_prompts(corpus, s, eval_seed, rollout_device)
    state = {k: v for k, v in tr.gpt.state_dict().items() if isinstance(v, torch.Tensor) and v.numel() > 0}
    out = {}
    for v in variants:
        experts, info = engine_experts(tr, v)
        converted = mr.megatron_to_hf(state, experts, s.sizes)
        model = mr.build(converted, s.sizes, rule(v.act_rule) if v.act_rule else None, rollout_device)
        tokens, logp_rollout = mr.sample(model, prompts, uniforms)
        del model
        logp_train = trainer_logprobs(tr, tokens.to(tr.device), s.prompt_len)
        out[v.key] = {**mismatch_metrics(logp_train, logp_rollout.to(tr.device)), **info,
                      "conversion_rounded": len(converted.rounded)}
    return out


# --- the run ---------------------------------------------------------------------------------------


def _versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod, label in (("transformer_engine", "TE"), ("megatron.core", "megatron-core"), ("transformers", "transformers"),
                       ("triton", "triton"), ("megatron_qat", "megatron-qat")):
        try:
            out[label] = importlib.import_module(mod).__version__
        except ImportError:
            out[label] = "not installed"
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["commit"] = "unknown (no git checkout)"
    return out


def run(args, s: Settings, variants) -> dict:
    import torch

    t_start = time.perf_counter()
    phases = {}
    smoke = args.smoke
    if smoke:
        device = torch.device("cpu")
        grouped_linears = _cpu_smoke_setup()
        fused_wgrad = "off (CPU smoke)"
    else:
        device = torch.device("cuda", 0)
        import _gpu_env

        fused_wgrad = _gpu_env.ensure_fused_wgrad()
        import megatron.core.extensions.transformer_engine as ext

        if getattr(ext, "TEGroupedLinear", None) is None:
            raise UsageError("megatron-core found no usable Transformer Engine (TEGroupedLinear is None); the GPU "
                             "benchmark needs TE >= 2.5 (source /opt/mqat/env.sh on the lent GPU)")
        grouped_linears = None
    init_distributed(smoke)
    phases["setup"] = time.perf_counter() - t_start
    t = time.perf_counter()
    corpus = load_corpus()
    phases["corpus"] = time.perf_counter() - t
    print(f"corpus: {corpus.info['files']} files, {corpus.info['train_bytes']} train / {corpus.info['heldout_bytes']} "
          f"held-out bytes, byte-unigram entropy {corpus.info['unigram_entropy_nats']:.3f} nats", flush=True)
    runs = list(dict.fromkeys(v.train_recipe for v in variants))
    eval_steps = sorted({0, *range(s.eval_every, s.steps + 1, s.eval_every), s.steps})
    result = {"evals": {v.key: [] for v in variants}, "noise": {v.key: [] for v in variants}, "runs": {}}
    for recipe in runs:
        name = recipe or "bf16"
        hanging = [v for v in variants if v.train_recipe == recipe]
        t = time.perf_counter()
        tr = build_trainer(s, smoke, recipe, grouped_linears, device)
        build_s = time.perf_counter() - t
        train_s = eval_s = 0.0
        for step in range(s.steps + 1):
            if step in eval_steps:
                t = time.perf_counter()
                for key, m in evaluate(tr, hanging, corpus, s, 0, device).items():
                    result["evals"][key].append({"step": step, **m})
                    print(f"[{name}] step {step:4d} {key:>3}: |dp| {m['probs_diff_mean']:.3e}  "
                          f"|dlogp| {m['logprob_abs_diff_mean']:.3e} (max {m['logprob_abs_diff_max']:.3g})  "
                          f"k3 {m['k3_kl']:.3e}", flush=True)
                eval_s += time.perf_counter() - t
            if step == s.steps:
                break
            t = time.perf_counter()
            loss = train_step(tr, s, train_batches(corpus, s, step, device), step)
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_s += time.perf_counter() - t
            if step % max(1, s.steps // 10) == 0 or step == s.steps - 1:
                print(f"[{name}] step {step:4d} loss {loss:.4f}", flush=True)
        t = time.perf_counter()
        for seed in range(1, s.noise_seeds + 1):
            for key, m in evaluate(tr, hanging, corpus, s, seed, device).items():
                result["noise"][key].append({"seed": seed, **m})
        noise_s = time.perf_counter() - t
        result["runs"][name] = {"recipe": recipe, "loss": tr.losses, "init_fingerprint": tr.fingerprint,
                                "seconds": {"build": build_s, "train": train_s, "eval": eval_s, "noise": noise_s}}
        print(f"[{name}] build {build_s:.1f} s, train {train_s:.1f} s ({s.steps} steps), evaluations {eval_s:.1f} s, "
              f"noise evaluations {noise_s:.1f} s", flush=True)
        del tr
        gc.collect()  # DDP and its config refer to each other
        if device.type == "cuda":
            torch.cuda.empty_cache()
    import megatron_qat

    megatron_qat.disable()
    phases["total"] = time.perf_counter() - t_start
    result["phases"] = phases
    result["meta"] = {
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "smoke": smoke, "versions": _versions(), "command": "python benchmarks/bench_mismatch.py " + " ".join(sys.argv[1:]),
        "rollout": IMPLEMENTATION, "fused_wgrad": fused_wgrad, "corpus": corpus.info, "settings": asdict(s),
        "variants": {v.key: {"label": v.label, "train_recipe": v.train_recipe, "weights": v.weights.name,
                             "weight_rule": v.weight_rule, "act_rule": v.act_rule} for v in variants},
    }
    return result


# --- result check, report, plot --------------------------------------------------------------------


def seed_spread(result: dict, key: str, metric: str) -> tuple[float, float]:
    """Mean and standard deviation of ``metric`` over the last evaluation and its noise seeds."""
    vals = [result["evals"][key][-1][metric]] + [m[metric] for m in result["noise"][key]]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((x - mean) ** 2 for x in vals) / (len(vals) - 1)) if len(vals) > 1 else float("nan")
    return mean, std


def _tail_loss(loss: list) -> float:
    """Mean training loss over the last tenth of the steps (at least one)."""
    tail = loss[-max(1, len(loss) // 10):]
    return sum(tail) / len(tail)


def result_check(result: dict) -> list[str]:
    """Failures of the benchmark's own claims (empty: all hold)."""
    meta, fails = result["meta"], []
    entropy = meta["corpus"]["unigram_entropy_nats"]
    for name, r in result["runs"].items():
        loss = r["loss"]
        tail = _tail_loss(loss)
        limit = 0.9 * loss[0] if meta["smoke"] else entropy
        if not tail < limit:
            fails.append(f"run {name}: loss did not fall clearly: first {loss[0]:.3f}, mean of the last tenth "
                         f"{tail:.3f}, needed < {limit:.3f}")
    if "a" in result["evals"]:
        worst = max(e["logprob_abs_diff_mean"] for e in result["evals"]["a"])
        if not worst < FLOOR_LIMIT:
            fails.append(f"the BF16 floor (a) is not small: mean |logp_train - logp_rollout| reached {worst:.3g} "
                         f"(limit {FLOOR_LIMIT}; a wrong Megatron -> transformers conversion gives O(1))")
    prints = {r["init_fingerprint"] for r in result["runs"].values()}
    if len(prints) != 1:
        fails.append(f"the training runs did not start from the same weights (fingerprints {sorted(prints)})")
    for key, evals in result["evals"].items():
        v = meta["variants"][key]
        if v["weights"] == "SHIPPED" and v["train_recipe"] in SHIPS_TRAINED_BITS:
            bad = [e["step"] for e in evals if e["shipped_vs_trained_differ"]]
            if bad:
                fails.append(f"variant {key}: the shipped bytes differ from the weights the forward used at steps {bad}")
        if v["weights"] == "SHIPPED":  # what the engine loads: FlashInfer-rule (half-to-even) bytes, whatever the training
            bad = [e["step"] for e in evals if e["shipped_vs_flashinfer_rule_differ"]]
            if bad:
                fails.append(f"variant {key}: export_mxfp4 did not ship FlashInfer-rule bytes of the master weights at "
                             f"steps {bad} (for (d) the export must round half-to-even, not follow the training recipe)")
        if not meta["smoke"] and any(e["conversion_rounded"] for e in evals):
            fails.append(f"variant {key}: the rollout conversion rounded non-BF16 tensors")
    return fails


def _cell(text: str) -> str:
    """A markdown table cell (the metric names contain pipes)."""
    return text.replace("|", "\\|")


def _fmt(x: float) -> str:
    return f"{x:.3e}" if math.isfinite(x) else "-"


def report(result: dict, fails: list[str]) -> str:
    meta = result["meta"]
    s = meta["settings"]
    z = s["sizes"]
    out = [f"# Train-rollout mismatch: {meta['device']}", "",
           f"- date: {meta['date']}",
           "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
           f"- command: `{meta['command']}`",
           f"- trainer: megatron-core GPTModel, {z['layers']} layers, hidden {z['hidden']}, {z['heads']} heads / "
           f"{z['kv_groups']} KV groups, QK-RMSNorm, RoPE; MoE {z['experts']} experts top-{z['topk']}, SwiGLU, "
           f"moe_ffn {z['moe_ffn']} ({'TE layer spec, TEGroupedMLP' if not meta['smoke'] else 'CPU smoke: local spec + TE stand-in'}); "
           f"byte vocabulary 256; {s['steps']} steps of {s['micro_batches']} x {s['micro_batch']} x {s['seq_len']} tokens, "
           f"Adam lr {s['lr']} (warm-up {s['warmup']}, cosine to 10%), "
           + ("Megatron DDP + distributed optimizer, fused wgrad " + meta["fused_wgrad"] if not meta["smoke"]
              else "torch Adam (CPU smoke)"),
           f"- data: {meta['corpus']['files']} stdlib .py files ({meta['corpus']['root']}, sha256 {meta['corpus']['sha256']}), "
           f"{meta['corpus']['train_bytes']} train bytes, every 10th file held out for prompts; byte-unigram entropy "
           f"{meta['corpus']['unigram_entropy_nats']:.3f} nats",
           f"- rollout: {meta['rollout']}; temperature 1, KV cache, {s['prompts']} held-out prompts of {s['prompt_len']} "
           f"bytes x {s['new_tokens']} sampled tokens = {s['prompts'] * s['new_tokens']} tokens per evaluation, the same "
           f"prompts and uniform draws for every variant; trainer side = the Megatron forward (fake-QAT as in training)",
           f"- noise: the last evaluation repeated with {s['noise_seeds']} further prompt/draw seeds; `+-` is the standard "
           f"deviation over those {s['noise_seeds'] + 1} evaluations",
           "- phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["phases"].items())
           + "; per run: " + "; ".join(f"{n} build {r['seconds']['build']:.1f} / train {r['seconds']['train']:.1f} / "
                                       f"eval {r['seconds']['eval']:.1f} / noise {r['seconds']['noise']:.1f}"
                                       for n, r in result["runs"].items()),
           "", f"## At step {s['steps']}", "",
           "| variant | " + " | ".join(_cell(METRIC_LABELS[m]) for m in METRICS) + " | train loss (last tenth) | shipped != trained |",
           "|---|" + "---|" * (len(METRICS) + 2)]
    for key, evals in result["evals"].items():
        v = meta["variants"][key]
        cells = []
        for m in METRICS:
            mean, std = seed_spread(result, key, m)
            cells.append(f"{_fmt(mean)} +- {_fmt(std)}")
        loss = result["runs"][v["train_recipe"] or "bf16"]["loss"]
        last = evals[-1]
        differ = (f"{last['shipped_vs_trained_differ']} / {last['expert_elements']}" if "shipped_vs_trained_differ" in last
                  else "-")
        out.append(f"| {v['label']} | " + " | ".join(cells) + f" | {_tail_loss(loss):.4f} | {differ} |")
    if "a" in result["evals"] and "e" in result["evals"]:
        out += ["", "## Ours against the floor", ""]
        for m in METRICS:
            (ma, sa), (me, se) = seed_spread(result, "a", m), seed_spread(result, "e", m)
            band = 2 * math.sqrt(sa ** 2 + se ** 2)
            verdict = ("within" if abs(me - ma) <= band else "OUTSIDE") if math.isfinite(band) else "no noise estimate for"
            out.append(f"- {METRIC_LABELS[m]}: (e) {_fmt(me)} vs (a) {_fmt(ma)}: {verdict} 2 sigma of the seed spread "
                       f"({_fmt(band)})")
    out += ["", "## Every evaluation (seed 0)", "", "| variant | step | " + " | ".join(_cell(METRIC_LABELS[m]) for m in METRICS) + " |",
            "|---|---|" + "---|" * len(METRICS)]
    for key, evals in result["evals"].items():
        for e in evals:
            out.append(f"| {key} | {e['step']} | " + " | ".join(_fmt(e[m]) for m in METRICS) + " |")
    out += ["", "## Result check", ""] + ([f"- FAILED: {f}" for f in fails] or ["- all checks passed (every run's loss fell "
            "clearly, one initialisation for every run, the BF16 floor is small, every export shipped FlashInfer-rule "
            "bytes, and those equal the trained weights for the FlashInfer-rule runs)"])
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = result["meta"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, metric in zip(axes, ("probs_diff_mean", "k3_kl")):
        for key, evals in result["evals"].items():
            steps = [e["step"] for e in evals]
            vals = [max(e[metric], 1e-12) for e in evals]
            ax.plot(steps, vals, marker="o", label=meta["variants"][key]["label"],
                    linewidth=2.5 if key in ("a", "e") else 1.5)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_title(METRIC_LABELS[metric])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"train-rollout mismatch, {meta['device']} ({meta['settings']['prompts'] * meta['settings']['new_tokens']} "
                 "sampled tokens per point)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def main(argv=None) -> int:
    args, s, variants = parse_args(argv)
    try:
        if args.plot_only is not None:
            try:
                result = json.loads(args.plot_only.read_text())
                _ = result["evals"], result["meta"]["variants"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"--plot-only {args.plot_only}: not a bench_mismatch results JSON ({exc!r})") from None
            require_plotting()
            png = args.plot_only.with_suffix(".png")
            plot(result, png)
            print(f"wrote {png}")
            return 0
        import torch

        if not args.smoke and not torch.cuda.is_available():
            raise UsageError("the benchmark needs a CUDA GPU (use --smoke for the CPU smoke run)")
        if not args.no_plot:
            require_plotting()
        require_transformers()
        problems = contract_problems(variants)
        if problems:
            raise UsageError("cannot run variants " + ",".join(v.key for v in variants) + ": " + "; ".join(problems))
        if not args.smoke:
            need, have = memory_estimate_bytes(s), torch.cuda.get_device_properties(0).total_memory
            print(f"GPU memory: estimate {need / 2**30:.1f} GiB of {have / 2**30:.1f} GiB", flush=True)
            if need > 0.9 * have:
                raise UsageError(f"estimated {need / 2**30:.1f} GiB exceeds 90% of this GPU's {have / 2**30:.1f} GiB; "
                                 "reduce --micro-batch, --seq-len or --prompts")
        result = run(args, s, variants)
    except UsageError as exc:
        print(f"bench_mismatch.py: {exc}", file=sys.stderr)
        return 2
    fails = result_check(result)
    tag = args.tag or ("cpu-smoke" if args.smoke else _slug(result["meta"]["device"]))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"mismatch_{tag}"
    _write(stem.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    _write(stem.with_suffix(".md"), report(result, fails))
    written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    if not args.no_plot:
        plot(result, stem.with_suffix(".png"))
        written.append(stem.with_suffix(".png"))
    print(report(result, fails))
    print("wrote " + ", ".join(str(p) for p in written))
    for f in fails:
        print(f"RESULT CHECK FAILED: {f}", file=sys.stderr)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
