"""The model's bias-free projection ``y = x W``.

``Dense`` has ``flax.linen.Dense``'s parameter (``kernel`` (in, out), LeCun-normal init) and result, so
parameter trees and checkpoints are unchanged; ``project`` is its product, shared with the fused parameters
of the mLSTM layer (one place that decides operand dtypes and precision).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["Dense", "project"]


def project(x: jax.Array, kernel: jax.Array, dtype: Any, precision: Any = None) -> jax.Array:
    """``x (..., K) @ kernel (K, N)`` with both operands in ``dtype``, the result in ``dtype``."""
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


class Dense(nn.Module):
    """``x W`` without bias; the parameter and result of ``flax.linen.Dense(use_bias=False)``.

    Attributes:
        features: Output width N.
        dtype: Compute dtype (operands and result).
        param_dtype: Dtype of ``kernel`` (K, N).
        precision: ``dot_general`` precision (HIGHEST for float32 models).
    """

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, multiply: bool = True) -> jax.Array:  # (..., K) -> (..., N)
        """``x W``; with ``multiply=False`` the kernel W (K, N) instead, for a fused kernel that multiplies."""
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.param_dtype)
        if not multiply:
            return kernel
        return project(x, kernel, self.dtype, self.precision)
