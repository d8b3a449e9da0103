"""Benchmark fake-quantization on the GPU: per-rank MoE expert weights (every weight rule) and
per-micro-batch expert activations (the MXFP8 and MXFP4 activation rules), against a
device-to-device copy of the same bytes (the bandwidth ceiling).

    python benchmarks/bench_qdq.py --out benchmarks/results/qdq_h100.md
    python benchmarks/bench_qdq.py --quick          # smoke run: one weight and one activation shape

Weight implementations (FLASHINFER_MXFP4 unless the row names another rule): ``eager`` (reference),
``compile`` (torch.compile of the reference), ``triton`` (stacked tensor), ``triton-grouped`` (list
of separately allocated expert weights through one warmed-up ``GroupedFakeQuantizer``, the hook's
path: prepared launch), ``triton-grouped-graph`` (the alternative: the quantizer's launch captured
once in a CUDA graph and replayed; the outputs are then the graph's fixed buffers), ``copy``.
Activation implementations: ``activation`` (``mxfp4.ActivationFakeQuantizer``, prepared launch) and
``copy``.

Every implementation is checked bit for bit against the reference (integer views) BEFORE it is
timed. Two separate measurements per row:

- **GPU ms**: CUDA-event time of batches of back-to-back calls enqueued behind a long
  ``torch.cuda._sleep`` kernel, so the GPU never waits for the host and the events time GPU work
  only; inputs rotated so that L2 never holds them; median / IQR / min over the samples.
- **host us/call**: ``time.perf_counter`` around single calls (no synchronisation; the GPU is kept
  busy by a sleep kernel so the launch queue never blocks), median over the calls.

GB/s counts 2 bytes read + 2 bytes written per bf16 element. Needs a CUDA GPU; docs/kernel.md
explains the columns and targets.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import re
import statistics
import sys
import time
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
# (what, tokens, K): expert-GEMM inputs of one micro-batch: fc1 inputs (tokens x hidden) and fc2
# inputs (tokens x moe_ffn).
ACTIVATION_SHAPES = [
    ("Qwen3-30B-A3B fc1 input", 4096, 2048),
    ("gpt-oss-120b fc1 input", 4096, 2880),
    ("Qwen3-30B-A3B fc2 input", 4096, 768),
    ("gpt-oss-120b fc2 input", 4096, 2880),
    ("DeepSeek-V3-class fc2 input", 4096, 2048),
]
WEIGHT_RULES_GROUPED = ("vllm-online-mxfp4", "ties-down-mxfp4")  # extra triton-grouped rows
ACTIVATION_RULES = ("flashinfer-mxfp8", "vllm-online-mxfp4", "flashinfer-mxfp4")  # W4A8, vLLM W4A4, FlashInfer MXFP4
ROTATE_BYTES = 256 << 20  # rotate through at least this much input (H100/H200 L2 is 50-60 MiB)
CALLS_PER_SAMPLE = 10
SLEEP_CYCLES = 20_000_000  # ~10 ms at 2 GHz: longer than the host needs to enqueue one batch
HOST_CALLS = 200
TARGETS = {"weights": (90.0, None), "activation": (80.0, 20.0)}  # (% of copy, host us per call)


def _parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="markdown output (default benchmarks/results/qdq_<gpu>.md)")
    ap.add_argument("--quick", action="store_true", help="smoke run: first weight and activation shape, 5 repeats")
    ap.add_argument("--repeats", type=int, default=30, help="timed samples per row")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    return ap.parse_args(argv)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def gpu_ms(fn, inputs, repeats: int) -> list[float]:
    """Milliseconds of GPU time per call: each sample is CALLS_PER_SAMPLE calls enqueued behind a
    sleep kernel, between two CUDA events (the host finishes enqueueing before the GPU gets there)."""
    for i in range(max(3, len(inputs))):  # every input once: first calls prepare (validate, table, compile)
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    samples, i = [], 0
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_CYCLES)
        start.record()
        for _ in range(CALLS_PER_SAMPLE):
            fn(inputs[i % len(inputs)])
            i += 1
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / CALLS_PER_SAMPLE)
    return samples


def host_us(fn, inputs, calls: int = HOST_CALLS) -> float:
    """Median host microseconds of one call, no synchronisation (a sleep kernel keeps the GPU busy
    so the launch queue never blocks the host)."""
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES * 4)
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        fn(inputs[i % len(inputs)])
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def _stats(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median": statistics.median(ms), "iqr": q[2] - q[0], "min": min(ms)}


def _check(name, outs, refs) -> str | None:
    from megatron_qat.numerics.families import compare_bits

    for i, (o, r) in enumerate(zip(outs, refs)):
        msg = compare_bits(o, r)
        if msg is not None:
            return f"{name} tensor {i}: {msg}"
    return None


def _graph_replay(quantizer, ws):
    """The CUDA-graph alternative: warm the quantizer up, capture one call, return a function that
    replays the graph and hands out the captured outputs (fixed buffers)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        quantizer(ws)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = quantizer(ws)

    def replay(_unused=None):
        graph.replay()
        return outs

    replay.keep_alive = quantizer  # the graph reads the quantizer's pointer table: it must outlive the graph
    return replay


def _row(kind, model, layer, shape, rule, impl, nbytes):
    return {"kind": kind, "model": model, "layer": layer, "shape": shape, "rule": rule, "impl": impl,
            "nbytes": nbytes, "error": None}  # fmt: skip


def _time_row(row, fn, inputs, outs_fn, refs, repeats, timed_even_if_wrong=False):
    try:
        if outs_fn is not None:
            row["error"] = _check(row["impl"], outs_fn(fn(inputs[0])), refs)
        if row["error"] is None or timed_even_if_wrong:
            row.update(_stats(gpu_ms(fn, inputs, repeats)))
            slow = row["impl"] in ("eager", "compile")  # host-bound references: fewer host samples
            row["host_us"] = host_us(fn, inputs, calls=20 if slow else HOST_CALLS)
    except Exception as exc:  # recorded in the table (e.g. torch.compile failing), never hidden
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    torch.cuda.empty_cache()
    return row


def bench_weights(shape, dtype, repeats, use_compile, compiled_cache) -> list[dict]:
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
    dst = torch.empty_like(stacked[0])
    shape_s = f"[{e}, {n}, {k}]"
    rows = []

    def unbind(out):
        return out if isinstance(out, (list, tuple)) else list(out.unbind(0))

    for rule_name in ("flashinfer-mxfp4",) + WEIGHT_RULES_GROUPED:
        rule = mxfp4.RULES[rule_name]
        refs = list(fake_quantize_reference(stacked[0], rule=rule).unbind(0))
        impls = {}
        if rule_name == "flashinfer-mxfp4":
            impls["eager"] = (fake_quantize_reference, stacked)
            if use_compile:
                compiled_cache.setdefault("fn", torch.compile(fake_quantize_reference))
                impls["compile"] = (compiled_cache["fn"], stacked)
            impls["triton"] = (triton_qdq.fake_quantize, stacked)
        # one GroupedFakeQuantizer per expert list, as the Megatron hook keeps one per module
        quantizers = [mxfp4.GroupedFakeQuantizer(32, impl="triton", rule=rule) for _ in lists]
        impls["triton-grouped"] = (lambda i_ws: i_ws[0](i_ws[1]), list(zip(quantizers, lists)))
        if rule_name == "flashinfer-mxfp4":
            graphs = [_graph_replay(mxfp4.GroupedFakeQuantizer(32, impl="triton"), ws) for ws in lists]
            impls["triton-grouped-graph"] = (lambda replay: replay(), graphs)
            impls["copy"] = (lambda x: dst.copy_(x), stacked)
        for name, (fn, inputs) in impls.items():
            row = _row("weights", model, layer, shape_s, rule_name, name, nbytes)
            check = None if name == "copy" else unbind
            rows.append(_time_row(row, fn, inputs, check, refs, repeats, timed_even_if_wrong=name == "compile"))
    del stacked, lists
    _ratios(rows)
    return rows


def bench_activation(shape, dtype, repeats) -> list[dict]:
    from megatron_qat import mxfp4
    from megatron_qat.numerics.reference import fake_quantize_reference

    what, tokens, k = shape
    nbytes = tokens * k * torch.tensor([], dtype=dtype).element_size()
    n_buf = max(2, math.ceil(ROTATE_BYTES / nbytes))
    g = torch.Generator(device="cuda").manual_seed(1)
    xs = [torch.randn((tokens, k), device="cuda", generator=g).to(dtype) for _ in range(n_buf)]
    dst = torch.empty_like(xs[0])
    rows = []
    for rule_name in ACTIVATION_RULES:
        rule = mxfp4.RULES[rule_name]
        ref = [fake_quantize_reference(xs[0], rule=rule)]
        row = _row("activation", what, "-", f"[{tokens}, {k}]", rule_name, "activation", nbytes)
        quantizer = mxfp4.ActivationFakeQuantizer(rule)  # what the runtime keeps per module (prepared launches)
        rows.append(_time_row(row, quantizer, xs, lambda o: [o], ref, repeats))
    rows.append(_time_row(_row("activation", what, "-", f"[{tokens}, {k}]", "-", "copy", nbytes),
                          lambda x: dst.copy_(x), xs, None, None, repeats))  # fmt: skip
    _ratios(rows)
    return rows


def _ratios(rows):
    copy_ms = next((r["median"] for r in rows if r["impl"] == "copy" and "median" in r), None)
    eager_ms = next((r["median"] for r in rows if r["impl"] == "eager" and "median" in r), None)
    for r in rows:
        if "median" in r:
            r["gbs"] = 2 * r["nbytes"] / (r["median"] * 1e-3) / 1e9
            r["of_copy"] = copy_ms / r["median"] * 100 if copy_ms else None
            r["speedup"] = eager_ms / r["median"] if eager_ms else None


def _fmt_row(r) -> str:
    head = f"| {r['model']} | {r['layer']} | {r['shape']} | {r['rule']} | {r['impl']} |"
    if "median" not in r:
        return f"{head} - | - | - | - | - | - | - | {r['error']} |"
    of_copy = f"{r['of_copy']:.1f}%" if r.get("of_copy") is not None else "-"
    speed = f"{r['speedup']:.1f}x" if r.get("speedup") is not None else "-"
    check = "(ceiling)" if r["impl"] == "copy" else ("NOT bit-exact: " + r["error"] if r["error"] else "bit-exact")
    return (f"{head} {r['median']:.4f} | {r['iqr']:.4f} | {r['min']:.4f} | {r['gbs']:.0f} | {of_copy} | {speed} | "
            f"{r['host_us']:.1f} | {check} |")  # fmt: skip


def _verdicts(rows) -> list[str]:
    lines = []
    for r in rows:
        if r["impl"] not in ("triton-grouped", "activation") or "median" not in r:
            continue
        pct, host = TARGETS["weights" if r["kind"] == "weights" else "activation"]
        misses = []
        if r.get("of_copy") is not None and r["of_copy"] < pct:
            misses.append(f"{r['of_copy']:.1f}% of copy < {pct:.0f}%")
        if host is not None and r["host_us"] > host:
            misses.append(f"host {r['host_us']:.1f} us > {host:.0f} us")
        verdict = "met" if not misses else "MISSED: " + "; ".join(misses)
        lines.append(f"- {r['model']} {r['layer']} {r['shape']} {r['rule']} {r['impl']}: {verdict}")
    return lines


def render(rows, args, device_name) -> str:
    import triton

    head = [
        f"# Fake-quantize benchmark: {device_name}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {device_name} (capability {'.'.join(map(str, torch.cuda.get_device_capability()))})",
        f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- dtype {args.dtype}; GPU ms: {args.repeats} samples of {CALLS_PER_SAMPLE} calls enqueued behind a "
        f"torch.cuda._sleep({SLEEP_CYCLES}) (GPU time only), median / IQR / min per call; inputs rotated over >= "
        f"{ROTATE_BYTES >> 20} MiB; GB/s = (2 B read + 2 B written) x elements / median; host us/call: median "
        f"of {HOST_CALLS} single calls timed with perf_counter, no synchronisation",
        "- targets: triton-grouped >= 90% of copy (GPU time); activation >= 80% of copy and <= 20 us host per call",
        "",
        "| model | layer | shape | rule | impl | GPU median ms | IQR ms | min ms | GB/s | vs copy | vs eager | host us/call | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + [_fmt_row(r) for r in rows] + ["", "## Targets", ""] + _verdicts(rows)) + "\n"


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
    rows, compiled = [], {}
    for shape in SHAPES[:1] if args.quick else SHAPES:
        new = bench_weights(shape, dtype, args.repeats, not args.no_compile and not args.quick, compiled)
        for r in new:
            print(_fmt_row(r), flush=True)
        rows += new
    for shape in ACTIVATION_SHAPES[:1] if args.quick else ACTIVATION_SHAPES:
        new = bench_activation(shape, dtype, args.repeats)
        for r in new:
            print(_fmt_row(r), flush=True)
        rows += new
    table = render(rows, args, device_name)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"wrote {out}")
    return 1 if any(r["error"] and r["impl"] != "compile" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
