"""The plain-integer facts of the MXFP4 rule, defined once and importable without torch.

This module imports nothing, so that ``megatron_qat.config`` (read at interpreter start, torch-free)
and the Triton device code (``megatron_qat.kernels.qdq_jit``, which wraps them as ``tl.constexpr``)
share the values below with the PyTorch side; :mod:`megatron_qat.numerics.format` re-exports them
next to the torch-typed maps derived from them.
"""

# Elements per E8M0 scale: FlashInfer ``fp4_quantize(sf_vec_size=32, sf_use_ue8m0=True)`` and OCP MX.
DEFAULT_BLOCK_SIZE = 32

# float32 bits of rcp.approx.ftz.f32(6.0) on sm_90 (measured; equal to the correctly rounded 1/6).
RCP_SIX_BITS = 0x3E2AAAAB

# E8M0 scale byte bias (scale = 2 ** (byte - 127)) and its NaN byte.
E8M0_BIAS = 127
E8M0_NAN = 255

# The quiet NaN fake_quantize writes for every element of a non-finite block, per dtype, whatever
# the device (PyTorch's own float32 -> bf16/fp16 NaN conversion differs between CPU and CUDA).
NAN_BITS_BF16 = 0x7FC0
NAN_BITS_FP16 = 0x7E00
NAN_BITS_FP32 = 0x7FC00000

# float32 bits of RN(1/448) (= fp32(1.0 / 448.0), FlashInfer's INV_FLOAT8_E4M3_MAX constant, a
# Python double rounded to float32 when the CuTe-DSL kernel is built); 448 * RN(1/448) rounds to 1.0.
RCP_448_BITS = 0x3B124925

# Largest finite element magnitude of each element format (E2M1: 6.0; E4M3 "fn": 448.0).
E2M1_MAX = 6
E4M3_MAX = 448

# vLLM online MXFP4 ("EVEN" scale): this is added to the float32 bits of the block amax before the
# exponent is kept, i.e. a mantissa of 1.75 or more rounds the amax up to the next power of two.
EVEN_ROUND_BITS = 0x200000
