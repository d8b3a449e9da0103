"""The env-gated Transformer Engine / Megatron-Core patch (routed MoE experts only).

Four modules, one job each:

- :mod:`.install` ``enable`` / ``disable`` / ``is_enabled`` / ``enable_from_env`` /
  ``invalidate_cache``, the one process handle (:func:`current`) and the zero-code autoload;
- :mod:`.runtime` the :class:`~.runtime.Runtime` (created by ``enable()``, closed by ``disable()``):
  the installed wrappers, the step hooks, the guards;
- :mod:`.cache` one module's fake-quantized weights: the per-step cache and the straight-through
  protocol to ``main_grad``;
- :mod:`.failclosed` locating ``TEGroupedLinear`` with version checks, and
  :class:`FakeQATUnavailableError` (a ``RuntimeError``, never an ``ImportError``).

Importing this package imports neither torch nor Megatron: they load inside :func:`enable`.
"""

from .failclosed import FakeQATUnavailableError
from .install import current, disable, enable, enable_from_env, invalidate_cache, is_enabled

__all__ = ["enable", "disable", "is_enabled", "enable_from_env", "invalidate_cache", "current", "FakeQATUnavailableError"]
