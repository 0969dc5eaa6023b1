"""The gated feed-forward network of the xLSTM block: ``down(silu(gate(x)) * up(x))``.

The gate and up projections are one matrix product with one fused kernel ``proj_gate_up`` (D, 2 ffn_dim),
gate columns first: x is read once and one kernel is launched instead of two (at batch 1 decode these are
the largest matrix-vector products of the block). :mod:`...hf` joins and splits ``transformers``'
``proj_up_gate`` and ``proj_up`` on load and save.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from xlstm_jax.models.xlstm_parallel.blocks.dense import Dense
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig

__all__ = ["FeedForward"]


class FeedForward(nn.Module):
    """Gated FFN with hidden size ``config.ffn_dim`` (``D * ffn_proj_factor`` rounded up), no biases.

    Parameters: ``proj_gate_up/kernel`` (D, 2 ffn_dim), ``transformers``' ``proj_up_gate`` and
    ``proj_up`` side by side, and ``proj_down/kernel`` (ffn_dim, D); kernels are (in, out).

    Attributes:
        config: The model config.
    """

    config: xLSTMLMConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (B, S, D) -> (B, S, D)
        cfg = self.config

        def dense(features: int, name: str) -> Dense:
            return Dense(features, cfg.compute_dtype, cfg.jnp_param_dtype, cfg.matmul_precision, name=name)

        gate, up = jnp.split(dense(2 * cfg.ffn_dim, "proj_gate_up")(x), 2, axis=-1)  # (B, S, ffn_dim) each
        hidden = nn.silu(gate) * up
        return dense(cfg.embedding_dim, "proj_down")(hidden)
