"""The model's bias-free projection ``y = x W``.

``Dense`` has ``flax.linen.Dense``'s parameter (``kernel`` (in, out), LeCun-normal init) and result, so
parameter trees and checkpoints are unchanged; ``project`` is its product, shared with the fused parameters
of the mLSTM layer (one place that decides operand dtypes and precision).

``project_split`` is the product with a fused kernel whose columns are several projections side by side
(the FFN's gate and up, the mLSTM layer's q, k, v and o). Where nothing differentiates it (decode, prefill) it
is one product, split afterwards. Under differentiation with many rows (training) it is one product per column
block: the result is the same, but the fused form's cotangent would have to be concatenated back into one
(rows, N) tensor before the backward products, a copy as large as the activations (on an H200, 5% of a 1.4B
model's training step); the split form's backward sums the blocks' input gradients instead, and only the small
weight gradient is concatenated. The per-block form reads each block of the kernel as a copy of its columns (XLA
writes a column slice out before a library product), a copy of the whole kernel per call, which a call that
nothing differentiates does not need: up to 0.28 GB of xLSTM-7B's weights per block in a long prefill. A
``custom_vjp`` gives each its form (:func:`_split_product`). With few rows it is one product either way: a
launch per projection would cost more than the product.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["SPLIT_MIN_ROWS", "Dense", "project", "project_split", "project_wide"]

# Rows (the product of x's leading dimensions) from which ``project_split`` runs one product per block. Below,
# the products are bound by reading the kernel and each launch costs microseconds; above, the fused form's
# backward concatenation (rows x N values written and read) costs more than a few more launches.
SPLIT_MIN_ROWS = 2048


def project(x: jax.Array, kernel: jax.Array, dtype: Any, precision: Any = None) -> jax.Array:
    """``x (..., K) @ kernel (K, N)`` with both operands in ``dtype``, the result in ``dtype``."""
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def project_wide(x: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:
    """``x (..., K) @ kernel (K, N)`` computed and returned in ``dtype``, at least as wide as both operands.

    Where x and the kernel share a narrower dtype (a bfloat16 model's activations and weights), each product of
    two of their values is exact in ``dtype``, so the narrow operands go to the product as they are, accumulated
    in ``dtype``: the same sums, in another order. That reads x once in its own dtype and runs on the matrix
    units; widened, it is a full-precision float32 product (xLSTM-7B's gates, 16 columns, in an 8192-token
    prefill on an H100: 85.7 µs a block against 27.5). Otherwise both operands are widened to ``dtype`` and
    multiplied at full precision (no TF32).
    """
    if x.dtype == kernel.dtype and jnp.dtype(x.dtype).itemsize < jnp.dtype(dtype).itemsize:
        return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=dtype)
    return project(x, kernel, dtype, jax.lax.Precision.HIGHEST)


def project_split(
    x: jax.Array, kernel: jax.Array, sizes: Sequence[int], dtype: Any, precision: Any = None
) -> list[jax.Array]:
    """``x (..., K) @ kernel (K, N)`` split into column blocks of ``sizes`` (summing to N), each ``(..., size)``.

    The same values as ``jnp.split(project(x, kernel, ...), ...)``; one product per block from
    ``SPLIT_MIN_ROWS`` rows of x on (the module docstring says why).
    """
    if sum(sizes) != kernel.shape[-1] or min(sizes, default=0) < 1:
        raise ValueError(f"sizes={tuple(sizes)} must be positive and sum to kernel.shape[-1]={kernel.shape[-1]}")
    bounds = (0, *accumulate(sizes))
    if math.prod(x.shape[:-1]) < SPLIT_MIN_ROWS:
        return _one_product(x, kernel, bounds, dtype, precision)
    return list(_split_product(x, kernel, bounds, dtype, precision))


def _one_product(x: jax.Array, kernel: jax.Array, bounds: tuple[int, ...], dtype: Any, precision: Any) -> list:
    return jnp.split(project(x, kernel, dtype, precision), bounds[1:-1], axis=-1)


def _per_block(x: jax.Array, kernel: jax.Array, bounds: tuple[int, ...], dtype: Any, precision: Any) -> list:
    return [project(x, kernel[:, a:b], dtype, precision) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _split_product(x: jax.Array, kernel: jax.Array, bounds: tuple[int, ...], dtype: Any, precision: Any) -> tuple:
    """The blocks of ``x @ kernel``: one product where nothing differentiates the call, one per block (and their
    backward) under differentiation (module docstring)."""
    return tuple(_one_product(x, kernel, bounds, dtype, precision))


def _split_product_fwd(x, kernel, bounds, dtype, precision):
    blocks, pullback = jax.vjp(lambda x, kernel: tuple(_per_block(x, kernel, bounds, dtype, precision)), x, kernel)
    return blocks, pullback


def _split_product_bwd(bounds, dtype, precision, pullback, cotangents):
    return pullback(cotangents)


_split_product.defvjp(_split_product_fwd, _split_product_bwd)


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
