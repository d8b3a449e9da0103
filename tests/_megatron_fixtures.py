"""Shared fixtures for the CPU Megatron-patch tests: the real megatron-core extension module
(installed here without Transformer Engine, so its TEGroupedLinear is None) gets a stand-in
``TEGroupedLinear`` (tests/te_standin.py) for the duration of a test."""

from __future__ import annotations

import pytest

from _helpers import require
from te_standin import StandInGroupedLinear, megatron_forward


@pytest.fixture
def te_ext(monkeypatch):
    """The real ``megatron.core.extensions.transformer_engine`` with a fresh stand-in class."""
    require("megatron.core", "megatron-core is a test dependency ([megatron] extra)")
    import megatron.core.extensions.transformer_engine as ext

    import megatron_qat.megatron as mm

    class TEGroupedLinear(StandInGroupedLinear):
        forward = megatron_forward

    monkeypatch.setattr(ext, "TEGroupedLinear", TEGroupedLinear)
    mm.disable()
    yield ext
    mm.disable()
