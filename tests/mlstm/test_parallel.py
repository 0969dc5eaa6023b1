"""The parallel (quadratic) form against the float64 reference: forward, last states, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.mlstm.form_checks import check_forward, check_gradients, random_inputs
from tests.numerics import TOL, assert_close
from tests.reference import parallel_ref, recurrent_ref
from xlstm_jax.mlstm.parallel import block_log_weights, block_running_max, parallel_stabilized_fw

# (S, initial states, forget gates, input gates): odd S, extreme and saturated gates.
FLOAT64_CASES = [
    (1, False, "mixed", "wide"),
    (1, True, "open", "extreme"),
    (7, True, "mixed", "extreme"),
    (63, False, "closed", "extreme"),
    (65, True, "open", "wide"),
    (257, True, "mixed", "extreme"),
    (257, False, "closed", "wide"),
]


@pytest.mark.parametrize(("S", "states", "fgate", "igate"), FLOAT64_CASES)
def test_matches_reference_float64(S, states, fgate, igate):
    x = random_inputs(S, 2, 2, S, 5, 7, states=states, fgate=fgate, igate=igate)
    check_forward(parallel_stabilized_fw, x, "float64")


@pytest.mark.parametrize(("S", "states"), [(257, True), (65, False)])
def test_matches_reference_float32(S, states):
    x = random_inputs(3 * S, 2, 2, S, 6, 10, states=states, igate="extreme")
    check_forward(parallel_stabilized_fw, x, "float32")


@pytest.mark.parametrize(("S", "states"), [(257, True), (63, False)])
def test_matches_reference_bfloat16(S, states):
    x = random_inputs(5 * S, 2, 2, S, 16, 24, states=states, igate="extreme")
    check_forward(parallel_stabilized_fw, x, "bfloat16")


def test_quadratic_references_agree():
    """The two float64 references (step by step and quadratic) agree: the quadratic equations the form is
    built on, the initial-state column in the row max included, are the recurrent function."""
    x = random_inputs(0, 2, 2, 33, 4, 5, states=True, igate="extreme")
    args = [x[name] for name in ("q", "k", "v", "i", "f", "c0", "n0", "m0")]
    h, states, scale = recurrent_ref(*args)
    h_par, states_par = parallel_ref(*args)
    assert_close("h", h, h_par, TOL["float64"], scale=scale)
    for name, a, b in zip("cnm", states, states_par, strict=True):
        assert_close(name, a, b, TOL["float64"])


@pytest.mark.parametrize(("S", "states"), [(5, True), (4, False)])
def test_gradients_float64(S, states):
    x = random_inputs(S, 1, 2, S, 3, 2, states=states)
    check_gradients(parallel_stabilized_fw, x, "float64")


def test_gradients_float32():
    x = random_inputs(11, 1, 2, 6, 3, 4, states=True)
    check_gradients(parallel_stabilized_fw, x, "float32")


def test_state_dtypes():
    """float32 states by default (also for bfloat16 inputs); initial states come back in their own dtypes."""
    x = random_inputs(0, 1, 2, 9, 4, 4, states=True)
    q, k, v, i, f = (jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v", "i", "f"))
    form = jax.jit(parallel_stabilized_fw, static_argnames=("return_last_states",))
    h, (c, n, m) = form(q, k, v, i, f, return_last_states=True)
    assert h.dtype == jnp.bfloat16
    assert (c.dtype, n.dtype, m.dtype) == (jnp.float32,) * 3
    c0, n0, m0 = (jnp.asarray(x[name], jnp.bfloat16) for name in ("c0", "n0", "m0"))
    _, (c, n, m) = form(q, k, v, i, f, c0, n0, m0, return_last_states=True)
    assert (c.dtype, n.dtype, m.dtype) == (jnp.bfloat16,) * 3


def test_rejects_bad_inputs():
    x = random_inputs(0, 1, 2, 4, 3, 2, states=True)
    q, k, v, i, f = (jnp.asarray(x[name]) for name in ("q", "k", "v", "i", "f"))
    with pytest.raises(ValueError, match=r"v.shape"):
        parallel_stabilized_fw(q, k, v[:, :1], i, f)
    with pytest.raises(ValueError, match="initial states"):
        parallel_stabilized_fw(q, k, v, i, f, n_initial=jnp.asarray(x["n0"]))
    with pytest.raises(TypeError, match="floating"):
        parallel_stabilized_fw(q, k, v, i.astype(jnp.int32), f)
    with pytest.raises(ValueError, match="state_dtype"):
        parallel_stabilized_fw(q, k, v, i, f, state_dtype="int32")


def test_float32_without_states_at_a_larger_shape():
    """B=1, NH=4, S=1024, DHQK=64, DHV=128 under jit, no initial states: the shape at which XLA:CPU (jax 0.10.2)
    returned non-finite h when the zero initial states entered a matrix product (they are skipped now)."""
    x = random_inputs(1024, 1, 4, 1024, 64, 128, fgate="open")
    check_forward(parallel_stabilized_fw, x, "float32")


@pytest.mark.parametrize("breaks", [False, True])
@pytest.mark.parametrize("starts", [False, True])
def test_block_running_max_is_the_row_max(breaks, starts):
    """block_running_max (a scan) against block_log_weights' row max of the (L, L) matrix, on blocks of 64 steps
    with extreme input gates, padding, breaks restarting the max and document-start columns: equal -inf where no
    step weighs, else equal up to the rounding of the two sums, 2 float32 ulps of their largest term each
    (F_t + (i_s - F_s) against (F_t - F_s) + i_s), bounded here by 4 ulps of max |F| + |i|."""
    rng = np.random.default_rng(7)
    shape, L = (3, 5), 64
    F = np.cumsum(np.log(1 / (1 + np.exp(-rng.normal(2, 3, (*shape, L))))), -1).astype(np.float32)
    i = rng.normal(0, 20, (*shape, L)).astype(np.float32)
    i[..., 5] = -np.inf  # a step that weighs nothing
    valid = np.arange(L) < 50  # padding after step 50
    R = np.cumsum(rng.random((*shape, L)) < 0.05, -1).astype(np.float32) if breaks else None
    log_start = np.where(rng.random((*shape, L)) < 0.1, -rng.random((*shape, L)), -np.inf) if starts else None
    m0 = rng.normal(0, 5, shape).astype(np.float32)
    args = [jnp.asarray(a) if a is not None else None for a in (F, i, m0, valid, R, log_start)]
    _, log_w, expected = block_log_weights(*args)
    got = block_running_max(args[0], args[1], log_w, *args[3:])
    expected, got = np.asarray(expected), np.asarray(got)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
    finite = np.isfinite(expected)
    scale = np.max(np.abs(F)) + np.max(np.abs(i[np.isfinite(i)]))
    assert np.max(np.abs(got[finite] - expected[finite])) <= 4 * np.finfo(np.float32).eps * scale
