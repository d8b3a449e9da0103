"""Bytes on the wire and wall time of one expert-weight sync: quantize-then-gather (what
:func:`megatron_qat.export.export_mxfp4` does) against gather-BF16-then-quantize (the baseline),
and a bit-for-bit check that the bytes every rank receives equal a one-device export.

Per model, one MoE layer's routed experts at the PER-RANK shapes of a real deployment:

- Qwen3-30B-A3B, EP=8: 16 local experts, hidden 2048, moe_ffn 768 (fc1 [1536, 2048], fc2 [2048, 768])
- gpt-oss-120b, EP=8: 16 local experts, hidden 2880, ffn 2880 (fc1 [5760, 2880], fc2 [2880, 2880])
- DeepSeek-V3-class, EP=32: 8 local experts, hidden 7168, moe_ffn 2048 (fc1 [4096, 7168], fc2 [7168, 2048])

Both paths run the export's own functions (``export.codec.quantize_experts``,
``export.gather.gather_experts``, fc1 as the GLU column kind) over the EP group of the run (all
its ranks); every rank receives the full layer (``all_gather``). Bytes: exact for the real local
expert count (BF16 2 B/element; MXFP4 codes 0.5 B + E8M0 scales 1 B per 32 elements) and
cross-checked against the bytes the timed run handed to ``all_gather``. Check: on every rank, the
gathered codes and scales of BOTH paths equal (uint8 views) ``quantize_experts`` of the whole
layer's weights -- regenerated there from the same per-expert seeds -- on that one device, with no
collective (the one-device export). Exit status 1 when that check or the byte count fails, 2 for
bad arguments; a missed speed target is a result (reported), not an error.

``--backend nccl`` (issue 19): one rank per GPU under torchrun (``NCCL_NVLS_ENABLE=0
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1`` on the lent multi-GPU machines);
every rank holds the REAL local expert count at the real shapes, the run's EP group is its GPUs
(the full layer is world x local experts); quantize = the dispatch default (the Triton kernel on
CUDA). Each sync is timed between ``torch.cuda.synchronize()`` calls after a barrier; per sync the
slowest rank's time counts; the table gives the median of ``--repeats`` (>= 10) syncs after
``--warmup`` (>= 1). Targets: sync >= 2x faster, bytes 3.765x. With one process (one GPU) nothing
crosses the wire: the run only exercises the code and the check, and says so::

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_export.py --backend nccl --out benchmarks/results/

``--backend gloo`` (default): CPU, ``--world`` processes spawned here, ``--experts-per-rank``
local experts at the real per-expert shapes (scaled down from the real count), quantize = the
PyTorch reference on CPU, so times are indicative only::

    python benchmarks/bench_export.py --out benchmarks/results/export_cpu-gloo.md

``--out`` takes a file, or an existing directory (then ``export_<gpu>-nccl.md``,
``export_<gpu>-1gpu-smoke.md`` for one process, or ``export_cpu-gloo.md`` inside it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import socket
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_qat.numerics.constants import DEFAULT_BLOCK_SIZE  # noqa: E402
from megatron_qat.numerics.rules import FLASHINFER_MXFP4  # noqa: E402

MODELS = [
    # name, EP, local experts, hidden, moe_ffn (gated: fc1 rows = 2 * moe_ffn)
    ("Qwen3-30B-A3B", 8, 16, 2048, 768),
    ("gpt-oss-120b", 8, 16, 2880, 2880),
    ("DeepSeek-V3-class", 32, 8, 7168, 2048),
]
PATHS = ("qtg", "gtq")  # quantize-then-gather, gather-BF16-then-quantize
BLOCK = DEFAULT_BLOCK_SIZE
BYTES_TARGET, TIME_TARGET = 16 / (4 + 8 / BLOCK), 2.0
NCCL_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


def layer_elements(local: int, hidden: int, ffn: int) -> int:
    return local * (2 * ffn * hidden + hidden * ffn)


def payload_bytes(elements: int, mxfp4: bool, block: int = BLOCK) -> int:
    return elements // 2 + elements // block if mxfp4 else 2 * elements


def expert_weights(model: int, hidden: int, ffn: int, experts, device) -> dict[str, list[torch.Tensor]]:
    """BF16 ``fc1 [2*ffn, hidden]`` and ``fc2 [hidden, ffn]`` of the given GLOBAL expert ids, each
    drawn from its own seed on ``device``: any rank regenerates any expert bit for bit."""
    out = {"fc1": [], "fc2": []}
    for e in experts:
        gen = torch.Generator(device=device).manual_seed(1_000_003 * (model + 1) + e)
        out["fc1"].append(torch.randn(2 * ffn, hidden, generator=gen, device=device, dtype=torch.bfloat16))
        out["fc2"].append(torch.randn(hidden, ffn, generator=gen, device=device, dtype=torch.bfloat16))
    return out


KINDS = {"fc1": "column", "fc2": "row"}


def sync(path: str, weights: dict, groups, where) -> dict[str, torch.Tensor]:
    """One layer's sync: ``{role_codes, role_scales}`` of the FULL layer on this rank."""
    from megatron_qat.export.codec import quantize_experts
    from megatron_qat.export.gather import gather_experts

    out = {}
    for role, ws in weights.items():
        kind, glu = KINDS[role], role == "fc1"
        if path == "qtg":
            payload = quantize_experts(ws, [f"{role}.weight{i}" for i in range(len(ws))], BLOCK, rule=FLASHINFER_MXFP4)
            out[f"{role}_codes"] = gather_experts(payload.codes, kind, groups, where, glu=glu)
            out[f"{role}_scales"] = gather_experts(payload.scales, kind, groups, where, glu=glu)
        else:
            full = gather_experts(torch.stack(ws), kind, groups, where, glu=glu)
            names = [f"{role}.weight{i}" for i in range(full.shape[0])]
            payload = quantize_experts(list(full.unbind(0)), names, BLOCK, rule=FLASHINFER_MXFP4)
            out[f"{role}_codes"], out[f"{role}_scales"] = payload.codes, payload.scales
    return out


@contextlib.contextmanager
def counting_all_gather(counter: list[int]):
    """``torch.distributed.all_gather`` adds the bytes this rank hands it to ``counter[0]``."""
    import torch.distributed as dist

    real = dist.all_gather

    def counted(out, t, group=None, async_op=False):
        counter[0] += t.numel() * t.element_size()
        return real(out, t, group=group, async_op=async_op)

    dist.all_gather = counted
    try:
        yield
    finally:
        dist.all_gather = real


def _same_bytes(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
    )


def measure(args, rank: int, world: int, device) -> dict:
    """Every rank: time both paths per model, count their bytes, check their bytes. Returns
    ``{model: {qtg_s, gtq_s, qtg_bytes, gtq_bytes, identical}}`` (the same on every rank)."""
    import torch.distributed as dist

    from megatron_qat.export.gather import Destination, ExpertGroups

    groups, where = ExpertGroups(etp=None, ep=dist.group.WORLD), Destination()
    cuda = device.type == "cuda"
    results = {}
    for index, (name, _, local, hidden, ffn) in enumerate(MODELS):
        if args.models and name not in args.models:
            continue
        n = args.experts_per_rank or local
        mine = expert_weights(index, hidden, ffn, range(rank * n, (rank + 1) * n), device)
        times, sent, last = {p: [] for p in PATHS}, {}, {}
        for rep in range(args.warmup + args.repeats):
            for path in PATHS:
                counter = [0]
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with counting_all_gather(counter):
                    last[path] = sync(path, mine, groups, where)
                if cuda:
                    torch.cuda.synchronize()
                if rep >= args.warmup:
                    times[path].append(time.perf_counter() - t0)
                sent[path] = counter[0]
        full = expert_weights(index, hidden, ffn, range(world * n), device)
        from megatron_qat.export.codec import quantize_experts

        one_device = {}
        for role, ws in full.items():
            payload = quantize_experts(ws, [f"{role}.weight{i}" for i in range(len(ws))], BLOCK, rule=FLASHINFER_MXFP4)
            one_device[f"{role}_codes"], one_device[f"{role}_scales"] = payload.codes, payload.scales
        ok = all(_same_bytes(last[p], one_device) for p in PATHS)
        del full, one_device, last, mine
        stats = torch.tensor([float(ok)] + times["qtg"] + times["gtq"], dtype=torch.float64, device=device)
        flag, slowest = stats[:1].clone(), stats[1:].clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # identical on every rank
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # per sync, the slowest rank
        slowest = slowest.tolist()
        results[name] = {
            "qtg_s": statistics.median(slowest[: args.repeats]),
            "gtq_s": statistics.median(slowest[args.repeats :]),
            "qtg_bytes": sent["qtg"],
            "gtq_bytes": sent["gtq"],
            "identical": bool(flag.item()),
            "experts_per_rank": n,
        }
        if cuda:
            torch.cuda.empty_cache()
    return results


def _gloo_worker(rank, world, port, args, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = measure(args, rank, world, torch.device("cpu"))
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                   help="gloo: CPU processes spawned here; nccl: one GPU per rank, launched by torchrun")
    p.add_argument("--world", type=int, default=2, help="gloo ranks (EP group size of the timed run); nccl: torchrun's")
    p.add_argument("--experts-per-rank", type=int, default=None,
                   help="local experts per rank in the timed run (default: gloo 1, nccl the real count)")
    p.add_argument("--repeats", type=int, default=None, help="timed syncs per path (default: gloo 3, nccl 10; nccl >= 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed syncs first (default: gloo 0, nccl 3; nccl >= 1)")
    p.add_argument("--models", nargs="+", choices=[m[0] for m in MODELS], help="a subset of the models (default: all)")
    p.add_argument("--out", help="write the markdown table to this file, or into this existing directory")
    args = p.parse_args(argv)
    nccl = args.backend == "nccl"
    args.repeats = args.repeats if args.repeats is not None else (10 if nccl else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if nccl else 0)
    if args.experts_per_rank is None and not nccl:
        args.experts_per_rank = 1
    if args.repeats < 1 or args.warmup < 0 or (args.experts_per_rank is not None and args.experts_per_rank < 1):
        p.exit(2, "bench_export.py: --repeats and --experts-per-rank must be >= 1, --warmup >= 0\n")
    if nccl:
        if args.repeats < 10 or args.warmup < 1:
            p.exit(2, f"bench_export.py: --backend nccl times the median of >= 10 syncs after >= 1 warm-up; "
                      f"got --repeats {args.repeats} --warmup {args.warmup}\n")
        if "WORLD_SIZE" not in os.environ or "LOCAL_RANK" not in os.environ:
            p.exit(2, "bench_export.py: --backend nccl runs under torchrun "
                      "(torchrun --nproc-per-node 2 benchmarks/bench_export.py --backend nccl ...)\n")
        args.world = int(os.environ["WORLD_SIZE"])
        if torch.cuda.device_count() < args.world:
            p.exit(2, f"bench_export.py: --backend nccl needs one GPU per rank; {torch.cuda.device_count()} visible, "
                      f"{args.world} ranks\n")
    elif args.world < 1:
        p.exit(2, f"bench_export.py: --world {args.world}: must be >= 1\n")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.backend == "nccl":
        import torch.distributed as dist

        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
        results = measure(args, dist.get_rank(), args.world, device)
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return 0 if _passed(results, args) else 1
    else:
        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_gloo_worker, args=(args.world, port, args, queue), nprocs=args.world, join=True)
        results = queue.get()
    text = "\n".join(render(results, args)) + "\n"
    print(text)
    if args.out:
        path = args.out
        if os.path.isdir(path):
            path = os.path.join(path, _file_name(args))
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {path}")
    return 0 if _passed(results, args) else 1


def _bytes_as_expected(t: dict, hidden: int, ffn: int, world: int) -> bool:
    el = layer_elements(t["experts_per_rank"], hidden, ffn)
    if world == 1:  # a group of one gathers nothing
        return t["qtg_bytes"] == t["gtq_bytes"] == 0
    return t["gtq_bytes"] == payload_bytes(el, False) and t["qtg_bytes"] == payload_bytes(el, True)


def _passed(results: dict, args) -> bool:
    shapes = {m[0]: m for m in MODELS}
    return bool(results) and all(
        t["identical"] and _bytes_as_expected(t, shapes[name][3], shapes[name][4], args.world) for name, t in results.items()
    )


def _file_name(args) -> str:
    if args.backend == "gloo":
        return "export_cpu-gloo.md"
    return f"export_{_gpu_slug()}-nccl.md" if args.world > 1 else f"export_{_gpu_slug()}-1gpu-smoke.md"


def _gpu_slug() -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``."""
    words = [w for w in re.split(r"[^a-z0-9]+", torch.cuda.get_device_name().lower()) if w and w != "nvidia"]
    return words[0] if words else "gpu"


def _command(args) -> str:
    script = " ".join(sys.argv)
    return f"torchrun --nproc-per-node {args.world} {script}" if args.backend == "nccl" else f"python {script}"


def render(results: dict, args) -> list[str]:
    import megatron_qat

    nccl = args.backend == "nccl"
    if nccl:
        import triton

        name = torch.cuda.get_device_name()
        cap = ".".join(map(str, torch.cuda.get_device_capability()))
        version = torch.cuda.nccl.version()
        nccl_version = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        title = f"# MXFP4 expert-weight sync over NCCL: quantize-then-gather vs gather-BF16-then-quantize ({args.world} x {name})"
        device = (f"- device: {args.world} x {name} (sm_{cap.replace('.', '')}), one rank per GPU, NCCL {nccl_version}; "
                  + ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in NCCL_ENV))
        versions = (f"- versions: megatron-qat {megatron_qat.__version__}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                    f"triton {triton.__version__}, Python {platform.python_version()}")
        timing = (f"- time: per sync, barrier, torch.cuda.synchronize(), the sync, torch.cuda.synchronize(); the slowest "
                  f"rank's time per sync; median of {args.repeats} syncs after {args.warmup} warm-up sync(s). quantize = "
                  "the dispatch default on CUDA (Triton kernel) inside export.codec.quantize_experts (one launch per "
                  "module, a non-finite check per expert).")
    else:
        cpu = platform.processor() or platform.machine()
        title = "# MXFP4 expert-weight sync: quantize-then-gather vs gather-BF16-then-quantize (CPU, gloo)"
        device = f"- device: CPU only ({cpu}, {os.cpu_count()} cores visible), torch.distributed gloo, {args.world} processes, 1 thread each"
        versions = f"- versions: megatron-qat {megatron_qat.__version__}, torch {torch.__version__}, Python {platform.python_version()}"
        timing = (f"- time: median of {args.repeats} syncs after {args.warmup} warm-up sync(s), slowest rank per sync, at the "
                  "real per-expert shapes with the scaled-down expert count of the 'timed' column; quantize = PyTorch "
                  "reference on CPU, so the time ratio mostly reflects that the baseline quantizes all world x local experts "
                  "on every rank while quantize-then-gather quantizes only its own. INDICATIVE ONLY; NCCL timing: "
                  "--backend nccl.")
    lines = [
        title,
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        device,
        versions,
        f"- command: `{_command(args)}`",
        "- bytes: per rank, payload handed to the EP all_gather for ONE layer (BF16 2 B/element; MXFP4 codes 0.5 B + "
        "E8M0 scales 1 B per 32 elements): the formula at the real local expert count, and what the timed run handed "
        "to all_gather at its expert count ('measured', checked against the same formula).",
        timing,
        "- bit-for-bit: on every rank, the full-layer codes and scales of both paths == quantize_experts of the whole "
        "layer's weights (regenerated from the same seeds) on that one device, no collective (uint8 views).",
    ]
    if args.world == 1:
        lines.append("- ONE PROCESS: nothing crosses the wire (a group of one gathers nothing); this run exercises the code "
                     "and the check only. Targets NOT assessed.")
    lines += [
        "",
        "| model (real per-rank shape) | timed experts / rank | BF16 bytes / rank | MXFP4 bytes / rank | bytes ratio | "
        "measured BF16 / MXFP4 bytes (timed run) | gather-then-quantize ms | quantize-then-gather ms | time ratio | bytes == one-device export |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for name, ep, local, hidden, ffn in MODELS:
        if name not in results:
            continue
        t = results[name]
        el = layer_elements(local, hidden, ffn)
        bf16, mx = payload_bytes(el, False), payload_bytes(el, True)
        ratio = t["gtq_s"] / t["qtg_s"]
        as_formula = _bytes_as_expected(t, hidden, ffn, args.world)
        if t["qtg_bytes"]:
            measured = f"{t['gtq_bytes']:,} / {t['qtg_bytes']:,} B = {t['gtq_bytes'] / t['qtg_bytes']:.3f}x"
        else:
            measured = "0 / 0 B (nothing gathered)"
        measured += " (as formula)" if as_formula else " (NOT AS FORMULA)"
        lines.append(
            f"| {name} EP={ep}: {local} x (fc1 [{2 * ffn}, {hidden}], fc2 [{hidden}, {ffn}]) | {t['experts_per_rank']} | "
            f"{bf16 / 2**20:,.1f} MiB | {mx / 2**20:,.1f} MiB | {bf16 / mx:.3f}x | {measured} | {t['gtq_s'] * 1e3:,.2f} | "
            f"{t['qtg_s'] * 1e3:,.2f} | {ratio:.2f}x | {'yes' if t['identical'] else 'NO'} |"
        )
        if nccl and args.world > 1:
            bytes_ok = as_formula and round(t["gtq_bytes"] / t["qtg_bytes"], 3) == round(BYTES_TARGET, 3)
            verdicts.append(f"{name}: bytes {'met' if bytes_ok else 'MISSED'}, sync {ratio:.2f}x "
                            f"({'met' if ratio >= TIME_TARGET else 'MISSED'})")
    lines.append("")
    if nccl and args.world > 1:
        lines.append(f"Targets: bytes {BYTES_TARGET:.3f}x (measured payload), sync >= {TIME_TARGET:.0f}x faster: "
                     + "; ".join(verdicts) + ".")
    elif not nccl:
        lines.append(f"Bytes target ({BYTES_TARGET:.3f}x): the formula gives it for every shape; the measured payload agrees "
                     "where the column says 'as formula'. Time targets: not assessable on CPU/gloo (--backend nccl).")
    lines.append("Result: " + ("PASS (bytes as the formula, every rank's bytes == the one-device export)" if _passed(results, args)
                               else "FAIL (see the columns 'measured' and 'bytes == one-device export')"))
    return lines


if __name__ == "__main__":
    sys.exit(main())
