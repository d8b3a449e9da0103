"""The ``megatron-qat`` dispatcher: a subcommand's bad argument is reported with that
subcommand's usage (issue 8: ``parity --frobnicate`` used to print the top-level usage)."""

import pytest

from megatron_qat import cli


def test_unknown_parity_flag_shows_parity_usage_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["parity", "--frobnicate"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: megatron-qat parity") and "unrecognized arguments: --frobnicate" in err


def test_missing_command_is_the_top_level_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("usage: megatron-qat ")
