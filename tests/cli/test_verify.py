"""``xlstm-jax verify`` (the main job) passes on agreeing forms, fails on a wrong one, rejects bad sizes."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import pytest

from xlstm_jax.cli import main
from xlstm_jax.cli.verify import _inputs
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import BACKENDS, mLSTMBackendRecurrent
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent import mLSTMBackendRecurrentConfig

SMALL = ["verify", "--B", "1", "--NH", "2", "--S", "9", "--DHQK", "32", "--DHV", "16", "--repeats", "1"]


def test_verify_agrees(capsys):
    assert main(SMALL) == 0
    out = capsys.readouterr().out
    for name in BACKENDS:
        assert name in out
    assert "recurrent step by step (decode)" in out


@dataclasses.dataclass(frozen=True)
class _WrongConfig(mLSTMBackendRecurrentConfig):
    pass


class _WrongBackend(mLSTMBackendRecurrent):
    """The recurrent backend with its values scaled: a form that disagrees."""

    config_class = _WrongConfig

    def __call__(self, q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, return_last_states=False):
        return super().__call__(q, k, v * 1.01, i, f, return_last_states=return_last_states)


def test_verify_fails_on_a_wrong_form(monkeypatch, capsys):
    monkeypatch.setitem(BACKENDS, "wrong", _WrongBackend)
    assert main(SMALL) == 1
    out, err = capsys.readouterr()
    assert any(line.startswith("wrong") and line.endswith("NO") for line in out.splitlines())
    assert "FAILED" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--S", "0"], "argument --S: must be an integer >= 1, got 0"),
        (["--DHQK", "-4"], "argument --DHQK: must be an integer >= 1, got -4"),
        (["--B", "two"], "argument --B: must be an integer >= 1, got 'two'"),
        (["--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0"),
        (["--seed", str(2**32)], "argument --seed: must be in [0, 2**32)"),
    ],
)
def test_verify_rejects_bad_sizes(extra, message, capsys):
    assert main(["verify", *extra]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err, err


def test_inputs_are_well_conditioned():
    """Queries and keys with positive entries: q̂·n has no cancellation, so float32 errors stay small."""
    q, k, *_ = _inputs((1, 1, 4, 8, 8), 0, jnp.float32)
    assert bool(jnp.all(q >= 0)) and bool(jnp.all(k >= 0))
