"""The recurrent form (xlstm_jax/mlstm/recurrent.py) against the float64 reference of tests/reference.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.mlstm.form_checks import check_forward, check_gradients, random_inputs
from tests.numerics import TOL, assert_close, make_inputs
from tests.reference import parallel_ref, recurrent_ref
from xlstm_jax.mlstm.recurrent import recurrent_sequence_fw, recurrent_step_fw

# The unrolled Python loop (use_scan=False) is run eagerly: XLA's compile time grows faster than linearly
# in the number of unrolled steps. jit of the loop form is tested at small S below.


def _args(x, dtype):
    args = tuple(jnp.asarray(x[n], dtype) for n in ("q", "k", "v", "i", "f"))
    states = tuple(jnp.asarray(x[n], jnp.float32) for n in ("c0", "n0", "m0")) if "c0" in x else (None, None, None)
    return args, states


def _ref_inputs(x, dtype):
    """The reference sees exactly the (rounded) inputs the code under test sees."""
    return {
        n: np.asarray(jnp.asarray(jnp.asarray(a, dtype), jnp.float32), np.float64) if n in "qkvif" else a
        for n, a in x.items()
    }


def _ref(x):
    s = (x["c0"], x["n0"], x["m0"]) if "c0" in x else (None, None, None)
    return recurrent_ref(x["q"], x["k"], x["v"], x["i"], x["f"], *s)


def test_reference_forms_agree():
    """The two float64 references (step by step and quadratic) compute the same function."""
    rng = np.random.default_rng(0)
    for states in (False, True):
        x = make_inputs(rng, 2, 3, 33, 5, 7, igate="extreme", states=states)
        s = (x["c0"], x["n0"], x["m0"]) if states else (None, None, None)
        h, last, scale = recurrent_ref(x["q"], x["k"], x["v"], x["i"], x["f"], *s)
        h_par, last_par = parallel_ref(x["q"], x["k"], x["v"], x["i"], x["f"], *s)
        assert_close("h", h, h_par, TOL["float64"], scale)
        for name, a, b in zip("cnm", last, last_par, strict=True):
            assert_close(name, a, b, TOL["float64"])


CASES = [
    # (B, NH, S, DHQK, DHV, fgate, igate, states)
    (2, 3, 1, 8, 12, "mixed", "wide", False),
    (2, 3, 2, 8, 12, "open", "wide", True),
    (1, 2, 7, 16, 8, "closed", "extreme", True),
    (3, 2, 64, 8, 16, "mixed", "extreme", False),
    (2, 2, 257, 8, 4, "mixed", "wide", True),
    (2, 2, 257, 4, 8, "closed", "extreme", False),
]


def _form(use_scan: bool):
    return functools.partial(recurrent_sequence_fw, use_scan=use_scan, state_dtype="float32")


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("B,NH,S,DHQK,DHV,fgate,igate,states", CASES)
def test_scan_matches_reference(B, NH, S, DHQK, DHV, fgate, igate, states, dtype):
    x = random_inputs(S * 31 + DHQK, B, NH, S, DHQK, DHV, fgate=fgate, igate=igate, states=states)
    if dtype == "float64":
        check_forward(functools.partial(recurrent_sequence_fw, use_scan=True), x, dtype)
    else:
        check_forward(_form(use_scan=True), x, dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("B,NH,S,DHQK,DHV,fgate,igate,states", [c for c in CASES if c[2] <= 7])
def test_unrolled_loop_matches_reference(B, NH, S, DHQK, DHV, fgate, igate, states, dtype):
    """The unrolled loop, jitted: only short S, since XLA's compile time grows superlinearly in S."""
    x = random_inputs(S * 37 + DHQK, B, NH, S, DHQK, DHV, fgate=fgate, igate=igate, states=states)
    if dtype == "float64":
        check_forward(functools.partial(recurrent_sequence_fw, use_scan=False), x, dtype)
    else:
        check_forward(_form(use_scan=False), x, dtype)


def test_unrolled_loop_eager_long():
    """The unrolled loop at S=64 without jit: equal to the scan to float32 rounding."""
    x = random_inputs(99, 2, 2, 64, 8, 6, igate="extreme", states=True)
    (q, k, v, i, f), s0 = _args(x, jnp.float32)
    h_loop, last_loop = recurrent_sequence_fw(q, k, v, i, f, *s0, return_last_states=True)
    h_ref, last_ref, scale = _ref(_ref_inputs(x, jnp.float32))
    assert_close("h", h_ref, h_loop, TOL["float32"], scale)
    for name, a, b in zip("cnm", last_ref, last_loop, strict=True):
        assert_close(name, a, b, TOL["float32"])


def test_step_matches_reference_and_keeps_dtypes():
    x = make_inputs(np.random.default_rng(3), 2, 3, 1, 8, 12, igate="extreme", states=True)
    h_ref, (c_ref, n_ref, m_ref), scale = _ref(_ref_inputs(x, jnp.bfloat16))
    q, k, v, i, f = (jnp.asarray(x[n][:, :, 0], jnp.bfloat16) for n in ("q", "k", "v", "i", "f"))
    c0, n0, m0 = (jnp.asarray(x[n], jnp.float32) for n in ("c0", "n0", "m0"))
    h, (c, n, m) = jax.jit(recurrent_step_fw)(c0, n0, m0[..., None], q, k, v, i[..., None], f[..., None])
    assert h.dtype == jnp.bfloat16 and h.shape == (2, 3, 12)
    assert (c.dtype, n.dtype, m.dtype) == (jnp.float32,) * 3 and m.shape == (2, 3, 1)
    tol = TOL["bfloat16/float32"]
    assert_close("h", h_ref[:, :, 0], h, tol, scale[:, :, 0])
    assert_close("c", c_ref, c, tol)
    assert_close("n", n_ref, n, tol)
    assert_close("m", m_ref, m[..., 0], tol, scale=np.maximum(np.abs(m_ref), 1.0))


def test_readout_runs_in_state_dtype():
    """With bf16 inputs and a float32 state, h is the float32 result rounded once to bf16."""
    x = make_inputs(np.random.default_rng(4), 2, 4, 1, 64, 32, states=True)
    q, k, v, i, f = (jnp.asarray(x[n][:, :, 0], jnp.bfloat16) for n in ("q", "k", "v", "i", "f"))
    c0, n0, m0 = (jnp.asarray(x[n], jnp.float32) for n in ("c0", "n0", "m0"))
    h16, _ = recurrent_step_fw(c0, n0, m0[..., None], q, k, v, i[..., None], f[..., None])
    up = [a.astype(jnp.float32) for a in (q, k, v, i, f)]
    h32, _ = recurrent_step_fw(c0, n0, m0[..., None], up[0], up[1], up[2], up[3][..., None], up[4][..., None])
    np.testing.assert_array_equal(np.asarray(h16, np.float32), np.asarray(h32.astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize("use_scan", [True, False])
def test_state_continuation(use_scan):
    """Two calls with the states carried over give the same h and last states as one call."""
    x = make_inputs(np.random.default_rng(5), 2, 2, 23, 8, 6, states=True)
    (q, k, v, i, f), s0 = _args(x, jnp.float32)
    run = functools.partial(recurrent_sequence_fw, return_last_states=True, use_scan=use_scan)
    h, last = run(q, k, v, i, f, *s0)
    split = 9
    h1, mid = run(*(a[:, :, :split] for a in (q, k, v, i, f)), *s0)
    h2, last2 = run(*(a[:, :, split:] for a in (q, k, v, i, f)), *mid)
    # Same operations in the same order: equal to the last bit.
    np.testing.assert_array_equal(np.asarray(h), np.concatenate([h1, h2], axis=2))
    for a, b in zip(last, last2, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gate_shapes_equivalent():
    x = make_inputs(np.random.default_rng(6), 1, 2, 5, 4, 3)
    (q, k, v, i, f), _ = _args(x, jnp.float32)
    h3 = recurrent_sequence_fw(q, k, v, i, f, use_scan=True)
    h4 = recurrent_sequence_fw(q, k, v, i[..., None], f[..., None], use_scan=True)
    np.testing.assert_array_equal(np.asarray(h3), np.asarray(h4))


class TestDtypeRules:
    def _x(self):
        x = make_inputs(np.random.default_rng(8), 1, 2, 4, 4, 3, states=True)
        return _args(x, jnp.float32)

    def test_zeros_in_forget_gate_dtype(self):
        (q, k, v, i, f), _ = self._x()
        _, states = recurrent_sequence_fw(q, k, v, i, f.astype(jnp.bfloat16), return_last_states=True)
        assert [s.dtype for s in states] == [jnp.bfloat16] * 3

    def test_zeros_in_state_dtype(self):
        (q, k, v, i, f), _ = self._x()
        bf = [a.astype(jnp.bfloat16) for a in (q, k, v, i, f)]
        h, states = recurrent_sequence_fw(*bf, return_last_states=True, state_dtype="float32")
        assert h.dtype == jnp.bfloat16
        assert [s.dtype for s in states] == [jnp.float32] * 3
        assert [s.shape for s in states] == [(1, 2, 4, 3), (1, 2, 4), (1, 2)]

    def test_initial_state_dtypes_returned(self):
        (q, k, v, i, f), (c0, n0, m0) = self._x()
        s0 = (c0.astype(jnp.bfloat16), n0, m0.astype(jnp.float16))
        for state_dtype in (None, "float32"):
            _, states = recurrent_sequence_fw(q, k, v, i, f, *s0, return_last_states=True, state_dtype=state_dtype)
            assert [s.dtype for s in states] == [jnp.bfloat16, jnp.float32, jnp.float16]

    def test_state_dtype_accepts_dtype_objects(self):
        (q, k, v, i, f), _ = self._x()
        _, (c, _, _) = recurrent_sequence_fw(q, k, v, i, f, return_last_states=True, state_dtype=jnp.bfloat16)
        assert c.dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("use_scan", [True, False])
@pytest.mark.parametrize("states", [False, True])
def test_gradients_match_finite_differences(use_scan, states, dtype):
    """jax.vjp through both loop forms against central differences of the float64 reference."""
    x = random_inputs(11, 1, 2, 4, 3, 2, fgate="mixed", states=states)
    x["i"] = np.random.default_rng(12).uniform(-3.0, 3.0, x["i"].shape)  # keep the max away from ties
    check_gradients(functools.partial(recurrent_sequence_fw, use_scan=use_scan), x, dtype)


def test_jit_of_unrolled_loop_and_vmap():
    x = make_inputs(np.random.default_rng(13), 2, 2, 3, 4, 5, states=True)
    (q, k, v, i, f), s0 = _args(x, jnp.float32)
    eager = recurrent_sequence_fw(q, k, v, i, f, *s0)
    jitted = jax.jit(recurrent_sequence_fw, static_argnames=("use_scan",))(q, k, v, i, f, *s0, use_scan=False)
    assert_close("jit", np.asarray(eager, np.float64), jitted, TOL["float32"])
    # vmap over an extra leading axis (here: two independent problems stacked).
    stack = lambda a: jnp.stack([a, a[::-1]]) if a is not None else None
    batched = jax.vmap(lambda *a: recurrent_sequence_fw(*a, use_scan=True))(*(stack(a) for a in (q, k, v, i, f, *s0)))
    for j in range(2):
        one = recurrent_sequence_fw(*(stack(a)[j] for a in (q, k, v, i, f, *s0)), use_scan=True)
        assert_close(f"vmap[{j}]", np.asarray(one, np.float64), batched[j], TOL["float32"])


def test_custom_step_fn_is_called_with_keywords():
    calls = []

    def step(**kwargs):
        calls.append(sorted(kwargs))
        return recurrent_step_fw(**kwargs)

    x = make_inputs(np.random.default_rng(14), 1, 1, 3, 2, 2)
    (q, k, v, i, f), _ = _args(x, jnp.float32)
    h = recurrent_sequence_fw(q, k, v, i, f, mlstm_step_fn=step)
    np.testing.assert_array_equal(np.asarray(h), np.asarray(recurrent_sequence_fw(q, k, v, i, f)))
    assert calls == [["c", "eps", "f", "i", "k", "m", "n", "q", "v"]] * 3


def _grad_temp_bytes(sequence_fn, S: int, DHQK: int, DHV: int) -> int:
    """Temporary memory of the compiled gradient of sum(h) with respect to q, k, v, i, f."""
    args = (
        jax.ShapeDtypeStruct((1, 1, S, DHQK), jnp.float32),
        jax.ShapeDtypeStruct((1, 1, S, DHQK), jnp.float32),
        jax.ShapeDtypeStruct((1, 1, S, DHV), jnp.float32),
        jax.ShapeDtypeStruct((1, 1, S), jnp.float32),
        jax.ShapeDtypeStruct((1, 1, S), jnp.float32),
    )
    grad = jax.grad(lambda *a: jnp.sum(sequence_fn(*a)), argnums=(0, 1, 2, 3, 4))
    return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_scan_backward_memory_is_sublinear():
    """Reverse mode through use_scan=True keeps O(S/K + K) states, not one state per step.

    At S=4096 and a (128, 128) float32 state (64 KiB), one state per step is 256 MiB. A plain scan of the
    same step is measured too, to show that the compiled program's memory analysis sees the difference.
    """
    S, DHQK, DHV = 4096, 128, 128
    state_bytes = DHQK * DHV * 4
    input_bytes = S * (2 * DHQK + 2 * DHV + 2) * 4  # q, k, v, i, f and the output h, float32

    def plain_scan(q, k, v, i, f):
        c, n, m = jnp.zeros((1, 1, DHQK, DHV)), jnp.zeros((1, 1, DHQK)), jnp.zeros((1, 1, 1))

        def step(carry, x):
            h, carry = recurrent_step_fw(*carry, *x)
            return carry, h

        xs = (q[0, 0], k[0, 0], v[0, 0], i[0, 0, :, None], f[0, 0, :, None])
        _, h = jax.lax.scan(step, (c, n, m), tuple(x[:, None, None] for x in xs))
        return h

    plain = _grad_temp_bytes(plain_scan, S, DHQK, DHV)
    ours = _grad_temp_bytes(functools.partial(recurrent_sequence_fw, use_scan=True), S, DHQK, DHV)
    assert plain >= S * state_bytes, f"plain scan keeps {plain / 2**20:.1f} MiB, expected >= one state per step"
    # K = ceil(sqrt(4096)) = 64: 64 border states and the 64 states of one recomputed chunk (each at most
    # twice, for the state and its cotangent), plus a few copies of the per-step inputs and outputs.
    K = 64
    bound = 2 * (S // K + K) * state_bytes + 4 * input_bytes
    assert ours <= bound, f"checkpointed scan keeps {ours / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB"
    assert ours <= plain / 8
