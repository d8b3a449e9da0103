"""The env-gated Transformer Engine / Megatron-Core patch (routed MoE experts only).

Public entry points (re-exported lazily by :mod:`megatron_qat`):

- :func:`enable` wrap ``TEGroupedLinear._get_weight_tensors`` so every expert weight is
  MXFP4 fake-quantized (straight-through gradient) and guard ``MoELayer`` construction;
- :func:`disable` restore exactly what was there (a foreign wrapper put on top is left in place);
- :func:`is_enabled`;
- :func:`enable_from_env` read ``OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG`` and enable when it is ``"1"``;
  a failure is then sticky (no MoE layer build, no optimizer step: :mod:`.failclosed`);
- :func:`invalidate_cache` forget the per-step cached fake-quantized weights (:mod:`.weight_cache`);
- :class:`FakeQATUnavailableError` what a requested but inapplicable fake-QAT raises (a
  ``RuntimeError``, never an ``ImportError``).

Importing this package imports neither torch nor Megatron: they load inside :func:`enable`.
"""

from .failclosed import FakeQATUnavailableError
from .patch import disable, enable, enable_from_env, is_enabled


def invalidate_cache() -> None:
    """:func:`megatron_qat.megatron.weight_cache.invalidate_cache` (imported lazily: it loads torch)."""
    from .weight_cache import invalidate_cache as _invalidate_cache

    _invalidate_cache()


__all__ = ["enable", "disable", "is_enabled", "enable_from_env", "invalidate_cache", "FakeQATUnavailableError"]
