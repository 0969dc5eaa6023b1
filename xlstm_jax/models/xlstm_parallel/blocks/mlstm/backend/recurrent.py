"""The documented recurrent mLSTM backend (public contract; see ``shared/spec/recurrent_backend.rst``).

The math lives in :mod:`xlstm_jax.mlstm.recurrent`; this module re-exports its two functions under the
documented names and adds the thin Flax backend and its config.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

from xlstm_jax.mlstm.recurrent import recurrent_sequence_fw, recurrent_step_fw
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend, mLSTMBackendConfig

__all__ = ["mLSTMBackendRecurrent", "mLSTMBackendRecurrentConfig", "recurrent_sequence_fw", "recurrent_step_fw"]


@dataclass
class mLSTMBackendRecurrentConfig(mLSTMBackendConfig):
    """Settings of the recurrent backend.

    Attributes:
        context_length: The model's context length (-1: not set); copied by ``assign_model_config_params``.
        eps: Added to the normaliser after the max. Defaults to 1e-6.
        state_dtype: Name of the state dtype (e.g. ``"float32"``), or None for the rule of
            ``recurrent_sequence_fw``.
        use_scan: Loop over time with ``jax.lax.scan`` instead of an unrolled Python loop.
    """

    context_length: int = -1
    eps: float = 1e-6
    state_dtype: str | None = None
    use_scan: bool = False

    def __post_init__(self) -> None:
        self.check()


class mLSTMBackendRecurrent(mLSTMBackend):
    """The mLSTM in recurrent form, one step per time step (``recurrent_sequence_fw``).

    Example:
        >>> backend = mLSTMBackendRecurrent(config=mLSTMBackendRecurrentConfig(use_scan=True))
        >>> h = backend(q, k, v, i, f)  # (B, NH, S, DHV)
    """

    config: mLSTMBackendRecurrentConfig
    config_class = mLSTMBackendRecurrentConfig

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
        """Runs ``recurrent_sequence_fw`` with the config's eps, state_dtype and use_scan."""
        return recurrent_sequence_fw(
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
            use_scan=self.config.use_scan,
        )

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmaped over the heads dimension.

        The backend was not written to be independent of the heads dimension, and thus cannot be vmapped.

        Returns:
            bool: False
        """
        return False
