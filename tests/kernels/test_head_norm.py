"""The mLSTM read-out kernel (``head_norm_gate_pallas``: per-head LayerNorm and output gate after a decode step)
against float64 from the equations; interpret mode on the CPU, compiled on a GPU.

Both kernels: the Triton kernel (Pallas interpret mode on the CPU, compiled on any GPU) and the Mosaic GPU kernel
(``backend="mosaic"``: Mosaic GPU interpret mode on the CPU where JAX has it, compiled on a Hopper GPU; on the
CPU it is also lowered for CUDA)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import INTERPRET, ON_GPU
from tests.kernels.test_add_rms_norm import MOSAIC, MOSAIC_RUNS, ON_HOPPER, _kernels, needs_mosaic
from tests.numerics import TOL, assert_close
from xlstm_jax.kernels import head_norm_gate_pallas
from xlstm_jax.kernels.head_norm_mosaic import mosaic_head_norm

NORM_EPS, EPS = 1e-6, 1e-6


def f64(t):
    return np.asarray(jnp.asarray(t).astype(jnp.float32), np.float64)


def read_out_ref(h, o, weight, norm_eps=NORM_EPS):
    """``sigmoid(o) * (LayerNorm_head(h) * weight)`` in float64: h (B, NH, DHV), o and weight (B, NH·DHV)."""
    B, NH, DHV = h.shape
    h = h - h.mean(axis=-1, keepdims=True)
    y = h / np.sqrt(np.mean(h**2, axis=-1, keepdims=True) + norm_eps)
    return y.reshape(B, NH * DHV) * weight / (1 + np.exp(-o))


def _inputs(rng, B, NH, DHV, dtype, extra_before=0, extra_after=3):
    """h (B·NH, DHV), the fused array holding o after ``extra_before`` columns (B, W), weight (NH·DHV,)."""
    h = jnp.asarray(3 * rng.standard_normal((B * NH, DHV)), dtype)
    o = jnp.asarray(2 * rng.standard_normal((B, extra_before + NH * DHV + extra_after)), dtype)
    weight = jnp.asarray(1 + 0.3 * rng.standard_normal(NH * DHV), dtype)
    return h, o, weight


def _tol(dtype):
    return TOL["float32-norm"] if dtype == "float32" else TOL["bfloat16-norm"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("B", "NH", "DHV", "extra_before"), [(1, 1, 16, 0), (3, 2, 32, 64), (2, 3, 16, 40)])
def test_read_out_matches_float64(B, NH, DHV, extra_before, dtype):
    """From h itself; o read in place at a column offset that is a multiple of DHV (64) or sliced out (40)."""
    assert_read_out_matches_float64(B, NH, DHV, extra_before, 3, dtype, "triton")


@needs_mosaic
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("B", "NH", "DHV", "extra_before", "extra_after"),
    [(1, 1, 128, 0, 0), (3, 2, 256, 256, 8), (2, 3, 384, 40, 3), (1, 2, 512, 0, 3)],
    ids=["one-head", "in-place", "sliced-offset", "sliced-odd-rows"],
)
def test_mosaic_read_out_matches_float64(B, NH, DHV, extra_before, extra_after, dtype):
    """The Mosaic kernel from h itself: o read in place (rows of W a multiple of 8 columns, the offset a multiple
    of DHV) or sliced out first (an offset of 40 columns; rows of an odd length); one chunk, two, three of 128."""
    assert_read_out_matches_float64(B, NH, DHV, extra_before, extra_after, dtype, "mosaic")


def assert_read_out_matches_float64(B, NH, DHV, extra_before, extra_after, dtype, backend):
    rng = np.random.default_rng(B * 100 + DHV)
    h, o, weight = _inputs(rng, B, NH, DHV, jnp.dtype(dtype), extra_before, extra_after)
    kw = {"num_heads": NH, "o_offset": extra_before, "interpret": INTERPRET, "backend": backend}
    fn = functools.partial(head_norm_gate_pallas, **kw)
    if backend == "mosaic":  # o read in place (no slicing before the kernel) where the rows stay 16-byte aligned
        in_place = extra_before % DHV == 0 and o.shape[1] % 8 == 0
        assert ("slice[" in str(jax.make_jaxpr(fn)(h, o, weight))) != in_place
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
    assert_partial_sums_and_states(dtype, layer, 32, 16, "triton")


@needs_mosaic
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layer", [0, 2])
def test_mosaic_read_out_from_partial_sums_writes_the_states(dtype, layer):
    assert_partial_sums_and_states(dtype, layer, 128, 256, "mosaic")


def assert_partial_sums_and_states(dtype, layer, DHQK, DHV, backend):
    B, NH, P, L = 2, 3, 4, 3
    BH = B * NH
    rng = np.random.default_rng(layer)
    num = jnp.asarray(rng.standard_normal((BH, P, DHV)), jnp.float32)
    qn = jnp.asarray(rng.standard_normal((BH, P)), jnp.float32)
    m = jnp.asarray(rng.uniform(-5.0, 5.0, BH), jnp.float32).at[0].set(30.0).at[1].set(-30.0)
    n_new = jnp.asarray(rng.standard_normal((BH, DHQK)), jnp.float32)
    n_stack = jnp.asarray(rng.standard_normal((L, BH, DHQK)), jnp.float32)
    m_stack = jnp.asarray(rng.standard_normal((L, BH)), jnp.float32)
    _, o, weight = _inputs(rng, B, NH, DHV, jnp.dtype(dtype))
    kw = {"num_heads": NH, "m": m, "eps": EPS, "interpret": INTERPRET, "backend": backend}
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


@pytest.mark.parametrize("states", [False, True], ids=["h", "partial-sums-and-states"])
def test_mosaic_read_out_lowers_for_cuda_with_stacks_in_place(states):
    """Tracing and Mosaic GPU lowering succeed on any machine; with states the stacks n and m (the last two
    arguments) are aliased to the outputs n and m: donated, they are updated in place."""
    B, NH, DHQK, DHV, P, L = 2, 3, 128, 512, 4, 3
    BH, f32, bf16, S = B * NH, jnp.float32, jnp.bfloat16, jax.ShapeDtypeStruct
    if states:
        avals = (S((BH, P, DHV), f32), S((BH, P), f32), S((BH,), f32), S((BH, DHQK), f32))
        avals += (S((B, 2 * NH * DHV), bf16), S((NH * DHV,), bf16), S((L, BH, DHQK), f32), S((L, BH), f32))

        def fn(num, qn, m, n_new, o, weight, n, m_stack):
            kw = {"NH": NH, "o_offset": NH * DHV, "eps": EPS, "norm_eps": NORM_EPS, "interpret": False}
            return mosaic_head_norm(num, qn, m, (n_new, n, m_stack, 1), o, weight, **kw)

        donate = (6, 7)
    else:
        avals = (S((BH, DHV), f32), S((B, NH * DHV), f32), S((NH * DHV,), f32))

        def fn(h, o, weight):
            kw = {"NH": NH, "o_offset": 0, "eps": EPS, "norm_eps": NORM_EPS, "interpret": False}
            return mosaic_head_norm(h, None, None, None, o, weight, **kw)

        donate = ()
    text = jax.jit(fn, donate_argnums=donate).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "triton" not in text
    aliased = [line for line in text.splitlines() if "func.func public @main" in line][0]
    assert (f"%arg6: tensor<{L}x{BH}x{DHQK}xf32> {{tf.aliasing_output = 1 : i32}}" in aliased) == states
    assert (f"%arg7: tensor<{L}x{BH}xf32> {{tf.aliasing_output = 2 : i32}}" in aliased) == states
    assert states or "tf.aliasing_output" not in aliased


@pytest.mark.parametrize("backend", ["triton", MOSAIC])
def test_read_out_vmaps(backend):
    """Under ``jax.vmap`` (an extra leading axis of h and o) the kernel gives what it gives on each slice."""
    rng = np.random.default_rng(8)
    hs, os, weights = zip(*(_inputs(rng, 2, 1, 128, jnp.float32, extra_after=0) for _ in range(3)), strict=True)
    fn = functools.partial(head_norm_gate_pallas, weight=weights[0], num_heads=1, interpret=INTERPRET, backend=backend)
    batched = jax.vmap(fn)(jnp.stack(hs), jnp.stack(os))
    for b in range(3):
        np.testing.assert_array_equal(np.asarray(batched[b]), np.asarray(fn(hs[b], os[b])))


@pytest.mark.parametrize("backend", ["triton", MOSAIC])
def test_read_out_rounds_h_to_the_output_dtype(backend):
    """A float32 h with a bfloat16 o is rounded to bfloat16 first, as the XLA read-out does: the read-out equals
    the one from the rounded h bit for bit."""
    rng = np.random.default_rng(12)
    _, o, weight = _inputs(rng, 2, 2, 128, jnp.bfloat16, extra_after=0)
    h = jnp.asarray(3 * rng.standard_normal((4, 128)), jnp.float32)
    fn = functools.partial(head_norm_gate_pallas, num_heads=2, interpret=INTERPRET, backend=backend)
    y = fn(h, o, weight)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(y, np.float32), np.asarray(fn(h.astype(jnp.bfloat16), o, weight), np.float32)
    )


def test_read_out_backend_selection():
    """``"auto"`` takes the Mosaic kernel compiled on Hopper where DHV (and DHQK with states) is a multiple of 128,
    the Triton kernel otherwise and in interpret mode; ``"mosaic"`` the Mosaic kernel or an error naming the
    dimension."""
    rng = np.random.default_rng(9)
    for DHV, mosaic_covers in ((128, True), (16, False)):
        h, o, weight = _inputs(rng, 1, 2, DHV, jnp.float32)
        call = functools.partial(head_norm_gate_pallas, num_heads=2, interpret=INTERPRET)
        for backend, want in (("auto", ON_HOPPER and mosaic_covers), ("triton", False)):
            kernels = _kernels(jax.make_jaxpr(functools.partial(call, backend=backend))(h, o, weight))
            assert kernels == (["mpmd_map"] if want else ["pallas_call"])
        if MOSAIC_RUNS and mosaic_covers:
            assert _kernels(jax.make_jaxpr(functools.partial(call, backend="mosaic"))(h, o, weight)) == ["mpmd_map"]
    with pytest.raises(ValueError, match="DHV=16 must be a multiple of 128"):
        call(h, o, weight, backend="mosaic")
    h, o, weight = _inputs(rng, 1, 2, 128, jnp.float32)
    states = (jnp.ones((2, 32)), jnp.ones((3, 2, 32)), jnp.ones((3, 2)), 1)
    with pytest.raises(ValueError, match="DHQK=32 .* must be a multiple of 128"):
        call(h, o, weight, m=jnp.ones(2), states=states, backend="mosaic")
    with pytest.raises(ValueError, match="backend='cuda' must be one of"):
        call(h, o, weight, backend="cuda")


@pytest.mark.skipif(ON_GPU, reason="checks the behaviour without a GPU")
def test_read_out_compiled_needs_a_gpu():
    h, o, weight = _inputs(np.random.default_rng(2), 1, 1, 16, jnp.float32)
    with pytest.raises(RuntimeError, match="GPU"):
        head_norm_gate_pallas(h, o, weight, num_heads=1, interpret=False)
