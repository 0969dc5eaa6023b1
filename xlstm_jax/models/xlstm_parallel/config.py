"""The configuration of the xLSTM language model (the xLSTM-7B architecture, down to tiny sizes).

Field names follow the Hugging Face ``transformers`` ``xLSTMConfig`` where the two share a meaning
(``embedding_dim`` is its ``hidden_size``, ``num_blocks`` its ``num_hidden_layers``), so that
:mod:`xlstm_jax.models.xlstm_parallel.hf` maps one onto the other field by field. The config describes the
architecture only; how the model runs (backends, block loop, fused kernels) is
:class:`~xlstm_jax.models.xlstm_parallel.runtime.RuntimeConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from xlstm_jax.mlstm.checks import check_eps, resolve_state_dtype

__all__ = ["xLSTMLMConfig"]


def round_up(x: float, multiple_of: int) -> int:
    """The smallest multiple of ``multiple_of`` that is at least ``x``."""
    return int(math.ceil(x / multiple_of) * multiple_of)


@dataclass(frozen=True)
class xLSTMLMConfig:
    """Sizes and settings of an xLSTM language model.

    The model is ``embedding -> num_blocks x block -> RMSNorm -> LM head -> cap * tanh(logits / cap)``
    with block ``x + mLSTM(RMSNorm(x))``, then ``x + FFN(RMSNorm(x))``. Frozen and hashable, so it can
    be a Flax module attribute and a static argument of ``jax.jit``.

    Attributes:
        vocab_size: Number of tokens V.
        embedding_dim: Model width D.
        num_blocks: Number of blocks L.
        num_heads: mLSTM heads NH.
        qk_dim_factor: Query/key width ``int(D * qk_dim_factor)``, split into NH heads of DHQK.
        v_dim_factor: Value width ``int(D * v_dim_factor)``, split into NH heads of DHV.
        ffn_proj_factor: FFN hidden size ``D * ffn_proj_factor`` before rounding up.
        ffn_round_up_to_multiple_of: The FFN hidden size is rounded up to a multiple of this.
        gate_soft_cap: Input and forget gate pre-activations are soft-capped, ``cap * tanh(x / cap)``.
        output_logit_soft_cap: Soft cap of the logits.
        norm_eps: Epsilon of the RMS norms and of the per-head layer norm.
        eps: Epsilon of the mLSTM normaliser.
        norm_reduction_force_float32: Norm statistics in float32 whatever the activation dtype.
        add_out_norm: Kept for the Hugging Face config; ``transformers`` applies the output norm
            whatever its value, and so do we.
        tie_word_embeddings: The LM head reuses the embedding matrix.
        use_bias: Must be False (biases only on the gates), as in xLSTM-7B.
        weight_mode: Must be ``"single"`` (separate q, k, v, o and gate projections), as in xLSTM-7B.
        chunk_size: Chunk size of the Hugging Face config (its kernels); kept for the round trip.
        bos_token_id, pad_token_id, eos_token_id: Special tokens (None when absent).
        dtype: Activation (compute) dtype, e.g. ``"bfloat16"``. With float32 the projections multiply in full
            float32 (``matmul_precision``): GPUs would otherwise round their operands to TF32.
        param_dtype: Parameter dtype.
        state_dtype: Dtype of the carried mLSTM states (c, n, m); float32 unless memory forces less.
    """

    vocab_size: int = 50304
    embedding_dim: int = 4096
    num_blocks: int = 32
    num_heads: int = 8
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64
    gate_soft_cap: float = 15.0
    output_logit_soft_cap: float = 30.0
    norm_eps: float = 1e-6
    eps: float = 1e-6
    norm_reduction_force_float32: bool = True
    add_out_norm: bool = True
    tie_word_embeddings: bool = False
    use_bias: bool = False
    weight_mode: str = "single"
    chunk_size: int = 64
    bos_token_id: int | None = 0
    pad_token_id: int | None = 1
    eos_token_id: int | None = 2
    dtype: str = "float32"
    param_dtype: str = "float32"
    state_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embedding_dim", "num_blocks", "num_heads", "ffn_round_up_to_multiple_of"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        if self.use_bias:
            raise ValueError("use_bias=True is not supported: the xLSTM-7B architecture has biases only on the gates")
        if self.weight_mode != "single":
            raise ValueError(f"weight_mode={self.weight_mode!r} is not supported; only 'single' (as in xLSTM-7B)")
        for name in ("qk_dim", "v_dim"):
            width = getattr(self, name)
            if width < self.num_heads or width % self.num_heads:
                raise ValueError(
                    f"{name}={width} (embedding_dim={self.embedding_dim} x {name}_factor) must be a positive "
                    f"multiple of num_heads={self.num_heads}"
                )
        for name in ("gate_soft_cap", "output_logit_soft_cap", "norm_eps"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {name}={value!r}")
        check_eps(self.eps)
        for name in ("dtype", "param_dtype", "state_dtype"):
            resolve_state_dtype(getattr(self, name))  # raises ValueError unless a floating dtype name

    # Derived sizes. transformers' layer uses int(D * factor) for the projection widths.
    @property
    def qk_dim(self) -> int:
        return int(self.embedding_dim * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.embedding_dim * self.v_dim_factor)

    @property
    def qk_head_dim(self) -> int:
        """DHQK."""
        return self.qk_dim // self.num_heads

    @property
    def v_head_dim(self) -> int:
        """DHV."""
        return self.v_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return round_up(self.embedding_dim * self.ffn_proj_factor, self.ffn_round_up_to_multiple_of)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def matmul_precision(self) -> jax.lax.Precision | None:
        """Precision of the model's projections: HIGHEST for 32-bit (or wider) activations, else the default."""
        return jax.lax.Precision.HIGHEST if self.compute_dtype.itemsize >= 4 else None

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_state_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.state_dtype)

    def replace(self, **changes: Any) -> xLSTMLMConfig:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Number of parameters of the model."""
        D, L = self.embedding_dim, self.num_blocks
        layer = D * (2 * self.qk_dim + 2 * self.v_dim) + 2 * (D + 1) * self.num_heads + self.v_dim + self.v_dim * D
        ffn = 3 * D * self.ffn_dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * D
        return self.vocab_size * D + L * (layer + ffn + 2 * D) + D + head

    @classmethod
    def xlstm_7b(cls, **changes: Any) -> xLSTMLMConfig:
        """The xLSTM-7B preset: D=4096, 32 blocks, 8 heads (DHQK=256, DHV=512), vocabulary 50304, bf16."""
        preset = {"vocab_size": 50304, "embedding_dim": 4096, "num_blocks": 32, "num_heads": 8}
        preset.update(dtype="bfloat16", param_dtype="bfloat16")
        return cls(**{**preset, **changes})

    @classmethod
    def tiny(cls, **changes: Any) -> xLSTMLMConfig:
        """A tiny float32 preset for tests: D=128, 2 blocks, 2 heads (DHQK=32, DHV=64), vocabulary 99."""
        preset = {"vocab_size": 99, "embedding_dim": 128, "num_blocks": 2, "num_heads": 2}
        return cls(**{**preset, **changes})
