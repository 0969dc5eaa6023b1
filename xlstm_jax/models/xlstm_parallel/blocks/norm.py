"""The two norms of the xLSTM model: RMSNorm over the model width, LayerNorm per mLSTM head.

Both compute their statistics in float32 when ``force_float32_reductions`` is set (the default of the
xLSTM-7B config), cast the normalised values back to the input dtype and then scale by a learned weight
(no bias), in that order, as ``transformers``' xLSTM does.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["MultiHeadLayerNorm", "RMSNorm"]


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x², -1) + eps) * weight`` over the last axis.

    Attributes:
        eps: Added to the mean square.
        force_float32_reductions: Compute the statistics in float32.
        param_dtype: Dtype of the weight (D,).
    """

    eps: float = 1e-6
    force_float32_reductions: bool = True
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, normalize: bool = True) -> jax.Array:  # (..., D) -> (..., D) in x's dtype
        """``RMSNorm(x)``; with ``normalize=False`` the weight (D,) instead, for a kernel that normalises x itself
        (``decode_matmul_pallas``: the same parameter, used in the product's prologue)."""
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        if not normalize:
            return weight
        y = x.astype(jnp.float32) if self.force_float32_reductions else x
        y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * weight.astype(x.dtype)


class MultiHeadLayerNorm(nn.Module):
    """LayerNorm of each head's vector (mean removed, biased variance), heads merged, then ``* weight``.

    Attributes:
        eps: Added to the variance.
        force_float32_reductions: Compute the statistics in float32.
        param_dtype: Dtype of the weight (NH * DH,).
    """

    eps: float = 1e-6
    force_float32_reductions: bool = True
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (B, S, NH, DH) -> (B, S, NH * DH) in x's dtype
        B, S, NH, DH = x.shape
        weight = self.param("weight", nn.initializers.ones, (NH * DH,), self.param_dtype)
        y = x.astype(jnp.float32) if self.force_float32_reductions else x
        y = y - jnp.mean(y, axis=-1, keepdims=True)
        y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype).reshape(B, S, NH * DH) * weight.astype(x.dtype)
