"""The mLSTM read-out kernel (``head_norm_gate_pallas``: per-head LayerNorm and output gate after a decode step)
against float64 from the equations; interpret mode on the CPU, compiled on a GPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import INTERPRET, ON_GPU
from tests.numerics import TOL, assert_close
from xlstm_jax.kernels import head_norm_gate_pallas

NORM_EPS, EPS = 1e-6, 1e-6


def f64(t):
    return np.asarray(jnp.asarray(t).astype(jnp.float32), np.float64)


def read_out_ref(h, o, weight, norm_eps=NORM_EPS):
    """``sigmoid(o) * (LayerNorm_head(h) * weight)`` in float64: h (B, NH, DHV), o and weight (B, NH·DHV)."""
    B, NH, DHV = h.shape
    h = h - h.mean(axis=-1, keepdims=True)
    y = h / np.sqrt(np.mean(h**2, axis=-1, keepdims=True) + norm_eps)
    return y.reshape(B, NH * DHV) * weight / (1 + np.exp(-o))


def _inputs(rng, B, NH, DHV, dtype, extra_before=0):
    """h (B·NH, DHV), the fused array holding o after ``extra_before`` columns (B, W), weight (NH·DHV,)."""
    h = jnp.asarray(3 * rng.standard_normal((B * NH, DHV)), dtype)
    o = jnp.asarray(2 * rng.standard_normal((B, extra_before + NH * DHV + 3)), dtype)
    weight = jnp.asarray(1 + 0.3 * rng.standard_normal(NH * DHV), dtype)
    return h, o, weight


def _tol(dtype):
    return TOL["float32-norm"] if dtype == "float32" else TOL["bfloat16-norm"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("B", "NH", "DHV", "extra_before"), [(1, 1, 16, 0), (3, 2, 32, 64), (2, 3, 16, 40)])
def test_read_out_matches_float64(B, NH, DHV, extra_before, dtype):
    """From h itself; o read in place at a column offset that is a multiple of DHV (64) or sliced out (40)."""
    rng = np.random.default_rng(B * 100 + DHV)
    h, o, weight = _inputs(rng, B, NH, DHV, jnp.dtype(dtype), extra_before)
    fn = functools.partial(head_norm_gate_pallas, num_heads=NH, o_offset=extra_before, interpret=INTERPRET)
    y = jax.jit(fn)(h, o, weight)
    assert y.shape == (B, NH * DHV) and y.dtype == jnp.dtype(dtype)
    o_cols = f64(o)[:, extra_before : extra_before + NH * DHV]
    ref = read_out_ref(f64(h).reshape(B, NH, DHV), o_cols, f64(weight))
    assert_close("read-out", ref, y, _tol(dtype))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layer", [0, 2])
def test_read_out_from_partial_sums_writes_the_states(dtype, layer):
    """From the step's partial sums over P=4 DHQK splits, combined with m' (extreme values included), and the
    step's n', m' written into slice ``layer`` of stacks of L=3 layers; the other layers unchanged."""
    B, NH, DHQK, DHV, P, L = 2, 3, 32, 16, 4, 3
    BH = B * NH
    rng = np.random.default_rng(layer)
    num = jnp.asarray(rng.standard_normal((BH, P, DHV)), jnp.float32)
    qn = jnp.asarray(rng.standard_normal((BH, P)), jnp.float32)
    m = jnp.asarray(rng.uniform(-5.0, 5.0, BH), jnp.float32).at[0].set(30.0).at[1].set(-30.0)
    n_new = jnp.asarray(rng.standard_normal((BH, DHQK)), jnp.float32)
    n_stack = jnp.asarray(rng.standard_normal((L, BH, DHQK)), jnp.float32)
    m_stack = jnp.asarray(rng.standard_normal((L, BH)), jnp.float32)
    _, o, weight = _inputs(rng, B, NH, DHV, jnp.dtype(dtype))
    kw = {"num_heads": NH, "m": m, "eps": EPS, "interpret": INTERPRET}
    fn = jax.jit(
        lambda num, qn, o, w, n_new, ns, ms: head_norm_gate_pallas(
            (num, qn), o, w, states=(n_new, ns, ms, layer), **kw
        ),
        donate_argnums=(5, 6),
    )
    y, (n_out, m_out) = fn(num, qn, o, weight, n_new, jnp.copy(n_stack), jnp.copy(m_stack))
    den = np.maximum(np.abs(f64(qn).sum(axis=1)), np.exp(-f64(m))) + EPS
    h = f64(num).sum(axis=1) / den[:, None]
    if dtype == "bfloat16":  # the read-out rounds h to the output dtype first, as the XLA read-out does
        h = f64(jnp.asarray(h, jnp.float32).astype(jnp.bfloat16))
    ref = read_out_ref(h.reshape(B, NH, DHV), f64(o)[:, : NH * DHV], f64(weight))
    assert y.dtype == jnp.dtype(dtype)
    assert_close("read-out", ref, y, _tol(dtype))
    np.testing.assert_array_equal(np.asarray(n_out[layer]), np.asarray(n_new))
    np.testing.assert_array_equal(np.asarray(m_out[layer]), np.asarray(m))
    for other in set(range(L)) - {layer}:
        np.testing.assert_array_equal(np.asarray(n_out[other]), np.asarray(n_stack[other]))
        np.testing.assert_array_equal(np.asarray(m_out[other]), np.asarray(m_stack[other]))


def test_read_out_aliases_the_state_stacks():
    """n and m stacks are aliased to the outputs (updated in place when donated); nothing else is."""
    rng = np.random.default_rng(0)
    h, o, weight = _inputs(rng, 1, 2, 16, jnp.float32)
    states = (jnp.ones((2, 16)), jnp.ones((3, 2, 16)), jnp.ones((3, 2)), 1)
    fn = functools.partial(head_norm_gate_pallas, num_heads=2, m=jnp.ones(2), states=states, interpret=INTERPRET)
    jaxpr = jax.make_jaxpr(fn)(h, o, weight)
    (call,) = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert tuple(call.params["input_output_aliases"]) == ((5, 1), (6, 2))
    assert [v.aval.shape for v in call.invars[5:]] == [(3, 2, 16), (3, 2, 1)]


def test_read_out_rejects_bad_input():
    rng = np.random.default_rng(1)
    h, o, weight = _inputs(rng, 2, 2, 16, jnp.float32)
    kw = {"num_heads": 2, "interpret": INTERPRET}
    with pytest.raises(ValueError, match=r"weight.shape=\(16,\) must be \(NH·DHV,\)=\(32,\)"):
        head_norm_gate_pallas(h, o, weight[:16], **kw)
    with pytest.raises(ValueError, match=r"o.shape=\(2, 20\) must be \(B, W\)"):
        head_norm_gate_pallas(h, o[:, :20], weight, **kw)
    with pytest.raises(ValueError, match=r"h must be \(BH, DHV\)"):
        head_norm_gate_pallas(h[None], o, weight, **kw)
    with pytest.raises(ValueError, match="m, the step's m'"):
        head_norm_gate_pallas((h[:, None], h[:, :1]), o, weight, **kw)
    with pytest.raises(TypeError, match="partial sums must be float32"):
        head_norm_gate_pallas((h[:, None].astype(jnp.bfloat16), h[:, :1]), o, weight, m=jnp.ones(4), **kw)
    with pytest.raises(TypeError, match="norm_eps must be a Python number"):
        jax.jit(lambda e: head_norm_gate_pallas(h, o, weight, norm_eps=e, **kw))(1e-6)
    with pytest.raises(ValueError, match="eps must be a positive"):
        head_norm_gate_pallas(h, o, weight, norm_eps=0.0, **kw)
    states = (jnp.ones((4, 16)), jnp.ones((3, 4, 16)), jnp.ones((3, 4)), 3)
    with pytest.raises(ValueError, match="layer=3 must be in"):
        head_norm_gate_pallas(h, o, weight, m=jnp.ones(4), states=states, **kw)
    with pytest.raises(TypeError, match="interpret must be a bool"):
        head_norm_gate_pallas(h, o, weight, num_heads=2, interpret=None)


@pytest.mark.skipif(ON_GPU, reason="checks the behaviour without a GPU")
def test_read_out_compiled_needs_a_gpu():
    h, o, weight = _inputs(np.random.default_rng(2), 1, 1, 16, jnp.float32)
    with pytest.raises(RuntimeError, match="GPU"):
        head_norm_gate_pallas(h, o, weight, num_heads=1, interpret=False)
