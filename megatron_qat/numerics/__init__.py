"""Quantization numerics, framework-free: the plain-int constants (:mod:`.constants`, importable
without torch), the rules and engine recipes (:mod:`.rules`, torch-free), the formats' torch-typed
maps, bit helpers and input checks (:mod:`.format`), the steps of every rule (:mod:`.rounding`), the
pure-PyTorch reference in the kernels' order (:mod:`.reference`) and the adversarial input families
every test and benchmark draws from (:mod:`.families`).

Bottom layer: imports only torch (:mod:`.constants` imports nothing at all, :mod:`.rules` only the
standard library). The kernels (:mod:`megatron_qat.kernels`) and the op/dispatch layer
(:mod:`megatron_qat.mxfp4`) build on it.
"""
