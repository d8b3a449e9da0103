"""Profile target for Nsight Compute: the Triton fake-quant kernel at two real shapes.

    ncu --clock-control none --kernel-name regex:qdq --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \\
        python benchmarks/profile_qdq.py

Launch order: 2 warm-up calls, then Qwen3-30B-A3B fc2 [16, 2048, 768] and gpt-oss-120b fc2
[16, 2880, 2880] (EP=8 per-rank shapes, bf16), one call each.
"""

import torch

from megatron_qat.kernels import triton_qdq

SHAPES = ((16, 2048, 768), (16, 2880, 2880))

if __name__ == "__main__":
    xs = [(torch.randn(s, device="cuda") * 0.02).to(torch.bfloat16) for s in SHAPES]
    for x in xs:  # warm-up: compile both specialisations
        triton_qdq.fake_quantize(x)
    for x in xs:
        triton_qdq.fake_quantize(x)
    torch.cuda.synchronize()
