"""megatron-qat: MXFP4 fake-QAT for Megatron-Core MoE experts, bit-exact with FlashInfer.

Layout (each layer depends only on those before it):

- :mod:`megatron_qat.numerics` framework-free reference numerics and format constants
- :mod:`megatron_qat.kernels` fused Triton kernel
- :mod:`megatron_qat.mxfp4` the op layer (dispatch between reference and kernel, STE)
- :mod:`megatron_qat.megatron` the env-gated Transformer Engine / Megatron-Core patch (with the
  per-step weight cache), :mod:`megatron_qat.metrics` per-layer MXFP4 statistics,
  :mod:`megatron_qat.export` MXFP4 weight export, :mod:`megatron_qat.layouts` checkpoint layouts
- :mod:`megatron_qat.parity` and :mod:`megatron_qat.cli` the command line

:class:`FakeQATUnavailableError` (a ``RuntimeError``) is what a requested but inapplicable
fake-QAT raises.

Importing this package is cheap: torch and the frameworks load only when a submodule needs them.
"""

__version__ = "0.1.0"


def enable(block_size=None, recipe=None):
    """Turn MXFP4 fake-QAT on for Megatron's TEGroupedLinear (see :func:`megatron_qat.megatron.enable`);
    ``recipe`` names the engine configuration to train against (docs/engines.md)."""
    from .megatron import enable as _enable

    return _enable(block_size, recipe)


def disable():
    """Undo :func:`enable` exactly (see :func:`megatron_qat.megatron.disable`)."""
    from .megatron import disable as _disable

    return _disable()


def is_enabled():
    """Whether the TEGroupedLinear weight hook is currently wrapped."""
    from .megatron import is_enabled as _is_enabled

    return _is_enabled()


def enable_from_env(environ=None):
    """Enable when ``OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG=1`` (see :func:`megatron_qat.megatron.enable_from_env`)."""
    from .megatron import enable_from_env as _enable_from_env

    return _enable_from_env(environ)


def invalidate_cache():
    """Forget every cached fake-quantized expert weight copy: call it after changing expert weights
    in a way the cache cannot see (a write through ``param.data`` or another tensor sharing the
    storage, outside an optimizer step; docs/usage.md, "Cache contract")."""
    from .megatron import invalidate_cache as _invalidate_cache

    return _invalidate_cache()


def __getattr__(name):
    if name == "FakeQATUnavailableError":  # torch-free, but loaded only when asked for
        from .megatron.failclosed import FakeQATUnavailableError

        return FakeQATUnavailableError
    raise AttributeError(f"module 'megatron_qat' has no attribute {name!r}")
