"""EP=2 training check (issue 19 item 1): a real megatron-core ``MoELayer`` (``TEGroupedMLP``
experts, SwiGLU, BF16) with expert-parallel size 2, under megatron-core DDP with the distributed
optimizer and gradient-accumulation fusion (fused wgrad into ``main_grad``), trained through
megatron-core's own schedule (``forward_backward_no_pipelining``: ``no_sync`` over all but the last
micro-batch, ``finalize_model_grads``) for ``--steps`` optimizer steps of ``--micro-batches``.

Run on two GPUs (NCCL, Transformer Engine; megatron-core 0.19.2 + TE 2.20.2 as staged in
shared/device/README.md, whose env.sh sets the NCCL variables)::

    torchrun --standalone --nproc-per-node 2 tests/gpu/ep2_training.py --backend nccl --dispatcher alltoall
    torchrun --standalone --nproc-per-node 2 tests/gpu/ep2_training.py --backend nccl --dispatcher allgather

and on CPU (what CI runs, tests/test_ep2_training_cpu.py): gloo, 2 processes, Transformer Engine
replaced by the STAND-IN of tests/_cpu_megatron.py (TE cannot be installed on CPU; it reproduces
megatron-core 0.16.1's ``TEGroupedLinear`` over TE 2.20.2's BF16 grouped-GEMM protocol, fused wgrad
included), megatron-core's hard-coded CUDA device redirected to the CPU (listed there)::

    torchrun --standalone --nproc-per-node 2 tests/gpu/ep2_training.py --backend gloo --dispatcher allgather

One GPU: ``torchrun --standalone --nproc-per-node 1 tests/gpu/ep2_training.py --backend nccl --ep 1``
runs the same checks at EP=1 (the summary says EP=1; it is not the EP=2 check).

Three runs from the same initial weights and the same per-rank data: fake-QAT on with the weight
cache (``MEGATRON_QAT_CACHE=1``), fake-QAT on without it (``=0``), and, per optimizer step, a
flag-OFF reference built from that step's master weights with every expert weight replaced by
``megatron_qat.mxfp4.fake_quantize`` of it (same DDP configuration, same micro-batches, same
schedule). Checked on every rank, bit for bit on integer views:

1. the fake-quantized forward (each micro-batch's layer output) equals the reference's;
2. every parameter's ``main_grad`` after ``finalize_model_grads`` equals the reference's: the
   straight-through gradient lands in the BF16 master's ``main_grad`` exactly once (no second add of
   TE's dummy wgrad by Megatron's DDP hook, none missing), for every local expert of both EP ranks
   (each receives tokens and a non-zero gradient: the comparison is never vacuous);
3. cache on == cache off: outputs, every ``main_grad`` and every master weight after each optimizer
   step; the cached run reused copies (hits > 0) and the uncached run never did.

The reference is built after the fake-QAT run has finished, from saved states, so nothing toggles
fake-QAT (which would drop the cache) between the optimizer steps under test. Exit status: 0 when
every check held on every rank (rank 0 prints one line per check and ``PASS``), 1 when one did not
(rank 0 prints each mismatch and ``FAIL``), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# TOPK = 2: megatron's token unpermute / permute-backward scatter-add (atomic on CUDA) then sums at
# most two contributions onto zeros, which is order-independent, so a bitwise comparison is fair.
HIDDEN, FFN, EXPERTS, TOPK = 128, 64, 4, 2
SEQ, MICRO_BATCH = 16, 2  # tokens per micro-batch per rank: SEQ * MICRO_BATCH
BLOCK = 32
LR = 1e-2
CACHE_ENV = "MEGATRON_QAT_CACHE"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("nccl", "gloo"), default="nccl",
                   help="nccl: GPUs with Transformer Engine; gloo: CPU with the TE stand-in (tests/_cpu_megatron.py)")
    p.add_argument("--ep", type=int, default=2, help="expert-parallel size; must equal the number of processes")
    p.add_argument("--dispatcher", choices=("alltoall", "allgather"), default=None,
                   help="megatron's moe_token_dispatcher_type (default: nccl alltoall, gloo allgather; gloo: allgather only)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps (>= 2)")
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches per optimizer step (>= 2)")
    args = p.parse_args(argv)
    if args.dispatcher is None:
        args.dispatcher = "alltoall" if args.backend == "nccl" else "allgather"
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world == 0:
        p.exit(2, "ep2_training.py: WORLD_SIZE is not set; launch with torchrun --nproc-per-node N (N = --ep)\n")
    if args.ep != world:
        p.exit(2, f"ep2_training.py: --ep {args.ep} needs {args.ep} processes; torchrun started {world}\n")
    if args.steps < 2 or args.micro_batches < 2:
        p.exit(2, f"ep2_training.py: --steps {args.steps} / --micro-batches {args.micro_batches}: both must be >= 2\n")
    if args.backend == "gloo" and args.dispatcher != "allgather":
        p.exit(2, "ep2_training.py: --dispatcher alltoall needs CUDA streams (megatron's MoEAlltoAllTokenDispatcher); "
                  "with --backend gloo use --dispatcher allgather\n")
    if args.backend == "nccl" and torch.cuda.device_count() < world:
        p.exit(2, f"ep2_training.py: --backend nccl needs one GPU per process; {torch.cuda.device_count()} visible, "
                  f"{world} processes\n")
    return args


def init(args):
    """torch.distributed from torchrun's environment, megatron parallel state (TP = PP = 1,
    EP = world size, so the expert-data-parallel size is 1 and the dense data-parallel size is EP)."""
    import torch.distributed as dist

    if args.backend == "gloo":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
        import _cpu_megatron

        _cpu_megatron.install()
        device = torch.device("cpu")
    else:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=300))
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=args.ep)
    if args.backend == "nccl":
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)
    return device


def make_config(args):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_moe_experts=EXPERTS, moe_ffn_hidden_size=FFN,
        moe_router_topk=TOPK, moe_grouped_gemm=True, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type=args.dispatcher, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, bf16=True, params_dtype=torch.bfloat16, gradient_accumulation_fusion=True,
        expert_model_parallel_size=args.ep,
    )


class Net(torch.nn.Module):
    """What megatron's schedule drives: the MoELayer, ``set_input_tensor`` (no pipeline) and a model type."""

    def __init__(self, layer):
        super().__init__()
        from megatron.core.enums import ModelType

        self.moe = layer
        self.model_type = ModelType.encoder_or_decoder

    def set_input_tensor(self, tensor):
        pass

    def forward(self, x):
        return self.moe(x)[0]


def build(args, device, state=None, fake_experts=False):
    """A MoELayer (megatron's TE spec: TEGroupedMLP with TEColumn/RowParallelGroupedLinear), wrapped in
    megatron DDP (distributed optimizer, fp32 grad buffers, fused wgrad). Weights: ``state``
    (``{name: tensor}`` of every parameter of the MoELayer; parameters only, so TE's ``_extra_state``
    plays no part) or the deterministic initial weights; ``fake_experts``: every expert weight
    replaced by ``fake_quantize`` of itself (the flag-off reference)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from megatron_qat import mxfp4

    config = make_config(args)
    spec = get_moe_module_spec(use_te=True, num_experts=EXPERTS, moe_grouped_gemm=True)
    layer = build_module(spec, config=config) if isinstance(spec, ModuleSpec) else spec(config=config)
    layer = layer.to(device)
    with torch.no_grad():
        if state is not None:
            params = dict(layer.named_parameters())
            assert sorted(params) == sorted(state), (sorted(params), sorted(state))
            for name, p in params.items():
                p.copy_(state[name])
        else:
            initial_weights(layer)
        if fake_experts:
            for name, p in expert_params(layer).items():
                p.copy_(mxfp4.fake_quantize(p, BLOCK))
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=True)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=Net(layer))
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return layer, model


def expert_params(layer):
    """{name: Parameter} of the routed experts' grouped-linear weights (weight0..N-1 of fc1 and fc2)."""
    out = {n: p for n, p in layer.named_parameters() if n.startswith("experts.linear_fc") and ".weight" in n}
    assert out, f"no expert weights in {[n for n, _ in layer.named_parameters()]}"
    return out


def initial_weights(layer):
    """Deterministic weights: the router's are the same on every rank; expert ``i`` of this rank is
    global expert ``ep_rank * N + i`` and gets that expert's values (so EP layouts agree)."""
    from megatron.core import parallel_state

    offset = parallel_state.get_expert_model_parallel_rank() * (EXPERTS // parallel_state.get_expert_model_parallel_world_size())
    for name, p in layer.named_parameters():
        key = name
        if name in expert_params(layer):
            prefix, local = name.rsplit("weight", 1)
            key = f"{prefix}weight{offset + int(local)}"
        gen = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(key)))
        p.copy_((torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype))


def micro_batches(step, n, device):
    """This rank's inputs ``x`` and upstream gradients ``dy`` ``[SEQ, MICRO_BATCH, HIDDEN]`` (bf16)."""
    import torch.distributed as dist

    out = []
    for mb in range(n):
        gen = torch.Generator().manual_seed(1000 * dist.get_rank() + 10 * step + mb)
        x = torch.randn(SEQ, MICRO_BATCH, HIDDEN, generator=gen).to(torch.bfloat16)
        dy = torch.randn(SEQ, MICRO_BATCH, HIDDEN, generator=gen).to(torch.bfloat16)
        out.append((x.to(device), dy.to(device)))
    return out


def _forward_step(data_iterator, model):
    x, dy = next(data_iterator)
    out = model(x)

    def loss_func(output):
        return (output.float() * dy.float()).sum(), {"out": output.detach().clone()}

    return out, loss_func


def train_step(model, batches):
    """One optimizer step's forward and backward through megatron's schedule; the layer outputs."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.zero_grad_buffer()
    store = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter(batches), model=model, num_microbatches=len(batches),
        seq_length=SEQ, micro_batch_size=MICRO_BATCH, forward_only=False,
    )
    return [d["out"] for d in store]


def qat_run(args, device, cache: bool):
    """Fake-QAT on, ``MEGATRON_QAT_CACHE`` = 1 / 0: per step the outputs, every main_grad, the master
    weights before the step (the reference's starting point) and after it."""
    import megatron_qat
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_qat.megatron import current

    os.environ[CACHE_ENV] = "1" if cache else "0"
    megatron_qat.enable(BLOCK)
    try:
        layer, model = build(args, device)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=LR, bf16=True, use_distributed_optimizer=True, clip_grad=0.0), [model]
        )
        steps = []
        for step in range(args.steps):
            before = {n: p.detach().clone() for n, p in layer.named_parameters()}
            optimizer.zero_grad()
            outs = train_step(model, micro_batches(step, args.micro_batches, device))
            grads = {n: p.main_grad.detach().clone() for n, p in layer.named_parameters()}
            update_ok, _, _ = optimizer.step()
            assert update_ok, f"step {step}: the distributed optimizer skipped its update"
            after = {n: p.detach().clone() for n, p in layer.named_parameters()}
            steps.append({"before": before, "outs": outs, "grads": grads, "after": after})
        stats = current().stats()
        return steps, (stats.hits, stats.misses, stats.uncached), sorted(expert_params(layer))
    finally:
        megatron_qat.disable()


def _bits(t):
    t = t.detach().contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def check(args, device):
    """Every comparison of the module docstring on this rank; returns (failures, facts)."""
    import megatron_qat
    from megatron_qat import mxfp4

    failures, facts = [], {}
    cached, cached_stats, experts = qat_run(args, device, cache=True)
    uncached, uncached_stats, _ = qat_run(args, device, cache=False)
    facts["stats"] = {"cache": cached_stats, "no_cache": uncached_stats}
    if not (cached_stats[0] > 0 and cached_stats[2] == 0):
        failures.append(f"MEGATRON_QAT_CACHE=1 run: cache stats (hits, misses, uncached) = {cached_stats}; expected hits > 0")
    if not (uncached_stats[0] == 0 and uncached_stats[1] == 0 and uncached_stats[2] > 0):
        failures.append(f"MEGATRON_QAT_CACHE=0 run: cache stats (hits, misses, uncached) = {uncached_stats}; expected only uncached")
    assert not megatron_qat.is_enabled()
    compared = {"outputs": 0, "main_grads": 0, "expert_main_grads": 0, "params": 0}
    for step, (c, u) in enumerate(zip(cached, uncached)):
        for mb, (a, b) in enumerate(zip(c["outs"], u["outs"])):
            if not _same(a, b):
                failures.append(f"step {step} micro-batch {mb}: output differs, cache on vs off")
        for name in c["grads"]:
            if not _same(c["grads"][name], u["grads"][name]):
                failures.append(f"step {step}: {name}.main_grad differs, cache on vs off")
            if not _same(c["after"][name], u["after"][name]):
                failures.append(f"step {step}: {name} after the optimizer step differs, cache on vs off")
            compared["params"] += 1
        for name in experts:  # the master really is changed by fake-quant (else the check proves nothing)
            w = c["before"][name]
            if _same(w, mxfp4.fake_quantize(w, BLOCK)):
                failures.append(f"step {step}: {name} is already on the MXFP4 grid; the check would be vacuous")
        for run_name, run in (("cache", c), ("no cache", u)):
            _, ref = build(args, device, state=run["before"], fake_experts=True)
            ref_layer = ref.module.moe
            ref_outs = train_step(ref, micro_batches(step, args.micro_batches, device))
            for mb, (a, b) in enumerate(zip(run["outs"], ref_outs)):
                compared["outputs"] += 1
                if not _same(a, b):
                    failures.append(f"step {step} micro-batch {mb} ({run_name}): fake-QAT output != flag-off reference "
                                    "holding fake_quantize(masters)")
            for name, p in ref_layer.named_parameters():
                compared["main_grads"] += 1
                got, want = run["grads"][name], p.main_grad
                if name in experts:
                    compared["expert_main_grads"] += 1
                    if not bool(torch.isfinite(got).all()) or not bool(got.ne(0).any()):
                        failures.append(f"step {step} ({run_name}): {name}.main_grad is zero or non-finite "
                                        "(expert got no tokens or no gradient)")
                if not _same(got, want):
                    diff = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else "shape"
                    failures.append(f"step {step} ({run_name}): {name}.main_grad != reference (max |diff| {diff})")
            del ref, ref_layer
    facts["compared"] = compared
    facts["experts"] = len(experts)
    return failures, facts


def _te_version(args) -> str:
    if args.backend == "gloo":
        return "Transformer Engine: stand-in"
    import transformer_engine

    return f"Transformer Engine {transformer_engine.__version__}"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = init(args)
    import torch.distributed as dist

    failures, facts = check(args, device)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (failures, facts))
    if dist.get_rank() == 0:
        import megatron.core

        stand_in = " (Transformer Engine STAND-IN, tests/_cpu_megatron.py)" if args.backend == "gloo" else ""
        print(f"EP={args.ep} training check: backend {args.backend}{stand_in}, dispatcher {args.dispatcher}, "
              f"{dist.get_world_size()} ranks, {args.steps} optimizer steps x {args.micro_batches} micro-batches, "
              "megatron DDP + distributed optimizer, gradient_accumulation_fusion=True")
        print(f"versions: megatron-core {megatron.core.__version__}, {_te_version(args)}, torch {torch.__version__}, "
              f"Python {sys.version.split()[0]}")
        for rank, (fails, f) in enumerate(everyone):
            n = f["compared"]
            print(f"rank {rank}: {f['experts']} expert weights; compared {n['outputs']} outputs and {n['main_grads']} "
                  f"main_grads ({n['expert_main_grads']} expert) with the flag-off reference, {n['params']} "
                  f"main_grads + params cache on vs off; cache stats (hits, misses, uncached) {f['stats']}")
            for line in fails:
                print(f"rank {rank}: MISMATCH {line}")
        bad = any(fails for fails, _ in everyone)
        print("FAIL" if bad else
              "PASS: forward == flag-off fake_quantize reference, every main_grad == reference (each expert "
              "gradient landed exactly once), cache == no cache; bit for bit on every rank")
    bad = any(fails for fails, _ in everyone)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
