"""The environment-variable contract (read by launch scripts, torchrun workers, Ray actors).

| variable | accepted values | unset or empty |
|---|---|---|
| ``OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG`` | ``1`` on, ``0`` off | off |
| ``OPEN_TRAINING_MXFP4_BLOCK_SIZE`` | a positive even integer (32 = FlashInfer; others are ablations) | 32 |
| ``OPEN_TRAINING_INT4_FAKE_QAT_FLAG`` | ``1`` on, ``0`` off; on together with the MXFP4 flag is an error | off |
| ``MEGATRON_QAT_AUTOLOAD`` | ``1`` patch at import, ``0`` do not (call ``enable_from_env()`` yourself) | ``1`` |
| ``MEGATRON_QAT_KERNEL`` | ``reference``, ``triton`` (forces the numerics implementation) | auto |
| ``MEGATRON_QAT_CACHE`` | ``1`` cache the fake-quantized weights per optimizer step, ``0`` fake-quantize every call | ``1`` |
| ``MEGATRON_QAT_METRICS_INTERVAL`` | a non-negative integer N: statistics every N steps, ``0`` off | Megatron's ``--log-interval`` |

One rule for every variable (:func:`read`): the value is stripped of surrounding whitespace; an
unset or empty variable takes its default; anything else must be exactly one of the accepted values
(case-sensitive), or a :class:`ValueError` names the variable, the value and the accepted values.
A ``MEGATRON_QAT_*`` or ``OPEN_TRAINING_MXFP4_*`` name that is not in the table (a typo such as
``OPEN_TRAINING_MXFP4_FAKE_QAT=1``, which would otherwise train without fake-QAT) is an error too,
whether or not the flag is on, naming the closest known name (:func:`check_names`).

Where the check runs: :func:`from_env` (so wherever the patch is enabled from the environment), the
``megatron-qat`` commands before they start, and, through the autoload, when Megatron imports its
Transformer Engine extension module: the ``.pth`` line installs the autoload whenever any name with
our prefixes is set (:func:`autoload_requested` is its condition), not only when the flag is on.

This module imports nothing heavy (no torch): it is safe at interpreter start.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from typing import Mapping

from .numerics.constants import DEFAULT_BLOCK_SIZE  # the one definition (torch-free)

MXFP4_FLAG = "OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG"
MXFP4_BLOCK_SIZE = "OPEN_TRAINING_MXFP4_BLOCK_SIZE"
INT4_FLAG = "OPEN_TRAINING_INT4_FAKE_QAT_FLAG"
AUTOLOAD = "MEGATRON_QAT_AUTOLOAD"
KERNEL = "MEGATRON_QAT_KERNEL"
CACHE = "MEGATRON_QAT_CACHE"
METRICS_INTERVAL = "MEGATRON_QAT_METRICS_INTERVAL"

_ON_OFF = {"1": True, "0": False}
KERNEL_CHOICES = {"reference": "reference", "triton": "triton"}

# variable -> (accepted values, as written in an error, what unset/empty means)
VARIABLES = {
    MXFP4_FLAG: ('"1" (on), "0" (off)', "off"),
    MXFP4_BLOCK_SIZE: ("a positive even integer (32 = FlashInfer; other values are ablations)", "32"),
    INT4_FLAG: ('"1" (on), "0" (off)', "off"),
    AUTOLOAD: ('"1" (patch Megatron at import), "0" (do not)', "1"),
    KERNEL: ('"reference", "triton"', "auto: the Triton kernel on CUDA, the PyTorch reference elsewhere"),
    CACHE: ('"1" (cache on), "0" (cache off)', "on"),
    METRICS_INTERVAL: (
        "a non-negative integer (N > 0: statistics every N steps; 0: off)",
        "follow Megatron's --log-interval",
    ),
}
_OWN_PREFIXES = ("MEGATRON_QAT_", "OPEN_TRAINING_MXFP4_")

_log = logging.getLogger("megatron_qat")
_warned_block_sizes: set[int] = set()


def _environ(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def reject(name: str, raw: str) -> ValueError:
    """The one error for a variable holding a value outside its accepted set."""
    accepted, default = VARIABLES[name]
    return ValueError(f"{name}={raw!r}: accepted values are {accepted}; unset or empty means {default}")


def read(name: str, accepted: Mapping[str, object], default, environ: Mapping[str, str] | None = None):
    """The strict rule: ``default`` when ``name`` is unset or blank, else ``accepted[value.strip()]``.

    Raises:
        ValueError: the stripped value is not a key of ``accepted`` (the message lists them).
    """
    raw = _environ(environ).get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip()
    if value not in accepted:
        raise reject(name, raw)
    return accepted[value]


def flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """A ``"1"``/``"0"`` switch read by :func:`read` (unset/empty: off; ``AUTOLOAD``: on)."""
    return read(name, _ON_OFF, name == AUTOLOAD, environ)


def kernel_choice(environ: Mapping[str, str] | None = None) -> str | None:
    """``MEGATRON_QAT_KERNEL`` read by :func:`read`: ``"reference"``, ``"triton"`` or ``None`` (auto)."""
    return read(KERNEL, KERNEL_CHOICES, None, environ)


def caching(environ: Mapping[str, str] | None = None) -> bool:
    """``MEGATRON_QAT_CACHE`` read by :func:`read`: whether the per-step weight cache is on."""
    return read(CACHE, _ON_OFF, True, environ)


def metrics_interval(environ: Mapping[str, str] | None = None) -> int | None:
    """``MEGATRON_QAT_METRICS_INTERVAL``: a non-negative decimal integer, or ``None`` when unset/empty."""
    raw = _environ(environ).get(METRICS_INTERVAL)
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    if not (text.isascii() and text.isdigit()):
        raise reject(METRICS_INTERVAL, raw)
    return int(text, 10)


def autoload_requested(environ: Mapping[str, str] | None = None) -> bool:
    """The autoload ``.pth`` line's condition (it repeats this in one line of its own, without importing
    anything): some ``MEGATRON_QAT_*`` / ``OPEN_TRAINING_MXFP4_*`` name is set and ``MEGATRON_QAT_AUTOLOAD``
    is not ``0``. Then the autoload runs :func:`from_env` (every value, every name) when Megatron
    imports its TE extension module, and patches only if the flag is on."""
    env = _environ(environ)
    return any(n.startswith(_OWN_PREFIXES) for n in env) and env.get(AUTOLOAD, "1").strip() != "0"


def flag_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the MXFP4 flag is anything but unset/empty/``"0"`` -- the autoload ``.pth``'s condition.
    A malformed value (``yes``) counts as requested, so that it ends in :func:`read`'s error."""
    return _environ(environ).get(MXFP4_FLAG, "").strip() not in ("", "0")


@dataclass(frozen=True)
class FakeQATConfig:
    """What the environment asks for: ``enabled``, the MXFP4 ``block_size`` and ``autoload``."""

    enabled: bool
    block_size: int = DEFAULT_BLOCK_SIZE
    autoload: bool = True


def _block_size(environ: Mapping[str, str], warn: bool) -> int:
    raw = environ.get(MXFP4_BLOCK_SIZE)
    if raw is None or raw.strip() == "":
        return DEFAULT_BLOCK_SIZE
    text = raw.strip()
    value = int(text) if text.isdigit() and text.isascii() else -1
    if value <= 0 or value % 2:
        raise reject(MXFP4_BLOCK_SIZE, raw)
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


def _suffix(name: str) -> str:
    return next(name[len(p):] for p in _OWN_PREFIXES if name.startswith(p))


def check_names(environ: Mapping[str, str] | None = None) -> None:
    """Every ``MEGATRON_QAT_*`` / ``OPEN_TRAINING_MXFP4_*`` name set in ``environ`` is one of
    :data:`VARIABLES`; ValueError otherwise, naming each unknown name with the closest known one
    (``difflib``) and listing the accepted names. Another product's ``OPEN_TRAINING_*`` is not ours."""
    env = _environ(environ)
    known = [n for n in VARIABLES if n.startswith(_OWN_PREFIXES)]
    unknown = sorted(n for n in env if n.startswith(_OWN_PREFIXES) and n not in VARIABLES)
    if not unknown:
        return
    by_suffix = {_suffix(n): n for n in known}  # compare what follows the prefix (a shared prefix is no likeness)
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(_suffix(name), by_suffix, n=1, cutoff=0.6)
        parts.append(f"{name}={env[name]!r}" + (f" (did you mean {by_suffix[close[0]]}?)" if close else ""))
    raise ValueError(f"unknown megatron-qat variable(s) {', '.join(parts)}: accepted names are {', '.join(known)}")


def from_env(environ: Mapping[str, str] | None = None) -> FakeQATConfig:
    """Read the fake-QAT settings from ``environ`` (``None`` means ``os.environ``).

    Every variable of the table is checked by :func:`read`'s rule, and every name by
    :func:`check_names`, whether or not the flag is on.

    Raises:
        ValueError: a variable holds a value outside its accepted set, or an unknown
            ``MEGATRON_QAT_*`` / ``OPEN_TRAINING_MXFP4_*`` name is set.
        RuntimeError: both ``OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG`` and
            ``OPEN_TRAINING_INT4_FAKE_QAT_FLAG`` are "1" (the two fake-QAT modes are exclusive).
    """
    env = _environ(environ)
    enabled = flag(MXFP4_FLAG, env)
    int4 = flag(INT4_FLAG, env)
    autoload = flag(AUTOLOAD, env)
    kernel_choice(env)
    caching(env)
    metrics_interval(env)
    check_names(env)
    if enabled and int4:
        raise RuntimeError(
            f"{MXFP4_FLAG}=1 and {INT4_FLAG}=1 are both set: MXFP4 and INT4 fake-QAT are mutually "
            "exclusive; unset one of them"
        )
    return FakeQATConfig(enabled=enabled, block_size=_block_size(env, warn=enabled), autoload=autoload)
