"""The mLSTM layer's read-out after the cell: per-head LayerNorm of h, then the output gate.

``y = sigmoid(o) * (LayerNorm_head(h) * weight)``: each head's h (DHV,) has its mean removed and is divided
by its (biased) standard deviation, statistics in float32, the result cast back to h's dtype and scaled by a
learned weight (no bias); the heads are merged and multiplied by ``sigmoid(o)``, rounding after each operation
in h's dtype, as ``transformers``' xLSTM does. The model's ``MultiHeadLayerNorm`` and the fused decode step
(``recurrent_step_pallas_stacked(..., head_norm=...)``) compute this one function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["head_norm_gate", "multihead_layer_norm"]


def multihead_layer_norm(x: jax.Array, weight: jax.Array, eps: float, float32_stats: bool = True) -> jax.Array:
    """LayerNorm over the last axis of x (..., NH, DH), heads then merged (..., NH·DH) and times ``weight``."""
    y = x.astype(jnp.float32) if float32_stats else x
    y = y - jnp.mean(y, axis=-1, keepdims=True)
    y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype).reshape(*x.shape[:-2], -1) * weight.astype(x.dtype)


def head_norm_gate(h: jax.Array, o: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``sigmoid(o) * multihead_layer_norm(h)``: h (..., NH, DHV), o and weight (..., NH·DHV); in h's dtype."""
    return jax.nn.sigmoid(o.astype(h.dtype)) * multihead_layer_norm(h, weight, eps)
