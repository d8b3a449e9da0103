"""Run megatron-core's MoELayer, DDP, distributed optimizer and schedule on CPU (gloo), with a
Transformer Engine STAND-IN for ``TEGroupedLinear``: what tests/gpu/ep2_training.py needs for its
``--backend gloo`` mode (the CI variant of the EP=2 training check, issue 19).

Transformer Engine cannot be installed on CPU, so megatron-core's
``megatron.core.extensions.transformer_engine.TEGroupedLinear`` (``None`` without TE) and its
column/row subclasses are replaced by :class:`TEGroupedLinear` / :class:`TEColumnParallelGroupedLinear`
/ :class:`TERowParallelGroupedLinear` below: megatron-core 0.16.1 ``TEGroupedLinear.__init__``
semantics (expert-TP division of fc1 rows / fc2 columns under explicit expert comm,
``fuse_wgrad_accumulation = config.gradient_accumulation_fusion``, ``allreduce = not (is_expert and
EP > 1)`` on every parameter, which is how megatron DDP files expert parameters into the
expert-data-parallel buffers) and its ``forward(x, m_splits) -> (out, None)`` over TE's
``forward(inp, m_splits, is_first_microbatch)`` (tests/te_standin.py: the TE 2.20.2 BF16 protocol,
fused wgrad included).

megatron-core hard-codes the CUDA device in a few places on the path of this check; :func:`install`
replaces each, in this process only (the check's worker processes are its own):

- ``torch.cuda.current_device()`` (param/grad buffers of DDP and the distributed optimizer, the
  router's weight move) gives the CPU device;
- ``device="cuda"`` literals in ``megatron.core.optimizer.optimizer`` (``_scale_one``),
  ``megatron.core.optimizer.clip_grads`` and ``megatron.core.utils`` (the grad-norm buffers) and
  ``megatron.core.pipeline_parallel.schedules`` (``total_num_tokens``) are made on the CPU, and
  ``megatron.core.distributed.param_and_grad_buffer``'s ``torch.cuda.current_stream()`` (0.19.2
  waits on CUDA-graph wgrad events there) is a stream with nothing to wait for;
- ``DistributedOptimizer._build_model_and_main_param_groups`` files parameters by
  ``param.type() in ('torch.cuda.BFloat16Tensor', ...)``: while it runs, a CPU tensor's ``type()``
  answers with the CUDA type name of its dtype (:func:`cuda_type_names`);
- ``megatron.core.transformer.moe.moe_utils`` reads ``te_general_gemm`` in the router's GEMM but
  defines it only when TE imports (megatron-core 0.16.1 raises NameError without TE): it is set to
  ``None``, which selects megatron's own torch GEMM, as the module intends.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from te_standin import StandInGroupedLinear  # noqa: E402


def _pg_size(group) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group)


class TEGroupedLinear(StandInGroupedLinear):
    """megatron-core 0.16.1 ``TEGroupedLinear`` over the TE stand-in (see the module docstring);
    also takes 0.19.2's ``name`` (the quantization-recipe lookup key, unused without a recipe)."""

    def __init__(self, num_gemms, input_size, output_size, *, parallel_mode, config, init_method, bias,
                 skip_bias_add, is_expert=False, tp_comm_buffer_name=None, pg_collection=None, name=None):
        assert is_expert, "TEGroupedLinear only supports expert parallelism"
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        tp_size = _pg_size(pg_collection.expt_tp)
        expert_parallel = config.expert_model_parallel_size > 1
        if tp_size > 1 or expert_parallel:  # explicit_expert_comm
            if parallel_mode == "column":
                output_size //= tp_size
            elif parallel_mode == "row":
                input_size //= tp_size
        super().__init__(num_gemms, input_size, output_size, dtype=config.params_dtype,
                         fuse_wgrad_accumulation=config.gradient_accumulation_fusion)
        self.config = config
        self.expert_parallel = expert_parallel
        self.disable_parameter_transpose_cache = config.disable_parameter_transpose_cache
        if bias:
            for i in range(num_gemms):
                self.register_parameter(f"bias{i}", torch.nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype)))
        for param in self.parameters():
            param.allreduce = not (is_expert and expert_parallel)

    def forward(self, x, m_splits):
        """megatron-core ``TEGroupedLinear.forward``: the flag is None under
        ``disable_parameter_transpose_cache``, else the module flag, set False after every call."""
        flag = None if self.disable_parameter_transpose_cache else self.is_first_microbatch
        out = StandInGroupedLinear.forward(self, x, m_splits, is_first_microbatch=flag)
        self.is_first_microbatch = False
        return out, None


class TEColumnParallelGroupedLinear(TEGroupedLinear):
    def __init__(self, num_gemms, input_size, output_size, **kwargs):
        super().__init__(num_gemms, input_size, output_size, parallel_mode="column", **kwargs)


class TERowParallelGroupedLinear(TEGroupedLinear):
    def __init__(self, num_gemms, input_size, output_size, **kwargs):
        super().__init__(num_gemms, input_size, output_size, parallel_mode="row", **kwargs)


class _NullStream:
    """The current "CUDA stream" of a CPU process: work is synchronous, there is nothing to wait for."""

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass


class _CpuCuda:
    """``torch.cuda`` as a megatron module sees it: the current stream is a :class:`_NullStream`."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_stream(device=None):
        return _NullStream()


class _CpuTorch:
    """``torch`` as a megatron module sees it, except that ``device="cuda"`` allocations are CPU ones
    and ``torch.cuda.current_stream()`` is a :class:`_NullStream`."""

    _ALLOCATORS = ("zeros", "ones", "empty", "tensor", "full")
    cuda = _CpuCuda()

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._ALLOCATORS:
            @functools.wraps(attr)
            def on_cpu(*args, device=None, **kwargs):
                if device == "cuda" or isinstance(device, torch.device) and device.type == "cuda":
                    device = "cpu"
                return attr(*args, device=device, **kwargs)

            return on_cpu
        return attr


_CUDA_TYPE = {torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float16: "torch.cuda.HalfTensor",
              torch.float32: "torch.cuda.FloatTensor"}


@contextlib.contextmanager
def cuda_type_names():
    """While open, ``t.type()`` (no argument) of a CPU tensor answers ``torch.cuda.<X>Tensor``."""
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE:
            return _CUDA_TYPE[self.dtype]
        return original(self, *args, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def install():
    """Put the TE stand-in into megatron-core's TE extension module and apply the CPU shims listed in
    the module docstring. Call once per process, before the model is built."""
    import megatron.core.extensions.transformer_engine as ext
    import megatron.core.distributed.param_and_grad_buffer as param_and_grad_buffer
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.utils as core_utils

    classes = {"TEGroupedLinear": TEGroupedLinear, "TEColumnParallelGroupedLinear": TEColumnParallelGroupedLinear,
               "TERowParallelGroupedLinear": TERowParallelGroupedLinear}
    # the TE spec provider (get_moe_module_spec) copies these names when it is imported
    provider = sys.modules.get("megatron.core.extensions.transformer_engine_spec_provider")
    for module in (ext, provider):
        for name, cls in classes.items():
            if module is not None:
                setattr(module, name, cls)
    torch.cuda.current_device = lambda: torch.device("cpu")
    for module in (optimizer, clip_grads, core_utils, schedules, param_and_grad_buffer):
        module.torch = _CpuTorch()
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    optimizer_cls = distrib_optimizer.DistributedOptimizer
    build = optimizer_cls._build_model_and_main_param_groups  # a classmethod, bound here

    def build_on_cpu(*args, **kwargs):
        with cuda_type_names():
            return build(*args, **kwargs)

    optimizer_cls._build_model_and_main_param_groups = staticmethod(build_on_cpu)
    return ext
