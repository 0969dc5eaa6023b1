"""The main job (python -m xlstm_jax) passes on agreeing forms and fails on a wrong one."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

import xlstm_jax.__main__ as main_job
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import BACKENDS, mLSTMBackendRecurrent
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent import mLSTMBackendRecurrentConfig

SMALL = ["--B", "1", "--NH", "2", "--S", "9", "--DHQK", "32", "--DHV", "16", "--repeats", "1"]


def test_main_job_agrees(capsys):
    assert main_job.main(SMALL) == 0
    out = capsys.readouterr().out
    for name in BACKENDS:
        assert name in out
    assert "recurrent step by step (decode)" in out


@dataclasses.dataclass
class _WrongConfig(mLSTMBackendRecurrentConfig):
    pass


class _WrongBackend(mLSTMBackendRecurrent):
    """The recurrent backend with its values scaled: a form that disagrees."""

    config_class = _WrongConfig

    def __call__(self, q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, return_last_states=False):
        return super().__call__(q, k, v * 1.01, i, f, return_last_states=return_last_states)


def test_main_job_fails_on_a_wrong_form(monkeypatch, capsys):
    monkeypatch.setitem(BACKENDS, "wrong", _WrongBackend)
    assert main_job.main(SMALL) == 1
    assert any(line.startswith("wrong") and line.endswith("NO") for line in capsys.readouterr().out.splitlines())


def test_inputs_are_well_conditioned():
    """Queries and keys with positive entries: q̂·n has no cancellation, so float32 errors stay small."""
    q, k, *_ = main_job._inputs((1, 1, 4, 8, 8), 0, jnp.float32)
    assert bool(jnp.all(q >= 0)) and bool(jnp.all(k >= 0))
