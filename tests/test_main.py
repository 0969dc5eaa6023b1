"""The ``xlstm-jax`` command (``python -m xlstm_jax``): its subcommands, and verify without one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xlstm_jax.__main__ import main
from xlstm_jax.cli import DEFAULT_SUBCOMMAND, SUBCOMMANDS, parse_args

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_the_subcommands():
    proc = subprocess.run(
        [sys.executable, "-m", "xlstm_jax", "--help"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert set(SUBCOMMANDS) == {"verify", "generate"}
    for name in SUBCOMMANDS:
        assert f"    {name} " in proc.stdout, proc.stdout


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_subcommand_has_help(name, capsys):
    assert main([name, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: xlstm-jax {name} ")


def test_no_subcommand_is_verify_on_its_defaults():
    """``make run`` runs ``python -m xlstm_jax``: the verify job on its built-in workload."""
    assert DEFAULT_SUBCOMMAND == "verify"
    default = vars(parse_args([]))
    assert default == vars(parse_args(["verify"]))
    assert {k: default[k] for k in ("B", "NH", "S", "DHQK", "DHV")} == {
        "B": 2,
        "NH": 4,
        "S": 256,
        "DHQK": 64,
        "DHV": 128,
    }


def test_unknown_subcommand_is_a_usage_error(capsys):
    assert main(["train"]) == 2
    assert "invalid choice: 'train'" in capsys.readouterr().err
    assert main(["--S", "9"]) == 2
    assert "options follow a COMMAND, e.g. 'xlstm-jax verify --S 9'" in capsys.readouterr().err
