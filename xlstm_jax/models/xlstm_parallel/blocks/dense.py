"""The model's bias-free projection ``y = x W``, with the batch-1 decode product on the Pallas kernel.

``Dense`` has ``flax.linen.Dense``'s parameter (``kernel`` (in, out), LeCun-normal init) and result, so
parameter trees and checkpoints are unchanged. With ``gemv`` set and a single token (B·S = 1), the product
runs in :func:`xlstm_jax.kernels.gemv_pallas` (a vector-matrix kernel that fills the GPU where XLA's GEMM
for one row does not; the XLA product without a GPU); otherwise it is XLA's ``dot_general``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xlstm_jax.kernels import GemvConfig, gemv_pallas
from xlstm_jax.kernels.gemv import gemv_fits

__all__ = ["Dense", "project"]


def project(x: jax.Array, kernel: jax.Array, dtype: Any, precision: Any = None, gemv: bool = False) -> jax.Array:
    """``x (..., K) @ kernel (K, N)`` with both operands in ``dtype``, the result in ``dtype``.

    With ``gemv``, one row (x.size == K) and a kernel the default ``GemvConfig`` tiles, the product runs in
    the Pallas vector-matrix kernel (float32 accumulation, like XLA's product).
    """
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    K, N = kernel.shape
    if gemv and x.size == K and gemv_fits(K, N, GemvConfig()):
        return gemv_pallas(x.reshape(1, K), kernel, out_dtype=dtype).reshape(*x.shape[:-1], N)
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


class Dense(nn.Module):
    """``x W`` without bias; the parameter and result of ``flax.linen.Dense(use_bias=False)``.

    Attributes:
        features: Output width N.
        dtype: Compute dtype (operands and result).
        param_dtype: Dtype of ``kernel`` (K, N).
        precision: ``dot_general`` precision (HIGHEST for float32 models).
        gemv: Use the Pallas vector-matrix kernel for a single token (see :func:`project`).
    """

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    gemv: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (..., K) -> (..., N)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.param_dtype)
        return project(x, kernel, self.dtype, self.precision, self.gemv)
