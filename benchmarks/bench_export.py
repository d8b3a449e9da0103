"""Bytes on the wire and wall time of one expert-weight sync: quantize-then-gather (what
:func:`megatron_qat.export.export_mxfp4` does) against gather-BF16-then-quantize (the baseline).

Per model, one MoE layer's routed experts at the PER-RANK shapes of a real deployment:

- Qwen3-30B-A3B, EP=8: 16 local experts, hidden 2048, moe_ffn 768 (fc1 [1536, 2048], fc2 [2048, 768])
- gpt-oss-120b, EP=8: 16 local experts, hidden 2880, ffn 2880 (fc1 [5760, 2880], fc2 [2880, 2880])
- DeepSeek-V3-class, EP=32: 8 local experts, hidden 7168, moe_ffn 2048 (fc1 [4096, 7168], fc2 [7168, 2048])

Bytes are computed exactly for those shapes (payload one rank contributes to the EP all_gather:
BF16 2 B/element vs MXFP4 0.5 B + 1 B per 32 elements) and cross-checked against the bytes the
timed run actually handed to ``all_gather``. Time: multi-process gloo on CPU (``--world`` ranks,
``--experts-per-rank`` local experts, real per-expert shapes; every rank receives the full layer),
median of ``--repeats``; the quantize step is the PyTorch reference on CPU, so times are
indicative only. NCCL / GPU timing is not measured by this script's CPU mode.

    python benchmarks/bench_export.py --out benchmarks/results/export_cpu-gloo.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import sys
import time

import torch

MODELS = [
    # name, EP, local experts, hidden, moe_ffn (gated: fc1 rows = 2 * moe_ffn)
    ("Qwen3-30B-A3B", 8, 16, 2048, 768),
    ("gpt-oss-120b", 8, 16, 2880, 2880),
    ("DeepSeek-V3-class", 32, 8, 7168, 2048),
]


def layer_elements(local: int, hidden: int, ffn: int) -> int:
    return local * (2 * ffn * hidden + hidden * ffn)


def payload_bytes(elements: int, mxfp4: bool, block: int = 32) -> int:
    return elements // 2 + elements // block if mxfp4 else 2 * elements


def _worker(rank, world, port, args, queue):
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_qat.export.codec import quantize_experts
    from megatron_qat.export.gather import Destination, ExpertGroups, gather_experts
    from megatron_qat.numerics.constants import DEFAULT_BLOCK_SIZE

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    groups, where = ExpertGroups(etp=None, ep=dist.group.WORLD), Destination()
    sent = {"qtg": 0, "gtq": 0}
    real_gather = dist.all_gather

    def counting_gather(out, t, group=None, mode=None):
        sent[mode] += t.numel() * t.element_size()
        return real_gather(out, t, group=group)

    results = {}
    for name, _, _, hidden, ffn in MODELS:
        n = args.experts_per_rank
        gen = torch.Generator().manual_seed(rank)
        fc1 = [torch.randn(2 * ffn, hidden, generator=gen).bfloat16() for _ in range(n)]
        fc2 = [torch.randn(hidden, ffn, generator=gen).bfloat16() for _ in range(n)]
        names = [f"e{i}" for i in range(n)]
        times = {"qtg": [], "gtq": []}
        for rep in range(args.repeats):
            for mode in ("qtg", "gtq"):
                dist.all_gather = lambda out, t, group=None, _m=mode: counting_gather(out, t, group, _m)
                before = sent[mode]
                dist.barrier()
                t0 = time.perf_counter()
                for ws, kind in ((fc1, "column"), (fc2, "row")):
                    if mode == "qtg":
                        payload = quantize_experts(ws, names, DEFAULT_BLOCK_SIZE)
                        gather_experts(payload.codes, kind, groups, where, glu=kind == "column")
                        gather_experts(payload.scales, kind, groups, where, glu=kind == "column")
                    else:
                        full = gather_experts(torch.stack(ws), kind, groups, where, glu=kind == "column")
                        quantize_experts(list(full.unbind(0)), [f"g{i}" for i in range(full.shape[0])], DEFAULT_BLOCK_SIZE)
                dist.barrier()
                times[mode].append(time.perf_counter() - t0)
                if rep == 0:
                    results.setdefault(name, {})[f"{mode}_bytes"] = sent[mode] - before
        dist.all_gather = real_gather
        for mode in times:
            results[name][f"{mode}_s"] = statistics.median(times[mode])
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="gloo ranks (EP group size of the timed run)")
    p.add_argument("--experts-per-rank", type=int, default=1, help="local experts per rank in the timed run (bytes are reported for the real counts)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args(argv)
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_worker, args=(args.world, port, args, queue), nprocs=args.world, join=True)
    timed = queue.get()
    lines = render(timed, args)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


def render(timed, args) -> list[str]:
    import megatron_qat

    cpu = platform.processor() or platform.machine()
    lines = [
        "# MXFP4 expert-weight sync: quantize-then-gather vs gather-BF16-then-quantize (CPU, gloo)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- device: CPU only ({cpu}, {os.cpu_count()} cores visible), torch.distributed gloo, {args.world} processes, 1 thread each",
        f"- versions: megatron-qat {megatron_qat.__version__}, torch {torch.__version__}, Python {platform.python_version()}",
        f"- command: `python benchmarks/bench_export.py --world {args.world} --experts-per-rank {args.experts_per_rank} --repeats {args.repeats}"
        + (f" --out {args.out}`" if args.out else "`"),
        "- bytes: exact, per rank, payload handed to the EP all_gather for ONE layer at the real per-rank shapes "
        "(BF16 2 B/element; MXFP4 codes 0.5 B + E8M0 scales 1 B per 32 elements); the timed run's measured payload "
        "matches the same formula at its scaled-down expert count (column 'measured').",
        f"- time: median of {args.repeats} syncs of {args.experts_per_rank} local expert(s) per rank at the real per-expert "
        "shapes (scaled down from the real local expert count to keep CPU time modest), every rank receiving the full layer; "
        "quantize = PyTorch reference on CPU, so the time ratio mostly reflects that the baseline quantizes all "
        f"{args.world} x local experts on every rank while quantize-then-gather quantizes only its own. INDICATIVE ONLY.",
        "- NOT MEASURED (no GPU in this session): NCCL sync time on 2 GPUs and the quantize step alone on one GPU "
        "(issue targets: sync >= 2x faster on NCCL, quantize >= 80% of copy bandwidth; the Triton kernel's own numbers "
        "are in qdq_h200.md).",
        "",
        "| model (per-rank shape) | BF16 bytes / rank | MXFP4 bytes / rank | bytes ratio | measured BF16 / MXFP4 bytes (timed run) | gather-then-quantize s | quantize-then-gather s | time ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, ep, local, hidden, ffn in MODELS:
        el = layer_elements(local, hidden, ffn)
        bf16, mx = payload_bytes(el, False), payload_bytes(el, True)
        t = timed[name]
        el_timed = layer_elements(args.experts_per_rank, hidden, ffn)
        assert t["gtq_bytes"] == payload_bytes(el_timed, False) and t["qtg_bytes"] == payload_bytes(el_timed, True), (name, t)
        lines.append(
            f"| {name} EP={ep}: {local} x (fc1 [{2 * ffn}, {hidden}], fc2 [{hidden}, {ffn}]) | {bf16 / 2**20:,.1f} MiB | "
            f"{mx / 2**20:,.1f} MiB | {bf16 / mx:.3f}x | {t['gtq_bytes']:,} / {t['qtg_bytes']:,} B | {t['gtq_s']:.3f} | "
            f"{t['qtg_s']:.3f} | {t['gtq_s'] / t['qtg_s']:.2f}x |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
