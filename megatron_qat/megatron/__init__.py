"""The env-gated Transformer Engine / Megatron-Core patch (routed MoE experts only).

Public entry points (re-exported lazily by :mod:`megatron_qat`):

- :func:`enable` wrap ``TEGroupedLinear._get_weight_tensors`` so every expert weight is
  MXFP4 fake-quantized (straight-through gradient) and guard ``MoELayer`` construction;
- :func:`disable` restore exactly what was there;
- :func:`is_enabled`;
- :func:`enable_from_env` read ``OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG`` and enable when it is ``"1"``.

Importing this package imports neither torch nor Megatron: they load inside :func:`enable`.
"""

from .patch import disable, enable, enable_from_env, is_enabled

__all__ = ["enable", "disable", "is_enabled", "enable_from_env"]
