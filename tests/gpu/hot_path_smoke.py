"""Seconds-long GPU smoke of the hot path's Triton launches, run first on a lent GPU (before staging
Transformer Engine): the prepared grouped weight launch (``mxfp4.GroupedFakeQuantizer``) and the
per-module activation launch (``mxfp4.ActivationFakeQuantizer``) equal the PyTorch reference bit for
bit on the first (preparing) and later (prepared, compiled-handle) calls, after an in-place update
of the weights, under every rule; prints the host microseconds per prepared call. Exit 0 = all equal.

    python tests/gpu/hot_path_smoke.py
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from megatron_qat import mxfp4
from megatron_qat.numerics.families import compare_bits
from megatron_qat.numerics.reference import fake_quantize_reference


def _host_us(fn, calls=200) -> float:
    samples = []
    for _ in range(5):
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # the GPU is busy: only the host side is timed
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter_ns() - t0) / calls / 1e3)
        torch.cuda.synchronize()
    return statistics.median(samples)


def main() -> int:
    if not torch.cuda.is_available():
        print("hot_path_smoke.py needs a CUDA GPU", file=sys.stderr)
        return 2
    failures = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = [(torch.randn(1536, 2048, device="cuda", generator=gen) * 0.02).to(torch.bfloat16) for _ in range(16)]
    x = (torch.randn(4096, 2048, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    for rule in mxfp4.RULES.values():
        if rule.element.name == "E2M1":
            q = mxfp4.GroupedFakeQuantizer(32, rule=rule)
            for call in range(3):
                if call == 2:
                    with torch.no_grad():
                        for w in weights:
                            w.mul_(1.5)  # in place: same pointers, the prepared launch must read the new values
                outs = q(weights)
                for i, (o, w) in enumerate(zip(outs, weights)):
                    msg = compare_bits(o, fake_quantize_reference(w, rule=rule))
                    if msg:
                        failures.append(f"grouped {rule.name} call {call} expert {i}: {msg}")
            fast = q._prepared is not None and q._prepared.fast is not None
            print(f"grouped {rule.name}: prepared compiled launch {'used' if fast else 'NOT used'}; "
                  f"host {_host_us(lambda: q(weights)):.1f} us per call (16 x [1536, 2048])", flush=True)
            if not fast:
                failures.append(f"grouped {rule.name}: the prepared compiled launch was not used")
        a = mxfp4.ActivationFakeQuantizer(rule)
        for call in range(2):
            msg = compare_bits(a(x), fake_quantize_reference(x, rule=rule))
            if msg:
                failures.append(f"activation {rule.name} call {call}: {msg}")
        print(f"activation {rule.name}: {len(a.launches.handles)} compiled handle(s); host "
              f"{_host_us(lambda: a(x)):.1f} us per call ([4096, 2048])", flush=True)
    for line in failures:
        print("FAIL", line)
    print("SMOKE", "FAIL" if failures else "PASS")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
