"""The configuration of the xLSTM language model (the xLSTM-7B architecture, down to tiny sizes).

Field names follow the Hugging Face ``transformers`` ``xLSTMConfig`` where the two share a meaning
(``embedding_dim`` is its ``hidden_size``, ``num_blocks`` the number of blocks its model builds), and the
defaults are its defaults, so that :mod:`xlstm_jax.models.xlstm_parallel.hf` maps one onto the other. The
config describes the architecture only; how the model runs (backends, block loop, fused kernels) is
:class:`~xlstm_jax.models.xlstm_parallel.runtime.RuntimeConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["round_up", "xLSTMLMConfig"]


def round_up(x: float, multiple_of: int) -> int:
    """``floor((x + multiple_of - 1) / multiple_of) * multiple_of``: transformers' rounding of the FFN width.

    For an integer ``x`` this is the smallest multiple of ``multiple_of`` that is at least ``x``. For a
    fractional ``x`` that exceeds a multiple by less than 1 it rounds down to that multiple (e.g.
    ``round_up(48.32, 16) == 48``), exactly as ``transformers`` sizes the layer.
    """
    return int((x + multiple_of - 1) // multiple_of) * multiple_of


_INT_FIELDS = ("vocab_size", "embedding_dim", "num_blocks", "num_heads", "ffn_round_up_to_multiple_of")
_POSITIVE_FLOAT_FIELDS = (
    "qk_dim_factor",
    "v_dim_factor",
    "ffn_proj_factor",
    "gate_soft_cap",
    "output_logit_soft_cap",
    "norm_eps",
    "eps",
)
_BOOL_FIELDS = ("norm_reduction_force_float32", "tie_word_embeddings")
_TOKEN_FIELDS = ("bos_token_id", "pad_token_id", "eos_token_id")
_DTYPE_FIELDS = ("dtype", "param_dtype", "state_dtype")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


@dataclass(frozen=True)
class xLSTMLMConfig:
    """Sizes and settings of an xLSTM language model.

    The model is ``embedding -> num_blocks x block -> RMSNorm -> LM head -> cap * tanh(logits / cap)``
    with block ``x + mLSTM(RMSNorm(x))``, then ``x + FFN(RMSNorm(x))``. Frozen and hashable, so it can
    be a Flax module attribute and a static argument of ``jax.jit``. Every field is checked at
    construction: a value of the wrong type (``"128"`` for 128, ``"false"`` for False, ``128.0`` where an
    int belongs) or out of range raises naming the field; an unknown field name raises ``TypeError``.
    NumPy scalars are accepted and stored as Python ``int``/``float``/``bool``, dtypes as their names.

    Attributes:
        vocab_size: Number of tokens V.
        embedding_dim: Model width D.
        num_blocks: Number of blocks L.
        num_heads: mLSTM heads NH.
        qk_dim_factor: Query/key width ``int(D * qk_dim_factor)``, split into NH heads of DHQK.
        v_dim_factor: Value width ``int(D * v_dim_factor)``, split into NH heads of DHV.
        ffn_proj_factor: FFN hidden size ``D * ffn_proj_factor`` before rounding (see :func:`round_up`).
        ffn_round_up_to_multiple_of: The FFN hidden size is rounded to a multiple of this.
        gate_soft_cap: Input and forget gate pre-activations are soft-capped, ``cap * tanh(x / cap)``.
        output_logit_soft_cap: Soft cap of the logits.
        norm_eps: Epsilon of the RMS norms and of the per-head layer norm.
        eps: Epsilon of the mLSTM normaliser.
        norm_reduction_force_float32: Norm statistics in float32 whatever the activation dtype.
        tie_word_embeddings: The LM head reuses the embedding matrix (no ``lm_head`` parameter).
        bos_token_id: Beginning-of-sequence token (None when absent). The model and generation do not use
            it; it is kept so that a Hugging Face ``config.json`` survives a load and save unchanged.
        pad_token_id: Token placed after a sequence's end by generation (None when absent).
        eos_token_id: Token that ends a sequence in generation (None when absent).
        dtype: Activation (compute) dtype, e.g. ``"bfloat16"``. With float32 the projections multiply in full
            float32 (``matmul_precision``): GPUs would otherwise round their operands to TF32.
        param_dtype: Parameter dtype.
        state_dtype: Dtype of the carried mLSTM states (c, n, m); float32 unless memory forces less.

    Raises:
        TypeError: a field of the wrong type, or an unknown field name.
        ValueError: a field out of range, or widths that do not split into ``num_heads`` heads.
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
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    pad_token_id: int | None = 1
    eos_token_id: int | None = 2
    dtype: str = "float32"
    param_dtype: str = "float32"
    state_dtype: str = "float32"

    def __post_init__(self) -> None:
        def store(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"{name} must be an int, got {name}={value!r} ({type(value).__name__})")
            if value < 1:
                raise ValueError(f"{name} must be positive, got {name}={value!r}")
            store(name, int(value))
        for name in _POSITIVE_FLOAT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool | np.bool_):
                raise TypeError(f"{name} must be a number, got {name}={value!r} ({type(value).__name__})")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {name}={value!r}")
            store(name, float(value))
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool | np.bool_):
                raise TypeError(f"{name} must be a bool, got {name}={value!r} ({type(value).__name__})")
            store(name, bool(value))
        for name in _TOKEN_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_int(value):
                raise TypeError(f"{name} must be an int or None, got {name}={value!r} ({type(value).__name__})")
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} must be a token id in [0, vocab_size={self.vocab_size}), got {name}={value}")
            store(name, int(value))
        for name in _DTYPE_FIELDS:
            value = getattr(self, name)
            try:
                dtype = jnp.dtype(value)
            except TypeError:
                raise ValueError(
                    f"{name}={value!r} is not a dtype; use a floating dtype name such as 'float32' or 'bfloat16'"
                ) from None
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"{name} must be a floating-point dtype, got {name}={value!r}")
            store(name, dtype.name)
        for name in ("qk_dim", "v_dim"):
            width = getattr(self, name)
            if width < self.num_heads or width % self.num_heads:
                raise ValueError(
                    f"{name}={width} (int(embedding_dim={self.embedding_dim} x {name}_factor="
                    f"{getattr(self, name + '_factor')})) must be a positive multiple of num_heads={self.num_heads}"
                )
        if self.ffn_dim < 1:
            raise ValueError(
                f"the FFN width is 0: embedding_dim={self.embedding_dim} x ffn_proj_factor={self.ffn_proj_factor} "
                f"rounds to 0 at ffn_round_up_to_multiple_of={self.ffn_round_up_to_multiple_of}"
            )

    # Derived sizes, as transformers' layer computes them.
    @property
    def qk_dim(self) -> int:
        """Query/key width ``int(D * qk_dim_factor)``."""
        return int(self.embedding_dim * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        """Value width ``int(D * v_dim_factor)``."""
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
        """FFN hidden width: ``round_up(D * ffn_proj_factor, ffn_round_up_to_multiple_of)``."""
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
        """Number of parameters of the model (without a separate LM head when the embeddings are tied).

        Per block: the q, k, v and output-gate projections ``D (2 qk + 2 v)``, the input and forget gates
        with biases ``2 NH (D + 1)``, the per-head norm ``v``, the output projection ``v D``, the gated FFN
        ``3 D ffn`` and the two pre-norms ``2 D``; plus the embedding ``V D``, the output norm ``D`` and the
        LM head ``V D``.
        """
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
