"""Pick the implementation of a numerics call: the PyTorch reference or the fused Triton kernel.

Contract (docs/kernel.md, "Dispatch"):

1. the ``impl`` argument when given, else
2. ``MEGATRON_QAT_KERNEL`` = ``reference`` | ``triton`` when set and non-empty (read with the
   package's one strict rule, :func:`megatron_qat.config.kernel_choice`), else
3. auto: ``"triton"`` when ``x`` is a CUDA tensor of a dtype the kernel supports and the
   ``triton`` package is installed, otherwise ``"reference"``.

A FORCED ``triton`` (argument or variable) that cannot run is a RuntimeError naming the source and
the reason (no Triton; a CPU tensor without ``TRITON_INTERPRET=1``; an unsupported dtype or
device); it never falls back silently. An unknown value is a ValueError listing the accepted ones,
worded the same for the argument and the variable.
This module never imports Triton (importing :mod:`megatron_qat.mxfp4` stays cheap).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .. import config

KERNEL_ENV = config.KERNEL
IMPLS = tuple(config.KERNEL_CHOICES)
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INTERPRET_ENV = "TRITON_INTERPRET"
_TRUE = ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    """Whether the ``triton`` package can be found (without importing it); looked up once per
    process (``find_spec`` walks sys.path, too slow for every forward)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """``TRITON_INTERPRET`` is on (it must be set before the kernel module is first imported)."""
    return os.environ.get(_INTERPRET_ENV, "").strip().lower() in _TRUE


def triton_unavailable_reason(x: torch.Tensor) -> str | None:
    """``None`` when the Triton kernel can process ``x``, else why not (one sentence)."""
    if not triton_installed():
        return "the triton package is not installed (pip install 'megatron-qat[triton]')"
    if x.dtype not in TRITON_DTYPES:
        return f"x has dtype {x.dtype}; the kernel supports torch.bfloat16, torch.float16 and torch.float32"
    if x.device.type == "cuda":
        return None
    if x.device.type == "cpu":
        if interpreter_enabled():
            return None
        return f"x is a CPU tensor and {_INTERPRET_ENV}=1 is not set (Triton runs CPU tensors only in its interpreter)"
    return f"x is on {x.device}; the kernel runs on CUDA tensors (or CPU tensors with {_INTERPRET_ENV}=1)"


def resolve_impl(x: torch.Tensor, impl: str | None) -> str:
    """``impl`` argument, else ``MEGATRON_QAT_KERNEL``, else auto (see the module docstring).

    Raises:
        ValueError: ``impl`` / ``MEGATRON_QAT_KERNEL`` is not one of ``reference``, ``triton``.
        RuntimeError: ``triton`` was forced but cannot run on ``x`` (the message says why).
    """
    if impl is not None:
        if impl not in IMPLS:
            accepted = ", ".join(f'"{name}"' for name in IMPLS)
            raise ValueError(f"impl={impl!r}: accepted values are {accepted}; None means {KERNEL_ENV} or auto")
        choice, source = impl, "impl"
    else:
        choice, source = config.kernel_choice(), KERNEL_ENV  # ValueError for a value outside IMPLS
    if choice is None:
        if isinstance(x, torch.Tensor) and x.device.type == "cuda" and x.dtype in TRITON_DTYPES and triton_installed():
            return "triton"
        return "reference"
    if choice == "triton" and isinstance(x, torch.Tensor):
        reason = triton_unavailable_reason(x)
        if reason is not None:
            raise RuntimeError(f"{source}=triton was requested but the Triton MXFP4 kernel cannot run: {reason}")
    return choice
