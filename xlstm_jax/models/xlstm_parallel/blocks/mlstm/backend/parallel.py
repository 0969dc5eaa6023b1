"""The mLSTM backend ``"parallel_stabilized"``: the quadratic form with initial states in and last states out.

The math lives in :func:`xlstm_jax.mlstm.parallel.parallel_stabilized_fw`; this module adds the thin Flax
backend and its config.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

from xlstm_jax.mlstm.parallel import parallel_stabilized_fw
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend, mLSTMBackendConfig

__all__ = ["mLSTMBackendParallel", "mLSTMBackendParallelConfig"]


@dataclass
class mLSTMBackendParallelConfig(mLSTMBackendConfig):
    """Settings of the parallel (quadratic) backend.

    Attributes:
        context_length: The model's context length (-1: not set); copied by ``assign_model_config_params``.
        eps: Added to the normaliser after the max. Defaults to 1e-6.
        state_dtype: Name of the state dtype (e.g. ``"float32"``), or None for the rule of
            ``parallel_stabilized_fw`` (the initial states' dtype, else float32).
    """

    context_length: int = -1
    eps: float = 1e-6
    state_dtype: str | None = None

    def __post_init__(self) -> None:
        self.check()


class mLSTMBackendParallel(mLSTMBackend):
    """The mLSTM in quadratic form (``parallel_stabilized_fw``): O(S²) work and memory, no loop over time.

    Example:
        >>> backend = create_mlstm_backend("parallel_stabilized")
        >>> h, (c, n, m) = backend(q, k, v, i, f, return_last_states=True)  # h (B, NH, S, DHV)
    """

    config: mLSTMBackendParallelConfig
    config_class = mLSTMBackendParallelConfig

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
        """Runs ``parallel_stabilized_fw`` with the config's eps and state_dtype."""
        return parallel_stabilized_fw(
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
        )

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmapped over the heads dimension.

        Every head is computed independently (the heads axis is only a batch axis of the computation).

        Returns:
            bool: True
        """
        return True
