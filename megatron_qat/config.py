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
| ``MEGATRON_QAT_RECIPE`` | a recipe name of :data:`megatron_qat.numerics.rules.RECIPES` (docs/engines.md) | ``flashinfer-w4a16`` |

One rule for every variable (:func:`read`): the value is stripped of surrounding whitespace; an
unset or empty variable takes its default; anything else must be exactly one of the accepted values
(case-sensitive), or a :class:`ValueError` names the variable, the value and the accepted values.
An unknown ``MEGATRON_QAT_*`` or ``OPEN_TRAINING_MXFP4_*`` variable (a typo such as
``OPEN_TRAINING_MXFP4_FAKE_QAT=1``, which would otherwise train silently without fake-QAT) is an
error too, flag on or off (:func:`check_names`, naming the closest known name).

This module imports nothing heavy (no torch): it is safe at interpreter start.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Mapping

from .numerics.constants import DEFAULT_BLOCK_SIZE  # the one definition (torch-free)
from .numerics.rules import DEFAULT_RECIPE, RECIPES

MXFP4_FLAG = "OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG"
MXFP4_BLOCK_SIZE = "OPEN_TRAINING_MXFP4_BLOCK_SIZE"
INT4_FLAG = "OPEN_TRAINING_INT4_FAKE_QAT_FLAG"
AUTOLOAD = "MEGATRON_QAT_AUTOLOAD"
KERNEL = "MEGATRON_QAT_KERNEL"
CACHE = "MEGATRON_QAT_CACHE"
METRICS_INTERVAL = "MEGATRON_QAT_METRICS_INTERVAL"
RECIPE = "MEGATRON_QAT_RECIPE"

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
    RECIPE: (", ".join(f'"{name}"' for name in RECIPES) + " (docs/engines.md)", DEFAULT_RECIPE),
}
_OWN_PREFIXES = ("MEGATRON_QAT_", "OPEN_TRAINING_MXFP4_")


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


def recipe_name(environ: Mapping[str, str] | None = None) -> str:
    """``MEGATRON_QAT_RECIPE`` read by :func:`read`: a name of ``RECIPES`` (unset/empty: the default)."""
    return read(RECIPE, {name: name for name in RECIPES}, DEFAULT_RECIPE, environ)


def own_names_present(environ: Mapping[str, str] | None = None) -> bool:
    """Whether any ``MEGATRON_QAT_*`` / ``OPEN_TRAINING_MXFP4_*`` name is set (the autoload's second
    condition: a misspelt flag must still be checked where Megatron is imported)."""
    return any(name.startswith(_OWN_PREFIXES) for name in _environ(environ))


def flag_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the MXFP4 flag is anything but unset/empty/``"0"`` -- the autoload ``.pth``'s condition.
    A malformed value (``yes``) counts as requested, so that it ends in :func:`read`'s error."""
    return _environ(environ).get(MXFP4_FLAG, "").strip() not in ("", "0")


@dataclass(frozen=True)
class FakeQATConfig:
    """What the environment asks for: ``enabled``, the ``block_size``, ``autoload`` and the ``recipe`` name."""

    enabled: bool
    block_size: int = DEFAULT_BLOCK_SIZE
    autoload: bool = True
    recipe: str = DEFAULT_RECIPE


def _block_size(environ: Mapping[str, str]) -> int:
    raw = environ.get(MXFP4_BLOCK_SIZE)
    if raw is None or raw.strip() == "":
        return DEFAULT_BLOCK_SIZE
    text = raw.strip()
    value = int(text) if text.isdigit() and text.isascii() else -1
    if value <= 0 or value % 2:
        raise reject(MXFP4_BLOCK_SIZE, raw)
    return value


def _suffix(name: str) -> str:
    return next(name[len(p):] for p in _OWN_PREFIXES if name.startswith(p))


def check_names(environ: Mapping[str, str] | None = None) -> None:
    """Raise ValueError for a set ``MEGATRON_QAT_*`` / ``OPEN_TRAINING_MXFP4_*`` name that is not a
    variable of the table, naming each with its value and the closest known name (``difflib`` on
    what follows the prefix: a shared prefix is no likeness, and ``MEGATRON_QAT_BLOCK_SIZE`` finds
    ``OPEN_TRAINING_MXFP4_BLOCK_SIZE``), and listing the accepted names."""
    env = _environ(environ)
    unknown = sorted(n for n in env if n.startswith(_OWN_PREFIXES) and n not in VARIABLES)
    if unknown:
        known = [n for n in VARIABLES if n.startswith(_OWN_PREFIXES)]
        by_suffix = {_suffix(n): n for n in known}
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(_suffix(name), by_suffix, n=1, cutoff=0.6)
            hints.append(f"{name}={env[name]!r}" + (f" (did you mean {by_suffix[close[0]]}?)" if close else ""))
        raise ValueError(f"unknown megatron-qat variable(s) {', '.join(hints)}: accepted names are {', '.join(known)}")


def from_env(environ: Mapping[str, str] | None = None) -> FakeQATConfig:
    """Read the fake-QAT settings from ``environ`` (``None`` means ``os.environ``).

    Every variable of the table is checked by :func:`read`'s rule, and every set name with our
    prefixes by :func:`check_names`, whether or not the flag is on.

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
    recipe = recipe_name(env)
    block_size = _block_size(env)
    check_names(env)
    if enabled and int4:
        raise RuntimeError(
            f"{MXFP4_FLAG}=1 and {INT4_FLAG}=1 are both set: MXFP4 and INT4 fake-QAT are mutually "
            "exclusive; unset one of them"
        )
    return FakeQATConfig(enabled=enabled, block_size=block_size, autoload=autoload, recipe=recipe)
