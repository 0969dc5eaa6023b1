"""Every validation error of the recurrent form names the argument and what was expected."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.mlstm.recurrent import recurrent_sequence_fw, recurrent_step_fw

B, NH, S, DHQK, DHV = 2, 3, 5, 4, 6


def _seq(**overrides):
    rng = np.random.default_rng(0)
    args = {
        "queries": rng.standard_normal((B, NH, S, DHQK)),
        "keys": rng.standard_normal((B, NH, S, DHQK)),
        "values": rng.standard_normal((B, NH, S, DHV)),
        "igate_preact": rng.standard_normal((B, NH, S, 1)),
        "fgate_preact": rng.standard_normal((B, NH, S, 1)),
    }
    args = {k: jnp.asarray(v, jnp.float32) for k, v in args.items()}
    args.update(overrides)
    return args


def _states():
    return {
        "c_initial": jnp.ones((B, NH, DHQK, DHV)),
        "n_initial": jnp.ones((B, NH, DHQK)),
        "m_initial": jnp.ones((B, NH)),
    }


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        ({"queries": jnp.ones((B, NH, DHQK))}, ValueError, r"queries must have rank 4 \(B, NH, S, DHQK\)"),
        ({"keys": jnp.ones((B, NH, S, DHQK + 1))}, ValueError, r"keys.shape=\(2, 3, 5, 5\) must be \(B, NH, S, DHQK\)"),
        ({"keys": jnp.ones((B, NH + 1, S, DHQK))}, ValueError, r"keys.shape=\(2, 4, 5, 4\)"),
        (
            {"values": jnp.ones((B, NH, S + 1, DHV))},
            ValueError,
            r"values.shape=\(2, 3, 6, 6\) must be \(B, NH, S, DHV\)",
        ),
        ({"values": jnp.ones((B, NH, S))}, ValueError, r"values.shape=\(2, 3, 5\)"),
        (
            {"igate_preact": jnp.ones((B, NH, S + 1))},
            ValueError,
            r"igate_preact.shape=\(2, 3, 6\) must be \(B, NH, S\)",
        ),
        ({"fgate_preact": jnp.ones((B, NH, S, 2))}, ValueError, r"fgate_preact.shape=\(2, 3, 5, 2\)"),
        ({"queries": jnp.ones((B, NH, S, DHQK), jnp.int32)}, TypeError, r"queries must have a floating-point dtype"),
        ({"keys": [[1.0]]}, TypeError, r"keys must be an array"),
        ({"eps": 0.0}, ValueError, r"eps must be a positive finite number, got 0.0"),
        ({"eps": -1e-6}, ValueError, r"eps must be a positive finite number"),
        ({"eps": float("nan")}, ValueError, r"eps must be a positive finite number, got nan"),
        ({"eps": float("inf")}, ValueError, r"eps must be a positive finite number"),
        ({"eps": "small"}, TypeError, r"eps must be a positive finite number, got 'small'"),
        ({"state_dtype": "float33"}, ValueError, r"state_dtype='float33' is not a known dtype"),
        ({"state_dtype": "int32"}, ValueError, r"state_dtype='int32' must be a floating-point dtype"),
        ({"mlstm_step_fn": "recurrent"}, TypeError, r"mlstm_step_fn must be callable, got str"),
    ],
)
def test_sequence_errors(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        recurrent_sequence_fw(**_seq(**overrides))


@pytest.mark.parametrize("missing", ["c_initial", "n_initial", "m_initial"])
def test_partial_initial_states(missing):
    states = _states()
    del states[missing]
    with pytest.raises(ValueError, match=rf"initial states must be given all together.*missing \['{missing}'\]"):
        recurrent_sequence_fw(**_seq(), **states)


@pytest.mark.parametrize(
    "name, shape, pattern",
    [
        (
            "c_initial",
            (B, NH, DHV, DHQK),
            r"c_initial.shape=\(2, 3, 6, 4\) must be \(B, NH, DHQK, DHV\)=\(2, 3, 4, 6\)",
        ),
        ("n_initial", (B, NH, DHV), r"n_initial.shape=\(2, 3, 6\) must be \(B, NH, DHQK\)=\(2, 3, 4\)"),
        ("m_initial", (B, NH, 1), r"m_initial.shape=\(2, 3, 1\) must be \(B, NH\)=\(2, 3\)"),
    ],
)
def test_initial_state_shapes(name, shape, pattern):
    states = _states()
    states[name] = jnp.ones(shape)
    with pytest.raises(ValueError, match=pattern):
        recurrent_sequence_fw(**_seq(), **states)


def _step(**overrides):
    args = {
        "c": jnp.ones((B, NH, DHQK, DHV)),
        "n": jnp.ones((B, NH, DHQK)),
        "m": jnp.ones((B, NH, 1)),
        "q": jnp.ones((B, NH, DHQK)),
        "k": jnp.ones((B, NH, DHQK)),
        "v": jnp.ones((B, NH, DHV)),
        "i": jnp.ones((B, NH, 1)),
        "f": jnp.ones((B, NH, 1)),
    }
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        ({"q": jnp.ones((B, NH, 1, DHQK))}, ValueError, r"q must have rank 3 \(B, NH, DHQK\)"),
        ({"k": jnp.ones((B, NH, DHQK + 1))}, ValueError, r"k.shape=\(2, 3, 5\) must be \(B, NH, DHQK\)"),
        ({"v": jnp.ones((B, NH + 1, DHV))}, ValueError, r"v.shape=\(2, 4, 6\) must be \(B, NH, DHV\)"),
        ({"c": jnp.ones((B, NH, DHQK, DHV + 1))}, ValueError, r"c.shape=\(2, 3, 4, 7\) must be \(B, NH, DHQK, DHV\)"),
        ({"n": jnp.ones((B, NH, DHV))}, ValueError, r"n.shape=\(2, 3, 6\) must be \(B, NH, DHQK\)"),
        ({"m": jnp.ones((B, NH))}, ValueError, r"m.shape=\(2, 3\) must be \(B, NH, 1\)"),
        ({"i": jnp.ones((B, NH, 2))}, ValueError, r"i.shape=\(2, 3, 2\) must be \(B, NH\)"),
        ({"n": jnp.ones((B, NH, DHQK), jnp.bfloat16)}, TypeError, r"the states must share one dtype"),
        ({"eps": 0}, ValueError, r"eps must be a positive finite number"),
    ],
)
def test_step_errors(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        recurrent_step_fw(**_step(**overrides))
