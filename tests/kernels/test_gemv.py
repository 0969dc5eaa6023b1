"""The vector-matrix kernel (batch-1 decode projections) against a float64 product."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import INTERPRET, ON_GPU
from tests.numerics import TOL, assert_close
from xlstm_jax.kernels import GemvConfig, gemv_pallas
from xlstm_jax.kernels.gemv import gemv_fits

# (K, N, config): the automatic split (K / block_k = 6 row blocks: 3 splits reach 12 programs); one split
# walking 3 row blocks; 5 splits of one row block each (an odd split count, as xLSTM-7B's down projection
# needs: 171 row blocks in 9 splits); a single row block and column block.
CASES = [
    (192, 128, GemvConfig(block_n=32, block_k=32, min_programs=12)),
    (96, 64, GemvConfig(block_n=32, block_k=32, splits=1)),
    (80, 48, GemvConfig(block_n=16, block_k=16, splits=5)),
    (16, 16, GemvConfig(block_n=16, block_k=16)),
]


def _inputs(seed, K, N, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((1, K)), dtype)
    w = jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), dtype)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)  # the same rounded values, in float64
    return x, w, ref


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=["auto-split", "one-split", "odd-splits", "one-block"])
def test_gemv_matches_float64(case, dtype):
    K, N, config = case
    x, w, ref = _inputs(K + N, K, N, jnp.dtype(dtype))
    y = jax.jit(functools.partial(gemv_pallas, config=config, interpret=INTERPRET))(x, w)
    assert y.shape == (1, N) and y.dtype == jnp.dtype(dtype)
    assert_close("x @ w", ref, y, TOL["float32" if dtype == "float32" else "bfloat16-product"])
    y1 = gemv_pallas(x[0], w, out_dtype=jnp.float32, config=config, interpret=INTERPRET)  # x as (K,)
    assert y1.shape == (N,) and y1.dtype == jnp.float32
    assert_close("x @ w (K,)", ref[0], y1, TOL["float32"] if dtype == "float32" else TOL["bfloat16-product"])


def test_gemv_config_splits():
    assert GemvConfig().blocks(4096, 12288) == (64, 64, 2)  # 192 column blocks x 2 = 384 programs
    assert GemvConfig().blocks(10944, 4096) == (64, 64, 9)  # 171 row blocks = 9 x 19
    assert GemvConfig(splits=3).blocks(4096, 4096) == (64, 64, 3)
    assert gemv_fits(192, 128, CASES[0][2]) and not gemv_fits(100, 128, CASES[0][2])
    with pytest.raises(ValueError, match="block_n"):
        GemvConfig(block_n=48)
    with pytest.raises(ValueError, match="splits"):
        GemvConfig(splits=0)


def test_gemv_rejects_bad_inputs():
    x, w, _ = _inputs(0, 96, 64, jnp.float32)
    with pytest.raises(ValueError, match="w.shape"):
        gemv_pallas(jnp.ones((2, 96)), w, interpret=INTERPRET)
    with pytest.raises(ValueError, match="does not tile"):
        gemv_pallas(jnp.ones((1, 100)), jnp.ones((100, 64)), config=CASES[1][2], interpret=INTERPRET)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        gemv_pallas(x.astype(jnp.int32), w, interpret=INTERPRET)
    with pytest.raises(TypeError, match="GemvConfig"):
        gemv_pallas(x, w, config={"block_n": 16}, interpret=INTERPRET)


@pytest.mark.skipif(ON_GPU, reason="checks the behaviour without a GPU")
def test_gemv_without_gpu_is_an_xla_product():
    x, w, ref = _inputs(1, 96, 64, jnp.bfloat16)
    y = gemv_pallas(x, w, config=CASES[1][2])
    np.testing.assert_array_equal(
        np.asarray(y), np.asarray(jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    )
    with pytest.raises(RuntimeError, match="needs a GPU"):
        gemv_pallas(x, w, config=CASES[1][2], interpret=False)
