"""The mLSTM backend ``"chunkwise"``: recurrence over chunk borders, quadratic form inside chunks.

The math lives in :func:`xlstm_jax.mlstm.chunkwise.chunkwise_fw`; this module declares the backend and its
config. This is the form for training and for prefilling a prompt before recurrent decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from xlstm_jax.mlstm.chunkwise import check_chunk_size, chunkwise_fw
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend, mLSTMBackendConfig

__all__ = ["mLSTMBackendChunkwise", "mLSTMBackendChunkwiseConfig"]


@dataclass(frozen=True)
class mLSTMBackendChunkwiseConfig(mLSTMBackendConfig):
    """Settings of the chunkwise backend (frozen, hashable).

    Attributes:
        context_length: The model's context length (-1: not set); set by ``assign_model_config_params``.
        eps: Added to the normaliser after the max. Defaults to 1e-6.
        state_dtype: Name of the state dtype (e.g. ``"float32"``), or None for the rule of ``chunkwise_fw``
            (the initial states' dtype, else float32).
        chunk_size: Steps per chunk (a positive int; it need not divide the sequence length). Defaults to 256
            (the fastest of 64/128/256 on an H200 at the 7B head shape; see BENCHMARKS.md).
    """

    chunk_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        check_chunk_size(self.chunk_size)


class mLSTMBackendChunkwise(mLSTMBackend):
    """The mLSTM in chunkwise form (``chunkwise_fw``): linear in S, matrix products inside chunks.

    Example:
        >>> backend = create_mlstm_backend("chunkwise", chunk_size=64)
        >>> h, (c, n, m) = backend(q, k, v, i, f, return_last_states=True)  # h (B, NH, S, DHV)
    """

    config: mLSTMBackendChunkwiseConfig
    config_class = mLSTMBackendChunkwiseConfig
    form = staticmethod(chunkwise_fw)

    @property
    def can_vmap_over_heads(self) -> bool:
        """True: every head is computed independently (the heads axis is only a batch axis of the computation)."""
        return True
