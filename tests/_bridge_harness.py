"""Real Megatron-Bridge on CPU: the pieces tests/test_export_bridge.py needs to drive
``AutoBridge.export_hf_weights_quant`` (megatron-bridge 0.6.2) on a tiny real megatron-core
``GPTModel`` over real multi-process torch.distributed (gloo).

Stand-ins, both because Transformer Engine cannot be installed on a CPU machine:

- the expert grouped linears: megatron-core's ``TEColumnParallelGroupedLinear`` /
  ``TERowParallelGroupedLinear`` are TE classes; here they are :class:`tests.te_standin.StandInGroupedLinear`
  with megatron-core 0.19.2's ``TEGroupedLinear.__init__`` shard sizes (column: ``output_size / ETP``,
  row: ``input_size / ETP``) under the SAME class names, which is what Bridge's ``AutoMapping``
  dispatches on (``_MODULE_TYPE_REGISTRY``);
- ``transformer_engine.pytorch`` for exactly one Bridge module: megatron-bridge 0.6.2
  ``megatron/bridge/peft/lora_layers.py`` imports it at module level (for its TE-fused LoRA, not
  on the export path), and ``import megatron.bridge`` imports that module. :func:`install_te_import_standin`
  serves an import-only stand-in to that module alone, while its code runs, then removes it from
  ``sys.modules``: every other import of ``transformer_engine`` (megatron-core's ``HAVE_TE``
  checks included) still fails as it does without TE. Any use of the stand-in raises.
  If Bridge starts importing another module inside that window, the harness refuses to go on.

Everything else is real: megatron-core 0.19.2 ``GPTModel`` / ``TEGroupedMLP`` / ``MoELayer`` /
``parallel_state``, transformers' ``Qwen3MoeConfig`` / ``GptOssConfig``, and Bridge's
``AutoBridge``, mapping registry, ``GatedMLPMapping`` / ``RowParallelMapping`` quant paths and its
EP / expert-TP collectives.
"""

from __future__ import annotations

import datetime
import functools
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import types

import torch

from te_standin import StandInGroupedLinear

BRIDGE_VERSION = "0.6.2"
WORLD = 2
H, I, E, LAYERS, VOCAB = 64, 64, 4, 2, 128  # hidden, moe_ffn_hidden_size, experts, layers, vocab
# (name, EP, expert-TP) on WORLD ranks; EP=1 runs expert-data-parallel (every rank holds every expert)
SCENARIOS = (("ep1", 1, 1), ("ep2", 2, 1), ("etp2", 1, 2))

_LORA_MODULE = "megatron.bridge.peft.lora_layers"
_LORA_DEPENDENCIES = ("megatron.core.transformer.moe.moe_utils", "megatron.bridge.peft.adapter_wrapper",
                      "megatron.bridge.peft.lora_merge")


PYTHON_REASON = (f"megatron-bridge {BRIDGE_VERSION} needs Python >= 3.12 (this is {sys.version.split()[0]}); "
                 ".ci/run's Python 3.12 lane runs these tests")


def bridge_missing_reason() -> str | None:
    """Why real Bridge cannot run on this Python >= 3.12 (None: it can). Checks without importing it."""
    for dist in ("megatron-bridge", "megatron-core", "transformers"):
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return f"{dist} is not installed (.ci/run's 3.12 lane installs .ci/py312-requirements.txt and .ci/py312-no-deps.txt)"
    found = importlib.metadata.version("megatron-bridge")
    if found != BRIDGE_VERSION:
        return f"megatron-bridge {found} installed; these tests pin {BRIDGE_VERSION}"
    return None


# ------------------------------------------------------------------ transformer_engine import stand-in


class _NoTransformerEngine:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("transformer_engine stand-in (tests/_bridge_harness.py): Transformer Engine is not installed; "
                           f"{_LORA_MODULE} used it on the path under test")


def _te_modules() -> dict[str, types.ModuleType]:
    te = types.ModuleType("transformer_engine")
    te.__path__ = []
    pytorch = types.ModuleType("transformer_engine.pytorch")
    # evaluated at import time by lora_layers' annotations (``-> tuple[te.ops.Sequential, ...]``)
    pytorch.ops = types.SimpleNamespace(Sequential=_NoTransformerEngine)
    te.pytorch = pytorch
    return {te.__name__: te, pytorch.__name__: pytorch}


class _LoraLayersLoader(importlib.abc.Loader):
    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        for dep in _LORA_DEPENDENCIES:  # imported outside the window
            importlib.import_module(dep)
        stand_in = _te_modules()
        clash = set(stand_in) & set(sys.modules)
        if clash:
            raise RuntimeError(f"transformer_engine is importable here ({sorted(clash)}): the stand-in is not needed")
        before = set(sys.modules)
        sys.modules.update(stand_in)
        try:
            self.real.exec_module(module)
        finally:
            for name in stand_in:
                sys.modules.pop(name, None)
        extra = sorted(set(sys.modules) - before - set(stand_in))
        if extra:
            raise RuntimeError(f"{_LORA_MODULE} imported {extra} while the transformer_engine stand-in was visible; "
                               "add them to _LORA_DEPENDENCIES (tests/_bridge_harness.py)")


class _LoraLayersFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _LORA_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            spec.loader = _LoraLayersLoader(spec.loader)
        return spec


def install_te_import_standin() -> None:
    """Before ``import megatron.bridge``: serve the stand-in to ``lora_layers`` only."""
    import megatron.core.extensions.transformer_engine as ext  # megatron-core decides HAVE_TE before Bridge

    assert not getattr(ext, "HAVE_TE", False), "Transformer Engine is installed; this harness is for machines without it"
    if not any(isinstance(f, _LoraLayersFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _LoraLayersFinder())


# ------------------------------------------------------------------ expert grouped linear stand-ins


class GroupedLinear(StandInGroupedLinear):
    """megatron-core 0.19.2 ``TEGroupedLinear.__init__`` shard sizes on the stand-in (what
    ``megatron.core.extensions.transformer_engine.TEGroupedLinear`` is set to in :func:`build_model`)."""

    parallel_mode = ""

    def __init__(self, num_gemms, input_size, output_size, *, config, pg_collection=None, bias=False, **_):
        etp = pg_collection.expt_tp.size() if pg_collection is not None and pg_collection.expt_tp is not None else 1
        if self.parallel_mode == "column":
            output_size //= etp
        elif self.parallel_mode == "row":
            input_size //= etp
        super().__init__(num_gemms, input_size, output_size, dtype=config.params_dtype)
        self.config = config
        assert not bias, "the harness model has no expert biases"


class TEColumnParallelGroupedLinear(GroupedLinear):
    parallel_mode = "column"


class TERowParallelGroupedLinear(GroupedLinear):
    parallel_mode = "row"


# ------------------------------------------------------------------ model and weights


def global_weights(layer: int) -> dict[str, torch.Tensor]:
    """Full expert weights of one layer (BF16): fc1 ``[E, 2I, H]`` rows ``[gate; up]``, fc2
    ``[E, H, I]``; row magnitudes spread over 2^-6..2^3 so scale bytes vary across rows."""
    gen = torch.Generator().manual_seed(7000 + layer)
    mag1 = torch.logspace(-6, 3, 2 * I, base=2).reshape(1, 2 * I, 1)
    mag2 = torch.logspace(-4, 2, H, base=2).reshape(1, H, 1)
    return {"fc1": (torch.randn(E, 2 * I, H, generator=gen) * mag1).to(torch.bfloat16),
            "fc2": (torch.randn(E, H, I, generator=gen) * mag2).to(torch.bfloat16)}


def _local_shard(w: dict, ep_rank: int, ep: int, etp_rank: int, etp: int) -> dict:
    n = E // ep
    experts = slice(ep_rank * n, (ep_rank + 1) * n)
    gate, up = w["fc1"][experts].chunk(2, dim=1)
    fc1 = torch.cat([gate.chunk(etp, dim=1)[etp_rank], up.chunk(etp, dim=1)[etp_rank]], dim=1)
    return {"fc1": fc1, "fc2": w["fc2"][experts].chunk(etp, dim=2)[etp_rank]}


def build_model(ep: int, etp: int, qk_layernorm: bool = True):
    """A real megatron-core GPTModel (local attention / norms, MoE with TEGroupedMLP experts on the
    grouped-linear stand-in), loaded with this rank's shard of :func:`global_weights`. Qwen3-MoE
    shaped; ``qk_layernorm=False`` for gpt-oss (Bridge's quant stream fails on a parameter its
    mapping registry does not know)."""
    import megatron.core.extensions.transformer_engine as ext
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.moe.experts import GroupedMLPSubmodules, TEGroupedMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig

    ext.TEGroupedLinear = GroupedLinear  # what megatron_qat.export finds the experts by
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=H, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        ffn_hidden_size=2 * H, num_moe_experts=E, moe_ffn_hidden_size=I, moe_router_topk=2, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, normalization="RMSNorm", qk_layernorm=qk_layernorm,
        params_dtype=torch.bfloat16, bf16=True, use_cpu_initialization=True, moe_grouped_gemm=True,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp, bias_dropout_fusion=False,
    )
    spec = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=True, qk_layernorm=qk_layernorm, normalization="RMSNorm")
    experts = functools.partial(TEGroupedMLP, submodules=GroupedMLPSubmodules(linear_fc1=TEColumnParallelGroupedLinear,
                                                                              linear_fc2=TERowParallelGroupedLinear))
    spec.submodules.mlp = functools.partial(MoELayer, submodules=MoESubmodules(experts=experts))
    model = GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=32, position_embedding_type="rope")
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    with torch.no_grad():
        for k, layer in enumerate(model.decoder.layers):
            shard = _local_shard(global_weights(k), ep_rank, ep, etp_rank, etp)
            for role in ("fc1", "fc2"):
                linear = getattr(layer.mlp.experts, f"linear_{role}")
                for i in range(E // ep):
                    getattr(linear, f"weight{i}").copy_(shard[role][i])
    return model


def qwen3_moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=2 * H, moe_intermediate_size=I,
                          num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          num_experts=E, num_experts_per_tok=2, tie_word_embeddings=False,
                          architectures=["Qwen3MoeForCausalLM"])


def gpt_oss_config():
    from transformers import GptOssConfig

    return GptOssConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=E,
                        num_experts_per_tok=2, tie_word_embeddings=False, architectures=["GptOssForCausalLM"])


# ------------------------------------------------------------------ the spawned worker


def _outcome(fn) -> dict:
    try:
        return {"ok": fn()}
    except Exception as exc:  # recorded per rank; the tests assert on the exact outcome
        return {"error": f"{type(exc).__name__}: {exc}"}


def worker(rank: int, port: int, outdir: str) -> None:
    """One rank: every scenario of :data:`SCENARIOS` through real Bridge and through
    ``export_mxfp4``, then Bridge's gpt-oss bridge; saves ``rank{rank}.pt`` in ``outdir``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    install_te_import_standin()
    from megatron.bridge import AutoBridge
    from megatron.core import parallel_state

    from megatron_qat.export import export_mxfp4
    from megatron_qat.export.bridge import (QUANT_BLOCK_SIZE, bridge_to_compressed_tensors, mxfp4_quant_fn,
                                            mxfp4_quantization_checker)

    def bridge_stream(hf_config, model):
        bridge = AutoBridge.from_hf_config(hf_config)
        return bridge.export_hf_weights_quant([model], quantization_checker=mxfp4_quantization_checker,
                                              quant_fn=mxfp4_quant_fn, quant_block_size=QUANT_BLOCK_SIZE,
                                              show_progress=False)

    results = {}
    for name, ep, etp in SCENARIOS:
        parallel_state.initialize_model_parallel(expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
        model = build_model(ep, etp)
        results[name] = {
            "bridge": _outcome(lambda: [(str(n), t) for n, t in bridge_stream(qwen3_moe_config(), model)]),
            "ours": _outcome(lambda: list(export_mxfp4([model], "compressed-tensors", family="qwen3_moe"))),
        }
        if name == "ep1":  # Bridge's gpt-oss bridge: its fused expert names
            gpt_oss = build_model(ep, etp, qk_layernorm=False)
            results["gpt_oss"] = _outcome(lambda: list(bridge_to_compressed_tensors(bridge_stream(gpt_oss_config(), gpt_oss))))
        parallel_state.destroy_model_parallel()
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_all(outdir: str) -> list[dict]:
    """Spawn :data:`WORLD` ranks of :func:`worker`; returns each rank's results."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, outdir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
