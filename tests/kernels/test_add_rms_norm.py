"""The residual add, RMSNorm and mLSTM gate product of the decode step (``add_rms_norm_pallas``) against a
float64 computation of the same function; interpret mode on the CPU, compiled on a GPU.

Both kernels: the Triton kernel (Pallas interpret mode on the CPU, compiled on any GPU) and the Mosaic GPU kernel
(``backend="mosaic"``: Mosaic GPU interpret mode on the CPU where JAX has it, compiled on a Hopper GPU; on the
CPU it is also lowered for CUDA)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from tests.kernels import INTERPRET, ON_GPU
from tests.numerics import TOL, assert_close
from xlstm_jax.kernels import add_rms_norm_pallas
from xlstm_jax.kernels.add_rms_norm_mosaic import mosaic_add_rms_norm
from xlstm_jax.kernels.mosaic import mosaic_interpret_params
from xlstm_jax.kernels.recurrent_step_mosaic import device_supports_mosaic

CAP, EPS = 15.0, 1e-6
ON_HOPPER = ON_GPU and device_supports_mosaic()
MOSAIC_RUNS = ON_HOPPER or (INTERPRET and mosaic_interpret_params() is not None)
needs_mosaic = pytest.mark.skipif(
    not MOSAIC_RUNS, reason="the Mosaic GPU kernel runs compiled on Hopper GPUs, or in Mosaic GPU interpret mode"
)
MOSAIC = pytest.param("mosaic", marks=needs_mosaic)


def _arrays(rng, M, K, G, residuals, dtype, scale=1.0):
    def a(shape, s=1.0, dt=dtype):
        return jnp.asarray(s * rng.standard_normal(shape), dt)

    x = a((M, K), scale)
    rs = [a((M, K), scale) for _ in range(residuals)]
    weight = jnp.asarray(1 + 0.3 * rng.standard_normal(K), dtype)
    # gate pre-activations up to ~±40: the soft cap (15) both near-linear and saturated
    side = {"side_weight": a((K, G), 10 / np.sqrt(K), jnp.float32), "side_bias": a((G,), 5, jnp.float32)} if G else {}
    return x, rs, weight, side


def _reference(x, rs, weight, side):
    """From the equations in float64 (the same rounded inputs, no intermediate rounding): s, y, g and the error
    scale of g (sum_k |y_k w_kj| + |b_j|)."""
    f = lambda t: np.asarray(t, np.float64)  # noqa: E731
    s = f(x) + sum((f(r) for r in rs), np.zeros(x.shape))
    y = s / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + EPS) * f(weight)
    if not side:
        return s, y, None, None
    w, b = f(side["side_weight"]), f(side["side_bias"])
    return s, y, CAP * np.tanh((y @ w + b) / CAP), np.abs(y) @ np.abs(w) + np.abs(b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("M", "K", "G", "residuals"),
    [
        (1, 256, 16, 1),  # the model's layer norm: one pending residual, the gates (one chunk of the row)
        (1, 96, 0, 2),  # the FFN's norm: two residuals; 96 = 3 chunks of 32
        (3, 4096, 5, 0),  # xLSTM-7B's width, an odd gate count, no residual (the first block)
        (16, 160, 8, 2),  # 16 rows, 5 chunks of 32
    ],
)
def test_add_rms_norm_matches_float64(M, K, G, residuals, dtype):
    assert_matches_float64(M, K, G, residuals, dtype, "triton")


@needs_mosaic
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(
    ("M", "K", "G", "residuals"),
    [
        (1, 256, 16, 1),  # the model's layer norm: one chunk of 256
        (2, 384, 3, 2),  # three chunks of 128 (K an odd multiple of 128), two residuals
        (3, 4096, 5, 0),  # xLSTM-7B's width: 16 chunks in registers, an odd gate count, no residual
    ],
)
def test_mosaic_add_rms_norm_matches_float64(M, K, G, residuals, dtype):
    assert_matches_float64(M, K, G, residuals, dtype, "mosaic")


def assert_matches_float64(M, K, G, residuals, dtype, backend):
    rng = np.random.default_rng(M * 1000 + K + G)
    x, rs, weight, side = _arrays(rng, M, K, G, residuals, jnp.dtype(dtype))
    if dtype == "bfloat16":
        weight = weight.astype(jnp.float32)  # a float32 weight on bfloat16 rows, cast to the rows' dtype
    kw = {**side, "side_cap": CAP} if side else {}
    fn = jax.jit(functools.partial(add_rms_norm_pallas, eps=EPS, interpret=INTERPRET, backend=backend, **kw))
    s, y, g = fn(x, weight, rs)
    s_ref, y_ref, g_ref, g_scale = _reference(x, rs, weight.astype(x.dtype), side)
    tol = TOL["float32-norm"] if dtype == "float32" else TOL["bfloat16-norm"]
    assert s.dtype == y.dtype == x.dtype and s.shape == y.shape == x.shape
    assert_close("s", s_ref, s, tol)
    assert_close("y", y_ref, y, tol)
    if G:
        assert g.dtype == jnp.float32 and g.shape == (M, G)
        assert_close("gates", g_ref, g, tol, scale=g_scale)
    else:
        assert g is None


@pytest.mark.parametrize("backend", ["triton", MOSAIC])
@pytest.mark.parametrize("scale", [1e-3, 300.0], ids=["tiny-rows", "large-rows"])
def test_add_rms_norm_row_scale(scale, backend):
    """Rows far from unit size: at 1e-3 the mean square (~2e-6) is comparable to eps, which the reference
    includes; at 300 the squares reach ~1e5."""
    rng = np.random.default_rng(7)
    x, rs, weight, side = _arrays(rng, 2, 128, 4, 1, jnp.dtype(jnp.float32), scale=scale)
    kw = {"eps": EPS, "side_cap": CAP, "interpret": INTERPRET, "backend": backend}
    s, y, g = add_rms_norm_pallas(x, weight, rs, **kw, **side)
    s_ref, y_ref, g_ref, g_scale = _reference(x, rs, weight, side)
    assert_close("s", s_ref, s, TOL["float32-norm"])
    assert_close("y", y_ref, y, TOL["float32-norm"])
    assert_close("gates", g_ref, g, TOL["float32-norm"], scale=g_scale)


def test_add_rms_norm_return_sum():
    rng = np.random.default_rng(3)
    x, rs, weight, _ = _arrays(rng, 2, 64, 0, 1, jnp.dtype(jnp.float32))
    s, y, g = add_rms_norm_pallas(x, weight, rs, return_sum=False, interpret=INTERPRET)
    assert s is None and g is None
    _, y_ref, _, _ = _reference(x, rs, weight, {})
    assert_close("y", y_ref, y, TOL["float32-norm"])
    s, _, _ = add_rms_norm_pallas(x, weight, interpret=INTERPRET)  # no residuals: s is x itself
    assert s is x


@pytest.mark.parametrize("backend", ["triton", MOSAIC])
def test_add_rms_norm_vmaps(backend):
    """Under ``jax.vmap`` (an extra leading axis) the kernel gives what it gives on each slice."""
    rng = np.random.default_rng(11)
    xs, rs, weight, side = zip(*(_arrays(rng, 2, 128, 3, 1, jnp.dtype(jnp.float32)) for _ in range(3)), strict=True)
    kw = {"eps": EPS, "side_cap": CAP, "interpret": INTERPRET, "backend": backend}
    fn = functools.partial(add_rms_norm_pallas, **kw, **side[0])
    batched = jax.vmap(lambda x, r: fn(x, weight[0], [r]))(jnp.stack(xs), jnp.stack([r[0] for r in rs]))
    for b in range(3):
        for got, want in zip(batched, fn(xs[b], weight[0], rs[b]), strict=True):
            np.testing.assert_array_equal(np.asarray(got[b]), np.asarray(want))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": np.ones((4,), np.float32)}, ValueError, r"rows x \(M, K\)"),
        ({"weight": np.ones((5,), np.float32)}, ValueError, r"weight.shape=\(5,\) must be \(K,\)=\(8,\)"),
        ({"residuals": [np.ones((2, 4), np.float32)]}, ValueError, r"residuals\[0\].shape=\(2, 4\)"),
        ({"residuals": [np.ones((2, 8), jnp.bfloat16)]}, TypeError, r"residuals\[0\].dtype=bfloat16"),
        ({"x": np.ones((2, 8), np.int32)}, TypeError, "x.dtype=int32"),
        ({"side_weight": np.ones((8, 3), np.float32)}, ValueError, "side_bias"),
        ({"side_bias": np.ones((3,), np.float32)}, ValueError, "need side_weight"),
        (
            {"side_weight": np.ones((7, 3), np.float32), "side_bias": np.ones(3, np.float32), "side_cap": 1.0},
            ValueError,
            r"side_weight.shape=\(7, 3\)",
        ),
    ],
)
def test_add_rms_norm_rejects_bad_input(kwargs, error, match):
    args = {"x": np.ones((2, 8), np.float32), "weight": np.ones((8,), np.float32), **kwargs}
    args = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    if "residuals" in args:
        args["residuals"] = [jnp.asarray(r) for r in args["residuals"]]
    with pytest.raises(error, match=match):
        add_rms_norm_pallas(**args, interpret=INTERPRET)


@pytest.mark.skipif(ON_GPU, reason="checks the behaviour without a GPU")
def test_add_rms_norm_compiled_needs_a_gpu():
    x = jnp.ones((1, 8), jnp.float32)
    with pytest.raises(RuntimeError, match="GPU"):
        add_rms_norm_pallas(x, jnp.ones((8,)), interpret=False)


def _kernels(jaxpr) -> list[str]:
    """The kernel launches anywhere in a jaxpr: ``pallas_call`` (Triton) or ``mpmd_map`` (``pl.kernel``, Mosaic)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("pallas_call", "mpmd_map"):
            found.append(eqn.primitive.name)
        else:
            for sub in jaxprs_in_params(eqn.params):
                found += _kernels(sub)
    return found


@pytest.mark.parametrize(
    ("M", "K", "G", "residuals", "dtype"),
    [(2, 4096, 16, 2, jnp.bfloat16), (1, 384, 0, 0, jnp.float16), (3, 128, 5, 1, jnp.float32)],
)
def test_mosaic_add_rms_norm_lowers_for_cuda(M, K, G, residuals, dtype):
    """Tracing and Mosaic GPU lowering (chunked loads, reductions, the gate branch) succeed on any machine."""
    S = jax.ShapeDtypeStruct
    side = (S((G, K), jnp.float32), S((G,), jnp.float32)) if G else None

    def fn(x, rs, weight, side):
        return mosaic_add_rms_norm(x, rs, weight, side, eps=EPS, write_sum=bool(rs), cap=CAP, interpret=False)

    avals = (S((M, K), dtype), [S((M, K), dtype)] * residuals, S((K,), jnp.float32), side)
    text = jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "triton" not in text


def test_add_rms_norm_backend_selection():
    """``"auto"`` takes the Mosaic kernel compiled on Hopper for a K it covers and the Triton kernel otherwise
    (and in interpret mode); ``"triton"`` always the Triton kernel; ``"mosaic"`` the Mosaic kernel or an error."""
    rng = np.random.default_rng(5)
    for K, mosaic_covers in ((256, True), (96, False)):
        x, rs, weight, side = _arrays(rng, 2, K, 3, 1, jnp.dtype(jnp.float32))
        call = functools.partial(add_rms_norm_pallas, eps=EPS, side_cap=CAP, interpret=INTERPRET, **side)
        for backend, want in (("auto", ON_HOPPER and mosaic_covers), ("triton", False)):
            kernels = _kernels(jax.make_jaxpr(functools.partial(call, backend=backend))(x, weight, rs))
            assert kernels == (["mpmd_map"] if want else ["pallas_call"])
        if MOSAIC_RUNS and mosaic_covers:
            assert _kernels(jax.make_jaxpr(functools.partial(call, backend="mosaic"))(x, weight, rs)) == ["mpmd_map"]
        if not mosaic_covers:
            with pytest.raises(ValueError, match="K=96 must be a multiple of 128 and at most 8192"):
                call(x, weight, rs, backend="mosaic")
    with pytest.raises(ValueError, match="K=8320 must be a multiple of 128 and at most 8192"):
        add_rms_norm_pallas(jnp.ones((1, 8320)), jnp.ones(8320), interpret=INTERPRET, backend="mosaic")
    with pytest.raises(ValueError, match="backend='cuda' must be one of"):
        add_rms_norm_pallas(jnp.ones((1, 128)), jnp.ones(128), backend="cuda")
