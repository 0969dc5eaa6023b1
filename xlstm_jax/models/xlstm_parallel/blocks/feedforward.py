"""The gated feed-forward network of the xLSTM block: ``down(silu(gate(x)) * up(x))``."""

from __future__ import annotations

import flax.linen as nn
import jax

from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig

__all__ = ["FeedForward"]


class FeedForward(nn.Module):
    """Gated FFN with hidden size ``config.ffn_dim`` (``D * ffn_proj_factor`` rounded up), no biases.

    Parameter names follow ``transformers``: ``proj_up_gate``, ``proj_up`` (D -> ffn_dim) and
    ``proj_down`` (ffn_dim -> D), each a kernel of shape (in, out).
    """

    config: xLSTMLMConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (B, S, D) -> (B, S, D)
        cfg = self.config

        def dense(features: int, name: str) -> nn.Dense:
            return nn.Dense(
                features, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.jnp_param_dtype, name=name
            )

        hidden = nn.silu(dense(cfg.ffn_dim, "proj_up_gate")(x)) * dense(cfg.ffn_dim, "proj_up")(x)
        return dense(cfg.embedding_dim, "proj_down")(hidden)
