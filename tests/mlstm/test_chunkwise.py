"""The chunkwise form against the float64 reference: forward, last states, gradients, long sequences."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.mlstm.form_checks import check_forward, check_gradients, random_inputs
from tests.numerics import TOL, assert_close
from tests.reference import recurrent_ref
from xlstm_jax.mlstm.chunkwise import chunkwise_fw
from xlstm_jax.mlstm.recurrent import recurrent_sequence_fw


def chunkwise(chunk_size: int):
    return functools.partial(chunkwise_fw, chunk_size=chunk_size)


# (S, chunk_size, initial states, forget gates, input gates): odd S, chunk sizes that do not divide S,
# S smaller than a chunk, one step per chunk, extreme and saturated gates.
FLOAT64_CASES = [
    (1, 64, False, "mixed", "wide"),
    (1, 1, True, "open", "extreme"),
    (7, 3, True, "mixed", "extreme"),
    (7, 1, False, "closed", "wide"),
    (63, 64, True, "closed", "extreme"),
    (65, 16, False, "open", "extreme"),
    (65, 64, True, "mixed", "wide"),
    (257, 64, True, "mixed", "extreme"),
    (257, 100, False, "closed", "wide"),
]


@pytest.mark.parametrize(("S", "chunk_size", "states", "fgate", "igate"), FLOAT64_CASES)
def test_matches_reference_float64(S, chunk_size, states, fgate, igate):
    x = random_inputs(S + chunk_size, 2, 2, S, 5, 7, states=states, fgate=fgate, igate=igate)
    check_forward(chunkwise(chunk_size), x, "float64")


@pytest.mark.parametrize(
    ("S", "chunk_size", "unroll", "states"),
    [(65, 4, 3, True), (257, 8, 5, False), (100, 7, 16, True), (40, 5, 1, True)],
)
def test_scan_unroll_float64(S, chunk_size, unroll, states):
    """The scan over chunk borders unrolled by factors that do and do not divide the number of chunks."""
    x = random_inputs(S + unroll, 2, 2, S, 5, 7, states=states, igate="extreme")
    check_forward(functools.partial(chunkwise_fw, chunk_size=chunk_size, scan_unroll=unroll), x, "float64")


@pytest.mark.parametrize(
    ("S", "chunk_size", "states", "igate"), [(257, 64, True, "extreme"), (65, 16, False, "wide"), (7, 64, True, "wide")]
)
def test_matches_reference_float32(S, chunk_size, states, igate):
    x = random_inputs(3 * S, 2, 2, S, 6, 10, states=states, igate=igate)
    check_forward(chunkwise(chunk_size), x, "float32")


@pytest.mark.parametrize(("S", "chunk_size", "states"), [(257, 64, True), (63, 16, False)])
def test_matches_reference_bfloat16(S, chunk_size, states):
    x = random_inputs(5 * S, 2, 2, S, 16, 24, states=states, igate="extreme")
    check_forward(chunkwise(chunk_size), x, "bfloat16")


@pytest.mark.parametrize(
    ("S", "chunk_size", "unroll", "states"), [(5, 2, 16, True), (4, 3, 16, False), (3, 8, 16, True), (7, 1, 3, True)]
)
def test_gradients_float64(S, chunk_size, unroll, states):
    x = random_inputs(S, 1, 2, S, 3, 2, states=states)
    check_gradients(functools.partial(chunkwise_fw, chunk_size=chunk_size, scan_unroll=unroll), x, "float64")


def test_gradients_float32():
    x = random_inputs(11, 1, 2, 6, 3, 4, states=True)
    check_gradients(chunkwise(4), x, "float32")


def test_chunk_size_does_not_change_the_function():
    """Different chunkings of one input agree with each other to float32 rounding, not only with the reference."""
    x = random_inputs(3, 1, 2, 50, 4, 6, states=True, igate="extreme")
    args = [jnp.asarray(x[name]) for name in ("q", "k", "v", "i", "f", "c0", "n0", "m0")]
    _, _, scale = recurrent_ref(*(x[name] for name in ("q", "k", "v", "i", "f", "c0", "n0", "m0")))
    outs = [jax.jit(chunkwise(L), static_argnums=8)(*args, True) for L in (1, 7, 50, 64)]
    for (h, states), L in zip(outs[1:], (7, 50, 64), strict=True):
        assert_close(f"h at chunk_size={L} vs 1", outs[0][0], h, TOL["float32"], scale=scale)
        for name, a, b in zip("cnm", outs[0][1], states, strict=True):
            assert_close(f"{name} at chunk_size={L} vs 1", a, b, TOL["float32"])


def test_state_dtypes():
    """float32 states by default (also for bfloat16 inputs); initial states come back in their own dtypes."""
    x = random_inputs(0, 1, 2, 9, 4, 4, states=True)
    q, k, v, i, f = (jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v", "i", "f"))
    form = jax.jit(chunkwise(4), static_argnames=("return_last_states", "state_dtype"))
    h, (c, n, m) = form(q, k, v, i, f, return_last_states=True)
    assert h.dtype == jnp.bfloat16
    assert (c.dtype, n.dtype, m.dtype) == (jnp.float32,) * 3
    c0, n0, m0 = (jnp.asarray(x[name], jnp.bfloat16) for name in ("c0", "n0", "m0"))
    _, (c, n, m) = form(q, k, v, i, f, c0, n0, m0, return_last_states=True)
    assert (c.dtype, n.dtype, m.dtype) == (jnp.bfloat16,) * 3
    _, (c, n, m) = form(q, k, v, i, f, return_last_states=True, state_dtype="bfloat16")
    assert (c.dtype, n.dtype, m.dtype) == (jnp.bfloat16,) * 3


def test_gates_with_trailing_axis():
    x = random_inputs(1, 1, 2, 10, 4, 3)
    q, k, v, i, f = (jnp.asarray(x[name]) for name in ("q", "k", "v", "i", "f"))
    form = jax.jit(chunkwise(4))
    h, h1 = form(q, k, v, i, f), form(q, k, v, i[..., None], f[..., None])
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h1))


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True, "64", None])
def test_rejects_bad_chunk_size(chunk_size):
    x = random_inputs(0, 1, 1, 4, 2, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        chunkwise_fw(*(jnp.asarray(x[name]) for name in ("q", "k", "v", "i", "f")), chunk_size=chunk_size)


def test_rejects_bad_inputs():
    x = random_inputs(0, 1, 2, 4, 3, 2, states=True)
    q, k, v, i, f = (jnp.asarray(x[name]) for name in ("q", "k", "v", "i", "f"))
    with pytest.raises(ValueError, match=r"k.shape"):
        chunkwise_fw(q, k[:, :, :3], v, i, f)
    with pytest.raises(ValueError, match="initial states"):
        chunkwise_fw(q, k, v, i, f, c_initial=jnp.asarray(x["c0"]))
    with pytest.raises(ValueError, match="eps"):
        chunkwise_fw(q, k, v, i, f, eps=0.0)


def test_long_sequence_does_not_drift():
    """S = 65536 in float32: the chunkwise form and the recurrent scan stay within the float32 bound of the
    float64 reference over the whole sequence (no error growth with S), for h and the last states."""
    x = random_inputs(65536, 1, 2, 65536, 16, 16, states=True)
    names = ("q", "k", "v", "i", "f", "c0", "n0", "m0")
    h_ref, states_ref, scale = recurrent_ref(*(x[name] for name in names))
    args = [jnp.asarray(x[name], jnp.float32) for name in names]
    forms = {
        "chunkwise": jax.jit(lambda *a: chunkwise_fw(*a, return_last_states=True)),
        "recurrent scan": jax.jit(lambda *a: recurrent_sequence_fw(*a, return_last_states=True, use_scan=True)),
    }
    for form, fn in forms.items():
        h, states = fn(*args)
        assert_close(f"{form}: h", h_ref, h, TOL["float32"], scale=scale)
        for name, ref, out in zip("cnm", states_ref, states, strict=True):
            assert_close(f"{form}: {name} (last state)", ref, out, TOL["float32"])


def _summaries(NC: int, seed: int = 0):
    """Random chunk summaries (B=2, NH=3, DHQK=5) in float64: log decays with resets, nbar, ml, n0, m0."""
    keys = jax.random.split(jax.random.key(seed), 5)
    shape = (2, 3, NC)
    log_decay = jax.nn.log_sigmoid(3.0 * jax.random.normal(keys[0], shape, jnp.float64))
    log_decay = log_decay.at[0, 1, NC // 3].set(-jnp.inf).at[1, 2, NC - 1].set(-jnp.inf)
    nbar = jax.random.normal(keys[1], (*shape, 5), jnp.float64)
    ml = 4.0 * jax.random.normal(keys[2], shape, jnp.float64)
    ml = ml.at[1, 0, NC // 2].set(-jnp.inf)  # a chunk whose input gates are all closed: it adds nothing
    n0 = jax.random.normal(keys[3], (2, 3, 5), jnp.float64)
    m0 = jax.random.normal(keys[4], (2, 3), jnp.float64)
    return log_decay, nbar, ml, n0, m0


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("NC", [1, 2, 4, 5, 7, 37, 64, 100])
def test_border_normalisers_equal_the_scan(NC, blocked):
    """The associative scan's n and m before every chunk and after the last equal border_states' without c, and so
    do their gradients (float64, random summaries with resets and a closed chunk); up to 4 chunks they are composed
    one after another, beyond by lax.associative_scan. The closed form over blocks of chunks
    (border_normalisers_blocked: one block up to 4 chunks, padded blocks at 5, 7, 37 and 100, whole ones at 64)
    equals it likewise."""
    from xlstm_jax.mlstm.chunkwise import border_normalisers, border_normalisers_blocked, border_states

    if blocked:
        border_normalisers = border_normalisers_blocked  # noqa: F811

    with jax.enable_x64(True):
        args = _summaries(NC)

        def scan(log_decay, nbar, ml, n0, m0):
            (_, n_last, m_last), (_, n_b, m_b) = border_states(log_decay, None, nbar, ml, None, n0, m0, jnp.float64)
            return n_last, m_last, n_b, m_b

        def tree(log_decay, nbar, ml, n0, m0):
            (n_last, m_last), (n_b, m_b) = border_normalisers(log_decay, nbar, ml, n0, m0)
            return n_last, m_last, n_b, m_b

        tree, scan = jax.jit(tree), jax.jit(scan)  # one program each (eager dispatch of the scans' ops is slow)
        for x, y in zip(tree(*args), scan(*args), strict=True):
            assert x.shape == y.shape and x.dtype == y.dtype
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-12)

        def loss(fn, *a):  # a weighted sum of every output, so that each element's gradient is checked
            return sum(jnp.sum(jnp.sin(x + j)) for j, x in enumerate(fn(*a)))

        grads = jax.jit(jax.grad(functools.partial(loss, tree), argnums=range(5)))(*args)
        expected = jax.jit(jax.grad(functools.partial(loss, scan), argnums=range(5)))(*args)
        for g, e in zip(grads, expected, strict=True):
            assert np.all(np.isfinite(np.asarray(g)))
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["associative", "folded", "blocked"])
def test_border_normalisers_after_a_reset_into_closed_gates(form, monkeypatch):
    """A reset followed by a chunk of closed input gates empties the state (n = 0, m = -inf) and the next open
    chunk starts from it as from zero, where the step-by-step recurrence's exp(-inf - (-inf)) is NaN; by the
    associative scan, with the 6 chunks composed one after another, and in closed form over blocks of 2 chunks."""
    from xlstm_jax.mlstm import chunkwise
    from xlstm_jax.mlstm.chunkwise import border_normalisers, border_normalisers_blocked

    monkeypatch.setattr(chunkwise, "_FOLDED_CHUNKS", 6 if form == "folded" else 0)
    if form == "blocked":
        border_normalisers = border_normalisers_blocked  # noqa: F811
    with jax.enable_x64(True):
        log_decay, nbar, ml, n0, m0 = _summaries(6)
        log_decay = log_decay.at[...].set(-0.5).at[:, :, 2].set(-jnp.inf)
        ml = jnp.nan_to_num(ml, neginf=1.0).at[:, :, 2].set(-jnp.inf)  # the other chunks' inputs open
        (n_last, m_last), (n_b, m_b) = border_normalisers(log_decay, nbar, ml, n0, m0)
        assert np.all(np.asarray(m_b[:, :, 3]) == -np.inf) and np.all(np.asarray(n_b[:, :, 3]) == 0.0)
        # After chunk 3 the state is chunk 3's own summary; after chunk 4, chunk 4's on top of it.
        np.testing.assert_allclose(np.asarray(m_b[:, :, 4]), np.asarray(ml[:, :, 3]), rtol=1e-14)
        np.testing.assert_allclose(np.asarray(n_b[:, :, 4]), np.asarray(nbar[:, :, 3]), rtol=1e-14)
        assert np.all(np.isfinite(np.asarray(n_last))) and np.all(np.isfinite(np.asarray(m_last)))
