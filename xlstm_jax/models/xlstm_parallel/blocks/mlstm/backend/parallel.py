"""The mLSTM backend ``"parallel_stabilized"``: the quadratic form with initial states in and last states out.

The math lives in :func:`xlstm_jax.mlstm.parallel.parallel_stabilized_fw`; this module declares the backend
and its config.
"""

from __future__ import annotations

from dataclasses import dataclass

from xlstm_jax.mlstm.parallel import parallel_stabilized_fw
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend, mLSTMBackendConfig

__all__ = ["mLSTMBackendParallel", "mLSTMBackendParallelConfig"]


@dataclass(frozen=True)
class mLSTMBackendParallelConfig(mLSTMBackendConfig):
    """Settings of the parallel (quadratic) backend (frozen, hashable).

    Attributes:
        context_length: The model's context length (-1: not set); set by ``assign_model_config_params``.
        eps: Added to the normaliser after the max. Defaults to 1e-6.
        state_dtype: Name of the state dtype (e.g. ``"float32"``), or None for the rule of
            ``parallel_stabilized_fw`` (the initial states' dtype, else float32).
    """


class mLSTMBackendParallel(mLSTMBackend):
    """The mLSTM in quadratic form (``parallel_stabilized_fw``): O(S²) work and memory, no loop over time.

    Example:
        >>> backend = create_mlstm_backend("parallel_stabilized")
        >>> h, (c, n, m) = backend(q, k, v, i, f, return_last_states=True)  # h (B, NH, S, DHV)
    """

    config: mLSTMBackendParallelConfig
    config_class = mLSTMBackendParallelConfig
    form = staticmethod(parallel_stabilized_fw)

    @property
    def can_vmap_over_heads(self) -> bool:
        """True: every head is computed independently (the heads axis is only a batch axis of the computation)."""
        return True
