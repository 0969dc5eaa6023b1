"""The mLSTM backend ``"chunkwise"``: recurrence over chunk borders, quadratic form inside chunks.

The math lives in :func:`xlstm_jax.mlstm.chunkwise.chunkwise_fw`; this module adds the thin Flax backend
and its config. This is the form for training and for prefilling a prompt before recurrent decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

from xlstm_jax.mlstm.chunkwise import check_chunk_size, chunkwise_fw
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend, mLSTMBackendConfig

__all__ = ["mLSTMBackendChunkwise", "mLSTMBackendChunkwiseConfig"]


@dataclass
class mLSTMBackendChunkwiseConfig(mLSTMBackendConfig):
    """Settings of the chunkwise backend.

    Attributes:
        context_length: The model's context length (-1: not set); copied by ``assign_model_config_params``.
        eps: Added to the normaliser after the max. Defaults to 1e-6.
        state_dtype: Name of the state dtype (e.g. ``"float32"``), or None for the rule of ``chunkwise_fw``
            (the initial states' dtype, else float32).
        chunk_size: Steps per chunk (a positive int; it need not divide the sequence length). Defaults to 256
            (the fastest of 64/128/256 on an H200 at the 7B head shape; see BENCHMARKS.md).
    """

    context_length: int = -1
    eps: float = 1e-6
    state_dtype: str | None = None
    chunk_size: int = 256

    def __post_init__(self) -> None:
        self.check()
        check_chunk_size(self.chunk_size)


class mLSTMBackendChunkwise(mLSTMBackend):
    """The mLSTM in chunkwise form (``chunkwise_fw``): linear in S, matrix products inside chunks.

    Example:
        >>> backend = create_mlstm_backend("chunkwise", chunk_size=64)
        >>> h, (c, n, m) = backend(q, k, v, i, f, return_last_states=True)  # h (B, NH, S, DHV)
    """

    config: mLSTMBackendChunkwiseConfig
    config_class = mLSTMBackendChunkwiseConfig

    def __call__(
        self,
        q: jax.Array,  # (B, NH, S, DHQK)
        k: jax.Array,  # (B, NH, S, DHQK)
        v: jax.Array,  # (B, NH, S, DHV)
        i: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
        f: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
        c_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
        n_initial: jax.Array | None = None,  # (B, NH, DHQK)
        m_initial: jax.Array | None = None,  # (B, NH)
        return_last_states: bool = False,
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
        """Runs ``chunkwise_fw`` with the config's eps, state_dtype and chunk_size."""
        return chunkwise_fw(
            q,
            k,
            v,
            i,
            f,
            c_initial=c_initial,
            n_initial=n_initial,
            m_initial=m_initial,
            return_last_states=return_last_states,
            eps=self.config.eps,
            state_dtype=self.config.state_dtype,
            chunk_size=self.config.chunk_size,
        )

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmapped over the heads dimension.

        Every head is computed independently (the heads axis is only a batch axis of the computation).

        Returns:
            bool: True
        """
        return True
