"""The gated feed-forward network of the xLSTM block: ``down(silu(gate(x)) * up(x))``.

The gate and up projections share one fused kernel ``proj_gate_up`` (D, 2 ffn_dim), gate columns first:
with few rows (decode) they are one product, x read once and one kernel launched instead of two (at batch 1
these are the largest matrix-vector products of the block); with many rows, one product each
(``dense.project_split``). :mod:`...hf` joins and splits ``transformers``'
``proj_up_gate`` and ``proj_up`` on load and save.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from xlstm_jax.models.xlstm_parallel.blocks.dense import Dense, project_split
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

        kernel = dense(2 * cfg.ffn_dim, "proj_gate_up")(x, multiply=False)  # (D, 2 ffn_dim)
        sizes = (cfg.ffn_dim, cfg.ffn_dim)
        gate, up = project_split(x, kernel, sizes, cfg.compute_dtype, cfg.matmul_precision)  # (B, S, ffn_dim) each
        hidden = nn.silu(gate) * up
        return dense(cfg.embedding_dim, "proj_down")(hidden)
