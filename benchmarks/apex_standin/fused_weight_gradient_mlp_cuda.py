"""Stand-in for Apex's ``fused_weight_gradient_mlp_cuda`` extension, for benchmarks only.

megatron-core's non-TE ``ColumnParallelLinear`` (GPTModel's output layer) refuses
``gradient_accumulation_fusion=True`` unless this module imports; the lent GPU image has no Apex.
With this directory on ``sys.path`` (``benchmarks/_gpu_env.py`` puts it there only when the real
module is missing) GPTModel trains with fusion on. Transformer Engine's own layers (the expert
GEMMs under test) never call it.

Contract mimicked (Apex ``csrc/megatron/fused_weight_gradient_dense.cpp``, as megatron-core 0.19.2
``tensor_parallel/layers.py::LinearWithGradAccumulationAndAsyncCommunication.backward`` calls it):
``wgrad_gemm_accum_fp32(total_input [T, in], grad_output [T, out], main_grad fp32 [out, in])`` does
``main_grad += grad_output^T @ total_input`` accumulated in fp32; ``wgrad_gemm_accum_fp16`` the same
into a 16-bit ``main_grad``. Here the product is one fp32-output GEMM where torch has
``mm(out_dtype=)``, else the 16-bit GEMM whose product is rounded to 16 bits once before the fp32 add
(slightly less exact than Apex; an fp32 GEMM of the output layer would dominate the step time).
"""

import torch


def _product(total_input: torch.Tensor, grad_output: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    a, b = grad_output.t(), total_input
    try:
        return torch.mm(a, b, out_dtype=dtype)
    except (TypeError, RuntimeError):  # torch without mm(out_dtype=...): the 16-bit GEMM (fp32 accumulation
        return torch.mm(a, b).to(dtype)  # inside, the product rounded to 16 bits once), fast on tensor cores


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    main_grad.add_(_product(total_input, grad_output, torch.float32))


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    main_grad.add_(_product(total_input, grad_output, torch.float32).to(main_grad.dtype))
