"""The ``xlstm-jax`` command (``python -m xlstm_jax``): its subcommands, and the main job (``demo``) without one."""

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
    assert set(SUBCOMMANDS) == {"demo", "train", "generate", "serve", "verify"}
    for name in SUBCOMMANDS:
        assert f"    {name} " in proc.stdout, proc.stdout


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_subcommand_has_help(name, capsys):
    assert main([name, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: xlstm-jax {name} ")


def test_no_subcommand_is_the_demo_on_its_defaults():
    """``make run`` runs ``python -m xlstm_jax``: the demo job with its defaults (300 steps, the full verify)."""
    assert DEFAULT_SUBCOMMAND == "demo"
    default = vars(parse_args([]))
    assert default == vars(parse_args(["demo"]))
    assert {k: default[k] for k in ("steps", "verify", "workdir", "seed")} == {
        "steps": 300,
        "verify": "full",
        "workdir": None,
        "seed": 0,
    }


def test_unknown_subcommand_is_a_usage_error(capsys):
    assert main(["bench"]) == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err
    assert main(["--steps", "9"]) == 2
    assert "options follow a COMMAND, e.g. 'xlstm-jax demo --steps 9'" in capsys.readouterr().err


def _number(line: str, before: str) -> float:
    """The number that follows ``before`` in ``line``."""
    return float(line.split(before, 1)[1].split()[0])


def test_short_main_job(tmp_path):
    """The main job at 20 steps, in its own process: the losses it prints fall, end below the unigram entropy
    it prints, the checkpoint and the Hugging Face export reload equal, and a sample is printed."""
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "xlstm_jax", "demo", "--steps", "20", "--verify", "off", "--no-progress"]
        + ["--workdir", str(workdir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    entropy = _number(next(line for line in lines if line.startswith("unigram entropy")), "bytes:")
    rows = [line.split() for line in lines if line.strip() and line.split()[0].isdigit()]
    train = [(int(r[0]), float(r[1])) for r in rows if len(r) == 2]
    validation = [(int(r[0]), float(r[2])) for r in rows if len(r) == 3 and r[1] == "-"]
    assert [step for step, _ in train] == list(range(2, 21, 2))
    assert [step for step, _ in validation] == [10, 20]
    assert train[-1][1] < train[0][1] - 1.0  # the training loss falls (from about ln 258 = 5.55)
    final = next(line for line in lines if line.startswith("final validation loss"))
    assert _number(final, "final validation loss") == validation[-1][1] < entropy
    assert "equal to the trained state" in proc.stdout and "equal to the trained model" in proc.stdout
    sample = proc.stdout.split("-" * 72 + "\n")[1]
    assert sample.startswith("import os\n\n\ndef ") and len(sample) > len("import os\n\n\ndef ") + 20
    assert (workdir / "checkpoints" / "20").is_dir() and (workdir / "hf" / "config.json").is_file()
    assert (workdir / "logs" / "metrics.jsonl").is_file()
