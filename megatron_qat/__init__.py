"""megatron-qat: MXFP4 fake-QAT for Megatron-Core MoE experts, bit-exact with FlashInfer.

Layout (each layer depends only on those before it):

- :mod:`megatron_qat.mxfp4` numerics (framework-free reference, formats, STE)
- :mod:`megatron_qat.kernels` fused Triton kernel
- :mod:`megatron_qat.megatron` the env-gated Transformer Engine / Megatron-Core patch
- :mod:`megatron_qat.parity` the parity checker CLI

Importing this package is cheap: torch and the frameworks load only when a submodule needs them.
"""

__version__ = "0.1.0"
