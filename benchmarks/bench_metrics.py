"""Benchmark the MXFP4 statistics pass (megatron_qat.metrics.block_stats) of per-rank MoE expert
weights: the torch pass (the pre-kernel implementation, still the ``reference`` execution), the
Triton statistics kernel (one launch per module, through a per-module ``GroupedStats`` as the
runtime keeps one), a few other launch shapes of the same kernel, the grouped QDQ kernel of the
same weights (``mxfp4.GroupedFakeQuantizer``, the hot path) and a device-to-device copy.

    python benchmarks/bench_metrics.py                   # -> benchmarks/results/metrics_<gpu>.md
    python benchmarks/bench_metrics.py --quick           # smoke run: first shape, few repeats

Shapes: ``bench_qdq.SHAPES`` (the six real per-rank shapes). Target (issue 14, item 4): the
statistics kernel costs at most 2x the QDQ kernel on the same weights. Before timing, every kernel
row is checked against the torch pass: counters, histogram and per-expert counts equal, float64
sums within 1e-12 (their summation order differs; docs/metrics.md). GPU times and host times are
measured as in bench_qdq.py (``gpu_ms``: batches of back-to-back calls queued behind a sleep
kernel, between CUDA events; ``host_us``: CPU time to issue one call), inputs rotated so that L2
never holds them; median / IQR / min of the samples. The torch pass launches thousands of small
kernels per call and is host-paced: it is timed one call per sample between CUDA events. Needs a
CUDA GPU.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
from pathlib import Path

from bench_qdq import CALLS_PER_SAMPLE, ROTATE_BYTES, SHAPES, _slug, _stats, gpu_ms, host_us

TARGET_RATIO = 2.0  # statistics kernel time / QDQ kernel time
# other launch shapes of the statistics kernel: (elements per tile, warps, programs per SM)
LAUNCH_VARIANTS = ((4096, 4, 8), (2048, 4, 8), (8192, 8, 4), (4096, 8, 8))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="markdown output (default benchmarks/results/metrics_<gpu>.md)")
    ap.add_argument("--quick", action="store_true", help="smoke run: first shape only, 5 repeats")
    ap.add_argument("--repeats", type=int, default=30, help=f"timed samples per kernel row ({CALLS_PER_SAMPLE} calls each)")
    ap.add_argument("--torch-repeats", type=int, default=3, help="timed samples of the torch pass (1 call each)")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    return ap.parse_args(argv)


def _torch_pass_ms(fn, inputs, samples: int) -> list[float]:
    """GPU-event milliseconds of single calls of the (host-paced) torch pass, after one warm-up."""
    import torch

    fn(inputs[0])
    torch.cuda.synchronize()
    out = []
    for i in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(inputs[i % len(inputs)])
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def _check(got, want) -> str | None:
    """None when the kernel's statistics are the torch pass's (integers equal, sums within 1e-12)."""
    import torch

    for name in ("counts", "scale_hist", "nonfinite_per_expert"):
        if not torch.equal(getattr(got, name).cpu(), getattr(want, name).cpu()):
            return f"{name} differs: {getattr(got, name).tolist()} != {getattr(want, name).tolist()}"
    for i, (g, w) in enumerate(zip(got.sums.tolist(), want.sums.tolist())):
        if not (g == w or abs(g - w) <= 1e-12 * abs(w)):
            return f"sum {i}: {g!r} != {w!r}"
    return None


def bench_shape(shape, dtype, args) -> list[dict]:
    import torch

    from megatron_qat import mxfp4
    from megatron_qat.kernels import triton_stats
    from megatron_qat.metrics import block_stats

    model, layer, e, n, k = shape
    numel = e * n * k
    nbytes = numel * torch.tensor([], dtype=dtype).element_size()
    n_buf = max(2, math.ceil(ROTATE_BYTES / nbytes))
    g = torch.Generator(device="cuda").manual_seed(0)
    stacked = [(torch.randn((e, n, k), device="cuda", generator=g) * 0.02).to(dtype) for _ in range(n_buf)]
    lists = [[w[i].clone() for i in range(e)] for w in stacked]  # separate per-expert allocations
    del stacked
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    want = block_stats.measure(lists[0], 32, impl="reference")

    def per_list(make):
        return [(make(), ws) for ws in lists]  # one per "module", as the runtime keeps them

    impls = {
        "torch pass (before)": ((lambda ws: block_stats.measure(ws, 32, impl="reference")), lists),
        "stats kernel": ((lambda m: m[0](m[1])), per_list(lambda: block_stats.GroupedStats(32, impl="triton"))),
    }
    for elems, warps, per_sm in LAUNCH_VARIANTS:
        def run(m, elems=elems, warps=warps, per_sm=per_sm):
            return triton_stats.module_stats(m[1], 32, tables=m[0], elems_per_tile=elems, num_warps=warps,
                                             programs=per_sm * sms)  # fmt: skip

        impls[f"stats kernel [e={elems},w={warps},p={per_sm}/SM]"] = (run, per_list(triton_stats.StatsTableSlot))
    impls["QDQ grouped (GroupedFakeQuantizer)"] = (
        (lambda m: m[0](m[1])), per_list(lambda: mxfp4.GroupedFakeQuantizer(32, impl="triton")))
    dst = torch.empty(numel, dtype=dtype, device="cuda")
    flat = [torch.cat([w.reshape(-1) for w in ws]) for ws in lists[:2]]
    impls["copy (read + write)"] = ((lambda x: dst.copy_(x)), flat)

    rows = []
    for name, (fn, inputs) in impls.items():
        row = {"model": model, "layer": layer, "shape": f"[{e}, {n}, {k}]", "impl": name, "error": None}
        if name.startswith("stats kernel"):
            out = fn(inputs[0])
            if isinstance(out, tuple):  # module_stats -> (sums, ints): as LocalStats for the check
                sums, ints = out
                c, h = len(block_stats.COUNT_FIELDS), block_stats.SCALE_BINS
                out = block_stats.LocalStats(sums, ints[:c], ints[c : c + h], ints[c + h :], 32, want.expert_ids)
            row["error"] = _check(out, want)
        if row["error"] is not None:
            pass
        elif name.startswith("torch pass"):
            row.update(_stats(_torch_pass_ms(fn, inputs, args.torch_repeats)), host_us=None)
        else:
            row.update(_stats(gpu_ms(fn, inputs, args.repeats)), host_us=host_us(fn, inputs))
        rows.append(row)
    torch.cuda.empty_cache()

    qdq = next((r["median"] for r in rows if r["impl"].startswith("QDQ") and "median" in r), None)
    before = next((r["median"] for r in rows if r["impl"].startswith("torch pass") and "median" in r), None)
    for r in rows:
        if "median" in r:
            moved = 2 * nbytes if r["impl"].startswith(("copy", "QDQ")) else nbytes
            r["gbs"] = moved / (r["median"] * 1e-3) / 1e9
            r["of_qdq"] = r["median"] / qdq if qdq else None
            r["speedup"] = before / r["median"] if before else None
    return rows


def _verdict(r) -> str:
    if r["error"]:
        return "NOT the torch pass's values: " + r["error"]
    if r["impl"] != "stats kernel" or r.get("of_qdq") is None:
        return "checked" if r["impl"].startswith("stats kernel") else "-"
    if r["of_qdq"] <= TARGET_RATIO:
        return f"checked; target <= {TARGET_RATIO:g}x QDQ met"
    return f"checked; target <= {TARGET_RATIO:g}x QDQ MISSED by {r['of_qdq'] / TARGET_RATIO:.2f}x"


def fmt_row(r) -> str:
    head = f"| {r['model']} | {r['layer']} | {r['shape']} | {r['impl']} |"
    if "median" not in r:
        return head + f" - | - | - | - | - | - | - | {_verdict(r)} |"
    of_qdq = f"{r['of_qdq']:.2f}x" if r.get("of_qdq") is not None else "-"
    speed = f"{r['speedup']:.1f}x" if r.get("speedup") is not None else "-"
    host = f"{r['host_us']:.0f}" if r.get("host_us") is not None else "-"
    return head + (f" {r['median']:.3f} | {r['iqr']:.3f} | {r['min']:.3f} | {host} | {r['gbs']:.0f} | "
                   f"{of_qdq} | {speed} | {_verdict(r)} |")  # fmt: skip


def render(rows, args, device_name) -> str:
    import torch
    import triton

    from megatron_qat.kernels import triton_stats

    head = [
        f"# MXFP4 statistics pass benchmark: {device_name}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {device_name} (capability {'.'.join(map(str, torch.cuda.get_device_capability()))}, "
        f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs)",
        f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- dtype {args.dtype}, block size 32, rule flashinfer-mxfp4; weights normal(0, 0.02); kernel rows: "
        f"{args.repeats} samples of {CALLS_PER_SAMPLE} back-to-back calls queued behind a sleep kernel (bench_qdq's "
        f"gpu_ms), torch pass: {args.torch_repeats} samples of 1 host-paced call (CUDA events); median / IQR / min "
        f"per call; inputs rotated over >= {ROTATE_BYTES >> 20} MiB",
        f"- stats kernel default launch: {triton_stats.ELEMS_PER_TILE} elements per tile, {triton_stats.NUM_WARPS} "
        f"warps, {triton_stats.PROGRAMS_PER_SM} programs per SM; GB/s: bytes read (statistics) or read + written "
        "(QDQ, copy) / median; x QDQ: median / the QDQ kernel's median (target <= 2x); host us: CPU time per call",
        "",
        "| model | layer | shape [E, N, K] | impl | median ms | IQR ms | min ms | host us | GB/s | x QDQ | vs before | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + [fmt_row(r) for r in rows]) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_metrics.py needs a CUDA GPU (torch.cuda.is_available() is False); run it on the lent GPU.",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.quick:
        args.repeats, args.torch_repeats = min(args.repeats, 5), 1
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device_name = torch.cuda.get_device_name()
    out = args.out or Path(__file__).parent / "results" / f"metrics_{_slug(device_name)}.md"
    rows = []
    for shape in SHAPES[:1] if args.quick else SHAPES:
        new = bench_shape(shape, dtype, args)
        for r in new:
            print(fmt_row(r), flush=True)
        rows += new
    table = render(rows, args, device_name)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"wrote {out}")
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
