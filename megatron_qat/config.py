"""The environment-variable contract (read by launch scripts, torchrun workers, Ray actors).

| variable | values | default |
|---|---|---|
| ``OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG`` | ``"1"`` on; ``"0"``, empty or unset off | off |
| ``OPEN_TRAINING_MXFP4_BLOCK_SIZE`` | positive even integer (32 = FlashInfer; others ablation) | 32 |
| ``OPEN_TRAINING_INT4_FAKE_QAT_FLAG`` | ``"1"`` together with the MXFP4 flag is an error | - |

This module imports nothing heavy (no torch): it is safe at interpreter start.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping

MXFP4_FLAG = "OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG"
MXFP4_BLOCK_SIZE = "OPEN_TRAINING_MXFP4_BLOCK_SIZE"
INT4_FLAG = "OPEN_TRAINING_INT4_FAKE_QAT_FLAG"
DEFAULT_BLOCK_SIZE = 32

_log = logging.getLogger("megatron_qat")
_warned_block_sizes: set[int] = set()


@dataclass(frozen=True)
class FakeQATConfig:
    """What the environment asks for: ``enabled`` and the MXFP4 ``block_size``."""

    enabled: bool
    block_size: int = DEFAULT_BLOCK_SIZE


def _parse_flag(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name)
    if raw is None or raw.strip() in ("", "0"):
        return False
    if raw.strip() == "1":
        return True
    raise ValueError(f'{name}={raw!r}: accepted values are "1" (on), "0" or empty/unset (off)')


def _parse_block_size(environ: Mapping[str, str], warn: bool) -> int:
    raw = environ.get(MXFP4_BLOCK_SIZE)
    if raw is None or raw.strip() == "":
        return DEFAULT_BLOCK_SIZE
    try:
        value = int(raw.strip(), 10)
    except ValueError:
        value = -1
    if value <= 0 or value % 2:
        raise ValueError(f"{MXFP4_BLOCK_SIZE}={raw!r}: must be a positive even integer (default 32)")
    if warn and value != DEFAULT_BLOCK_SIZE and value not in _warned_block_sizes:
        _warned_block_sizes.add(value)
        _log.warning(
            "%s=%d: FlashInfer's MXFP4 kernels implement only block size 32; %d is an ablation and "
            "will not match what the rollout engine ships",
            MXFP4_BLOCK_SIZE,
            value,
            value,
        )
    return value


def from_env(environ: Mapping[str, str] | None = None) -> FakeQATConfig:
    """Read the fake-QAT settings from ``environ`` (``None`` means ``os.environ``).

    Raises:
        ValueError: a variable holds a value outside its accepted set (the message names it).
        RuntimeError: both ``OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG`` and
            ``OPEN_TRAINING_INT4_FAKE_QAT_FLAG`` are "1" (the two fake-QAT modes are exclusive).
    """
    env = os.environ if environ is None else environ
    enabled = _parse_flag(env, MXFP4_FLAG)
    int4 = env.get(INT4_FLAG, "").strip() == "1"
    if enabled and int4:
        raise RuntimeError(
            f"{MXFP4_FLAG}=1 and {INT4_FLAG}=1 are both set: MXFP4 and INT4 fake-QAT are mutually "
            "exclusive; unset one of them"
        )
    block_size = _parse_block_size(env, warn=enabled)
    return FakeQATConfig(enabled=enabled, block_size=block_size)
