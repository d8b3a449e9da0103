"""Benchmark MXFP4 fake-quantize of per-rank MoE expert weights: eager reference, torch.compile of
the reference, the Triton kernel (single tensor and grouped list), and a device-to-device copy of
the same bytes (the bandwidth ceiling).

    python benchmarks/bench_qdq.py --out benchmarks/results/qdq_h100.md
    python benchmarks/bench_qdq.py --quick          # smoke run: one shape, few repeats

Every implementation is checked bit for bit against the reference (integer views) BEFORE it is
timed. Times are CUDA-event times of single calls, input buffers rotated so that L2 never holds
the input; the table gives the median, the interquartile range and the minimum of the repeats.
GB/s counts 2 bytes read + 2 bytes written per bf16 element (the fused kernel's physical floor).
Needs a CUDA GPU; docs/kernel.md explains how to read the table.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import re
import statistics
import sys
from pathlib import Path

import torch

# (model, layer, local experts, rows, K): per-rank expert weights [E, N, K] (K = input features).
SHAPES = [
    ("Qwen3-30B-A3B EP=8", "fc1", 16, 1536, 2048),
    ("Qwen3-30B-A3B EP=8", "fc2", 16, 2048, 768),
    ("gpt-oss-120b EP=8", "fc1", 16, 5760, 2880),
    ("gpt-oss-120b EP=8", "fc2", 16, 2880, 2880),
    ("DeepSeek-V3-class EP=32", "fc1", 8, 4096, 7168),
    ("DeepSeek-V3-class EP=32", "fc2", 8, 7168, 2048),
]
IMPLS = ("eager", "compile", "triton", "triton-grouped", "copy")
ROTATE_BYTES = 256 << 20  # rotate through at least this much input (H100/H200 L2 is 50-60 MiB)


def _parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="markdown output (default benchmarks/results/qdq_<gpu>.md)")
    ap.add_argument("--quick", action="store_true", help="smoke run: first shape only, 5 repeats")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per (shape, implementation)")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    ap.add_argument(
        "--sweep", action="store_true", help="also time the Triton kernel at other tile sizes (rows triton[e=..,w=..])"
    )
    return ap.parse_args(argv)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


CALLS_PER_SAMPLE = 10


def _time_calls(fn, inputs, repeats: int, warmup: int = 3) -> list[float]:
    """Milliseconds per call: ``repeats`` samples, each a batch of CALLS_PER_SAMPLE back-to-back
    calls ``fn(inputs[i % len(inputs)])`` between two CUDA events (so the GPU time is measured, not
    the Python launch overhead of one call on an idle GPU)."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    i = warmup
    for start, end in events:
        start.record()
        for _ in range(CALLS_PER_SAMPLE):
            fn(inputs[i % len(inputs)])
            i += 1
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / CALLS_PER_SAMPLE for s, e in events]


def _stats(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median": statistics.median(ms), "iqr": q[2] - q[0], "min": min(ms), "max": max(ms)}


def _check(name, outs, refs) -> str | None:
    from megatron_qat.numerics.families import compare_bits

    for i, (o, r) in enumerate(zip(outs, refs)):
        msg = compare_bits(o, r)
        if msg is not None:
            return f"{name} expert {i}: {msg}"
    return None


def bench_shape(shape, dtype, repeats, use_compile, sweep, compiled_cache) -> list[dict]:
    from megatron_qat import mxfp4
    from megatron_qat.kernels import triton_qdq
    from megatron_qat.numerics.reference import fake_quantize_reference

    model, layer, e, n, k = shape
    numel = e * n * k
    nbytes = numel * torch.tensor([], dtype=dtype).element_size()
    n_buf = max(2, math.ceil(ROTATE_BYTES / nbytes))
    g = torch.Generator(device="cuda").manual_seed(0)
    stacked = [(torch.randn((e, n, k), device="cuda", generator=g) * 0.02).to(dtype) for _ in range(n_buf)]
    lists = [[w[i].clone() for i in range(e)] for w in stacked]  # separate per-expert allocations
    # one GroupedFakeQuantizer per expert list, as the Megatron hook keeps one per module
    modules = [(mxfp4.GroupedFakeQuantizer(32, impl="triton"), ws) for ws in lists]
    dst = torch.empty_like(stacked[0])
    ref = fake_quantize_reference(stacked[0])
    ref_list = list(ref.unbind(0))

    impls = {
        "eager": (fake_quantize_reference, stacked),
        "triton": (triton_qdq.fake_quantize, stacked),
        "triton-grouped": (lambda m: m[0](m[1]), modules),
        "copy": (lambda x: dst.copy_(x), stacked),
    }
    if use_compile:
        if "fn" not in compiled_cache:
            compiled_cache["fn"] = torch.compile(fake_quantize_reference)
        impls = {"eager": impls["eager"], "compile": (compiled_cache["fn"], stacked), **{
            key: v for key, v in impls.items() if key != "eager"}}  # fmt: skip
    if sweep:
        for elems, warps in ((2048, 4), (8192, 4), (8192, 8), (16384, 8)):
            impls[f"triton[e={elems},w={warps}]"] = (
                lambda x, elems=elems, warps=warps: triton_qdq.fake_quantize(x, elems_per_program=elems, num_warps=warps),
                stacked,
            )

    rows = []
    for name, (fn, inputs) in impls.items():
        row = {"model": model, "layer": layer, "shape": f"[{e}, {n}, {k}]", "impl": name, "error": None}
        try:
            if name != "copy":
                out = fn(inputs[0])
                outs = out if isinstance(out, list) else list(out.unbind(0))
                row["error"] = _check(name, outs, ref_list)
            if row["error"] is None or name == "compile":  # compile: timed, but flagged not bit-exact
                row.update(_stats(_time_calls(fn, inputs, repeats)))
        except Exception as exc:  # recorded in the table (e.g. torch.compile failing), never hidden
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        rows.append(row)
        torch.cuda.empty_cache()

    copy_ms = next((r["median"] for r in rows if r["impl"] == "copy" and "median" in r), None)
    eager_ms = next((r["median"] for r in rows if r["impl"] == "eager" and "median" in r), None)
    for r in rows:
        if "median" in r:
            r["gbs"] = 2 * nbytes / (r["median"] * 1e-3) / 1e9
            r["of_copy"] = copy_ms / r["median"] * 100 if copy_ms else None
            r["speedup"] = eager_ms / r["median"] if eager_ms else None
    return rows


def _fmt_row(r) -> str:
    if "median" not in r:
        return f"| {r['model']} | {r['layer']} | {r['shape']} | {r['impl']} | - | - | - | - | - | - | {r['error']} |"
    of_copy = f"{r['of_copy']:.1f}% of copy" if r.get("of_copy") is not None else "-"
    speed = f"{r['speedup']:.1f}x" if r.get("speedup") is not None else "-"
    return (
        f"| {r['model']} | {r['layer']} | {r['shape']} | {r['impl']} | {r['median']:.3f} | {r['iqr']:.3f} | "
        f"{r['min']:.3f} | {r['gbs']:.0f} | {of_copy} | {speed} | {'NOT bit-exact: ' + r['error'] if r['error'] else 'bit-exact'} |"
        if r["impl"] != "copy"
        else f"| {r['model']} | {r['layer']} | {r['shape']} | copy | {r['median']:.3f} | {r['iqr']:.3f} | "
        f"{r['min']:.3f} | {r['gbs']:.0f} | 100.0% of copy | {speed} | (ceiling) |"
    )


def render(rows, args, device_name) -> str:
    import triton

    head = [
        f"# MXFP4 fake-quantize benchmark: {device_name}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {device_name} (capability {'.'.join(map(str, torch.cuda.get_device_capability()))})",
        f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- dtype {args.dtype}; per row {args.repeats} samples of {CALLS_PER_SAMPLE} back-to-back calls (CUDA events), "
        f"median / IQR / min of the per-call time; inputs rotated over >= "
        f"{ROTATE_BYTES >> 20} MiB; GB/s = (2 B read + 2 B written) x elements / median time",
        "",
        "| model | layer | shape [E, N, K] | impl | median ms | IQR ms | min ms | GB/s | vs copy | vs eager | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + [_fmt_row(r) for r in rows]) + "\n"


def main(argv=None) -> int:
    args = _parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_qdq.py needs a CUDA GPU (torch.cuda.is_available() is False); run it on the lent GPU.",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.quick:
        args.repeats = min(args.repeats, 5)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device_name = torch.cuda.get_device_name()
    out = args.out or Path(__file__).parent / "results" / f"qdq_{_slug(device_name)}.md"
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows, compiled = [], {}
    for shape in shapes:
        new_rows = bench_shape(shape, dtype, args.repeats, not args.no_compile, args.sweep, compiled)
        for r in new_rows:
            print(_fmt_row(r), flush=True)
        rows += new_rows
    table = render(rows, args, device_name)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"wrote {out}")
    return 1 if any(r["error"] and r["impl"] != "compile" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
