"""Pick the implementation of a numerics call: the PyTorch reference or the fused Triton kernel."""

from __future__ import annotations

import os

import torch

KERNEL_ENV = "MEGATRON_QAT_KERNEL"
IMPLS = ("reference", "triton")


def resolve_impl(x: torch.Tensor, impl: str | None) -> str:
    """``impl`` argument, else ``MEGATRON_QAT_KERNEL``, else ``"reference"``."""
    choice = impl if impl is not None else (os.environ.get(KERNEL_ENV) or None)
    if choice is None:
        return "reference"
    if choice not in IMPLS:
        source = "impl" if impl is not None else KERNEL_ENV
        raise ValueError(f"{source}={choice!r}: accepted values are {', '.join(IMPLS)}")
    return choice
