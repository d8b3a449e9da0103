"""MXFP4 numerics, framework-free: the plain-int constants (:mod:`.constants`, importable without
torch), the format's torch-typed maps, bit helpers and input checks (:mod:`.format`), the
pure-PyTorch reference of FlashInfer's quantizer in the kernel's order (:mod:`.reference`) and the
adversarial input families every test and benchmark draws from (:mod:`.families`).

Bottom layer: imports only torch (:mod:`.constants` imports nothing at all). The kernels
(:mod:`megatron_qat.kernels`) and the op/dispatch layer (:mod:`megatron_qat.mxfp4`) build on it.
"""
