"""The decode-step product with its fused norm, gated activation, residual and gate side product, against a
float64 computation of the same function."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import INTERPRET, ON_GPU
from tests.numerics import TOL, assert_close
from xlstm_jax.kernels import DecodeMatmulConfig, decode_matmul_pallas
from xlstm_jax.kernels.decode_matmul import decode_matmul_fits

# K = 80 rows: block_k 32 is halved to 16 (5 row blocks); N = 48 columns in blocks of 16 (3 column blocks).
K, N, G, CAP = 80, 48, 8, 15.0
CONFIGS = {
    "loop": DecodeMatmulConfig(block_n=16, block_k=32, num_stages=2),
    "prefetch2": DecodeMatmulConfig(block_n=16, block_k=32, num_stages=1, prefetch=2),
    "fma-prefetch1": DecodeMatmulConfig(block_n=16, block_k=32, num_stages=1, prefetch=1, fma=True),  # M=1 only
}
FUSIONS = ["plain", "norm+side", "norm+glu+residual"]


def _arrays(rng, M, fusion, dtype, row_scale=1.0):
    def a(shape, scale=1.0, dt=dtype):
        return jnp.asarray(scale * rng.standard_normal(shape), dt)

    x = a((M, K), row_scale)
    kw = {}
    if "norm" in fusion:
        kw["norm_weight"] = jnp.asarray(1 + 0.2 * rng.standard_normal(K), dtype)
    if "glu" in fusion:
        kw["glu"] = True
    if "residual" in fusion:
        kw["residual"] = a((M, N))
    if "side" in fusion:  # the mLSTM gates: a float32 weight and bias, pre-activations up to ~±30 before the cap
        kw.update(side_weight=a((K, G), 3 / np.sqrt(K), jnp.float32), side_bias=a((G,), 3, jnp.float32), side_cap=CAP)
    w = a((K, 2 * N if "glu" in fusion else N), 1 / np.sqrt(K))
    return x, w, kw


def _reference(x, w, kw, eps=1e-6):
    """The function in float64 from the equations (same bf16-rounded inputs, no intermediate rounding)."""
    f = lambda t: np.asarray(t, np.float64)  # noqa: E731
    x = f(x)
    if "norm_weight" in kw:
        x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * f(kw["norm_weight"])
    y = x @ f(w)
    if kw.get("glu"):
        gate, up = np.split(y, 2, axis=-1)
        y = gate / (1 + np.exp(-gate)) * up
    if "residual" in kw:
        y = y + f(kw["residual"])
    if "side_weight" not in kw:
        return y, None
    return y, CAP * np.tanh((x @ f(kw["side_weight"]) + f(kw["side_bias"])) / CAP)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_decode_matmul_matches_float64(M, dtype, fusion, config):
    rng = np.random.default_rng(M * 100 + len(fusion))
    x, w, kw = _arrays(rng, M, fusion, jnp.dtype(dtype), row_scale=30.0 if "norm" in fusion else 1.0)
    fn = jax.jit(functools.partial(decode_matmul_pallas, config=CONFIGS[config], interpret=INTERPRET, **kw))
    out = fn(x, w)
    y, side = out if "side" in fusion else (out, None)
    ref_y, ref_side = _reference(x, w, kw)
    assert y.shape == ref_y.shape and y.dtype == x.dtype
    tol = TOL["float32"] if dtype == "float32" else TOL["bfloat16-fused-product"]
    assert_close("y", ref_y, y, tol)
    if side is not None:
        assert side.shape == (M, G) and side.dtype == jnp.float32
        assert_close("side", ref_side, side, tol)  # float32 arithmetic on the (bf16-rounded) normalised rows


def test_decode_matmul_config_blocks():
    assert DecodeMatmulConfig().blocks(10944, 4096) == (64, 64)  # 10944 = 64 x 171: block_k 128 halved
    assert DecodeMatmulConfig(block_n=128).blocks(4096, 32) == (32, 128)
    assert DecodeMatmulConfig().blocks(96, 48) == (32, 32)  # powers of two within the weight (Triton tiles)
    assert not decode_matmul_fits(96, 48, DecodeMatmulConfig())  # 48 columns are not a multiple of 32
    assert decode_matmul_fits(80, 96, CONFIGS["loop"], glu=True)
    assert not decode_matmul_fits(80, 40, CONFIGS["loop"])  # 40 columns are not a multiple of 16
    with pytest.raises(ValueError, match="block_n"):
        DecodeMatmulConfig(block_n=8)
    with pytest.raises(ValueError, match="prefetch"):
        DecodeMatmulConfig(prefetch=-1)


def test_decode_matmul_rejects_bad_inputs():
    rng = np.random.default_rng(0)
    x, w, kw = _arrays(rng, 2, "norm+side", jnp.float32)
    call = functools.partial(decode_matmul_pallas, config=CONFIGS["loop"], interpret=INTERPRET)
    with pytest.raises(ValueError, match="M <= 16"):
        call(jnp.ones((17, K)), w)
    with pytest.raises(ValueError, match="w.shape"):
        call(x, w[:-1])
    with pytest.raises(ValueError, match="norm_weight.shape"):
        call(x, w, norm_weight=jnp.ones(K + 1))
    with pytest.raises(ValueError, match="residual.shape"):
        call(x, w, residual=jnp.ones((2, N + 1)))
    with pytest.raises(ValueError, match="side_bias"):
        call(x, w, side_weight=kw["side_weight"], side_cap=CAP)
    with pytest.raises(ValueError, match="power of two"):
        call(x, w, side_weight=jnp.ones((K, 6)), side_bias=jnp.ones(6), side_cap=CAP)
    with pytest.raises(ValueError, match="even"):
        call(x, w[:, :-1], glu=True)
    with pytest.raises(TypeError, match="x.dtype"):
        call(x, w.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="DecodeMatmulConfig"):
        decode_matmul_pallas(x, w, config={"block_n": 16}, interpret=INTERPRET)
    with pytest.raises(ValueError, match="does not tile"):
        call(x[:, :40], jnp.ones((40, 40)))


@pytest.mark.skipif(ON_GPU, reason="checks the behaviour without a GPU")
def test_decode_matmul_without_gpu_is_xla():
    rng = np.random.default_rng(1)
    x, w, kw = _arrays(rng, 3, "norm+glu+residual", jnp.float32)
    y = decode_matmul_pallas(x, w, config=CONFIGS["loop"], **kw)  # the XLA computation
    assert_close("y (XLA)", _reference(x, w, kw)[0], y, TOL["float32"])
    with pytest.raises(RuntimeError, match="needs a GPU"):
        decode_matmul_pallas(x, w, config=CONFIGS["loop"], interpret=False, **kw)
