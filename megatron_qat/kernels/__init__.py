"""Fused kernels for the MXFP4 numerics of :mod:`megatron_qat.mxfp4`.

- :mod:`megatron_qat.kernels.triton_qdq` Triton quantize / fake-quantize (single tensor and
  grouped lists of expert weights), bit-exact with :mod:`megatron_qat.numerics.reference`.

Importing this package imports nothing heavy; Triton loads when ``triton_qdq`` is imported
(:func:`megatron_qat.mxfp4.dispatch.resolve_impl` decides when that happens).
"""
