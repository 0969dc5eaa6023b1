"""The two norms of the xLSTM model: RMSNorm over the model width, LayerNorm per mLSTM head.

Both compute their statistics in float32 when ``force_float32_reductions`` is set (the default of the
xLSTM-7B config), cast the normalised values back to the input dtype and then scale by a learned weight
(no bias), in that order, as ``transformers``' xLSTM does.

The mLSTM layer's read-out is ``head_norm_gate``: ``y = sigmoid(o) * (LayerNorm_head(h) * weight)``, rounding
after each operation in h's dtype. ``MultiHeadLayerNorm`` and the fused decode step's read-out kernel
(``xlstm_jax.kernels.head_norm.head_norm_gate_pallas``, called by :mod:`...decode`) compute this one function.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from xlstm_jax.kernels.add_rms_norm import add_rms_norm_pallas, rms_norm
from xlstm_jax.models.xlstm_parallel.sharding import shard_map_batch_heads

__all__ = ["MultiHeadLayerNorm", "RMSNorm", "add_rms_norm", "head_norm_gate", "multihead_layer_norm"]


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
        (``add_rms_norm``)."""
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        if not normalize:
            return weight
        # The normalised values are written once, weight applied, for the products that read them. Without the
        # barrier XLA folds the weight multiply into each product's GEMM fusion, and where autotuning then runs
        # the product in cuBLAS the multiply becomes a pass of its own over the activations (xLSTM-7B's prefill
        # with unrolled blocks: two a block, each a read and write of (B, S, D)).
        return jax.lax.optimization_barrier(rms_norm(x, weight, self.eps, self.force_float32_reductions))


def add_rms_norm(
    norm: RMSNorm,
    x: jax.Array,
    residuals: tuple[jax.Array, ...] = (),
    *,
    return_sum: bool = True,
    interpret: bool | None = None,
    **side,
) -> tuple[jax.Array | None, jax.Array, jax.Array | None]:
    """``s = x + residuals`` (rounded after each add), ``norm(s)`` and optionally the gate product of ``norm(s)``
    in one kernel (``xlstm_jax.kernels.add_rms_norm_pallas``: the model's fused decode,
    ``RuntimeConfig.decode_fusion``).

    Args:
        norm: The ``RMSNorm`` module whose weight and eps are used; its statistics must be float32.
        x: (B, ..., D); residuals: each (B, ..., D) in x's dtype. Under a mesh (``jax.set_mesh``) the kernel
            runs per device on its block of B (``sharding.shard_map_batch_heads``).
        return_sum: Return s (else None: it is not written).
        interpret: The kernel's ``interpret`` argument (``RuntimeConfig.interpret``).
        side: ``side_weight`` (D, G), ``side_bias`` (G,), ``side_cap`` of ``add_rms_norm_pallas``.

    Returns:
        ``(s, norm(s), g)`` with g (..., G) float32 or None without ``side``.
    """
    if not norm.force_float32_reductions:
        raise ValueError("add_rms_norm computes the RMSNorm statistics in float32: force_float32_reductions=False")
    weight = norm(x, normalize=False)
    side_weight, side_bias, side_cap = (
        side.pop("side_weight", None),
        side.pop("side_bias", None),
        side.pop("side_cap", None),
    )
    if side:
        raise TypeError(f"add_rms_norm got unexpected keyword arguments {sorted(side)}")

    def kernel(x, weight, side_weight, side_bias, *residuals):  # one device's rows (all of them without a mesh)
        lead, D = x.shape[:-1], x.shape[-1]
        s, y, g = add_rms_norm_pallas(
            x.reshape(-1, D),
            weight,
            [r.reshape(-1, D) for r in residuals],
            eps=norm.eps,
            return_sum=return_sum,
            interpret=interpret,
            side_weight=side_weight,
            side_bias=side_bias,
            side_cap=side_cap,
        )
        return tuple(None if t is None else t.reshape(*lead, t.shape[-1]) for t in (s, y, g))

    rows = ("batch",) + (None,) * (x.ndim - 1)  # the first axis is the batch; each row is normalised alone
    kernel = shard_map_batch_heads(kernel, (rows, None, None, None) + (rows,) * len(residuals), (rows, rows, rows))
    return kernel(x, weight, side_weight, side_bias, *residuals)


def multihead_layer_norm(x: jax.Array, weight: jax.Array, eps: float, float32_stats: bool = True) -> jax.Array:
    """LayerNorm over the last axis of x (..., NH, DH), heads then merged (..., NH·DH) and times ``weight``; with
    ``float32_stats`` the statistics are float32 or x's dtype if wider (never narrowed)."""
    y = x.astype(jnp.promote_types(x.dtype, jnp.float32)) if float32_stats else x
    y = y - jnp.mean(y, axis=-1, keepdims=True)
    y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype).reshape(*x.shape[:-2], -1) * weight.astype(x.dtype)


def head_norm_gate(h: jax.Array, o: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``sigmoid(o) * multihead_layer_norm(h)``: h (..., NH, DHV), o and weight (..., NH·DHV); in h's dtype."""
    return jax.nn.sigmoid(o.astype(h.dtype)) * multihead_layer_norm(h, weight, eps)


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
    def __call__(self, x: jax.Array, *, normalize: bool = True) -> jax.Array:  # (B, S, NH, DH) -> (B, S, NH * DH)
        """The norm of x in x's dtype; with ``normalize=False`` the weight (NH * DH,) instead (x may then be any
        object with x's shape), for a kernel that normalises itself."""
        NH, DH = x.shape[-2:]
        weight = self.param("weight", nn.initializers.ones, (NH * DH,), self.param_dtype)
        if not normalize:
            return weight
        return multihead_layer_norm(x, weight, self.eps, self.force_float32_reductions)
