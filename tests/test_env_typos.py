"""How a misspelt megatron-qat variable name is reported (issue 17 item 2; the rule itself, flag on
or off, the ``.pth`` condition and the Megatron import are in tests/test_env_strict.py and
tests/test_autoload.py; the ``megatron-qat`` commands in tests/test_cli_refusals.py):

- the closest known name is found by what follows the prefix, so a shared prefix alone is no
  likeness (``MEGATRON_QAT_ZZZ`` gets no guess, rather than ``MEGATRON_QAT_CACHE``) and a name under
  the other prefix is found (``MEGATRON_QAT_BLOCK_SIZE`` -> ``OPEN_TRAINING_MXFP4_BLOCK_SIZE``);
- the value is shown, as for a malformed value.
"""

from __future__ import annotations

import pytest

from megatron_qat import config

TYPOS = [
    ("OPEN_TRAINING_MXFP4_FAKE_QAT", config.MXFP4_FLAG),
    ("OPEN_TRAINING_MXFP4_FAKE_QAT_FLAGS", config.MXFP4_FLAG),
    ("OPEN_TRAINING_MXFP4_BLOCKSIZE", config.MXFP4_BLOCK_SIZE),
    ("MEGATRON_QAT_KERNAL", config.KERNEL),
    ("MEGATRON_QAT_METRIC_INTERVAL", config.METRICS_INTERVAL),
    ("MEGATRON_QAT_AUTO_LOAD", config.AUTOLOAD),
    ("MEGATRON_QAT_BLOCK_SIZE", config.MXFP4_BLOCK_SIZE),  # the other prefix
    ("OPEN_TRAINING_MXFP4_KERNEL", config.KERNEL),
]


@pytest.mark.parametrize("typo,meant", TYPOS)
def test_unknown_name_is_shown_with_its_value_and_the_closest_known_name(typo, meant):
    with pytest.raises(ValueError) as info:
        config.check_names({typo: " x "})
    text = str(info.value)
    assert text.startswith(f"unknown megatron-qat variable(s) {typo}=' x ' (did you mean {meant}?): accepted names are "), text


@pytest.mark.parametrize("name", ["MEGATRON_QAT_ZZZ", "OPEN_TRAINING_MXFP4_", "MEGATRON_QAT_CACHEBUSTER_SEED"])
def test_a_shared_prefix_alone_is_no_likeness(name):
    with pytest.raises(ValueError, match=rf"^unknown megatron-qat variable\(s\) {name}='1': accepted names are "):
        config.check_names({name: "1"})


def test_several_unknown_names_are_all_named():
    with pytest.raises(ValueError, match=r"MEGATRON_QAT_KERNAL='a' \(did you mean MEGATRON_QAT_KERNEL\?\), MEGATRON_QAT_ZZZ='b': "):
        config.check_names({"MEGATRON_QAT_ZZZ": "b", "MEGATRON_QAT_KERNAL": "a", "PATH": "/bin"})
