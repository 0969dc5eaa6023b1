"""The recurrent mLSTM backend on the fused Pallas sequence kernel (``"recurrent_pallas"``).

Thin Flax wrapper around :func:`xlstm_jax.kernels.recurrent_sequence_pallas`: same function as the
documented recurrent backend with float32 states, one kernel launch per call instead of several XLA
kernels per time step. Without a GPU it falls back to the XLA recurrent form unless ``interpret=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.config import SequenceKernelConfig
from xlstm_jax.kernels.recurrent_sequence import recurrent_sequence_pallas
from xlstm_jax.mlstm.checks import resolve_state_dtype
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend, mLSTMBackendConfig

__all__ = ["mLSTMBackendRecurrentPallas", "mLSTMBackendRecurrentPallasConfig"]


@dataclass
class mLSTMBackendRecurrentPallasConfig(mLSTMBackendConfig):
    """Settings of the fused recurrent backend.

    Attributes:
        context_length: The model's context length (-1: not set); copied by ``assign_model_config_params``.
        eps: Added to the normaliser after the max. Defaults to 1e-6.
        state_dtype: None or ``"float32"``: the kernel keeps its states in float32.
        kernel_config: Block sizes (a frozen, hashable dataclass), or None for the tuned default of the
            head shape, ``SequenceKernelConfig.get_default(DHQK, DHV)``.
        interpret: None: the compiled kernel on a GPU and the XLA recurrent form elsewhere; True: Pallas
            interpret mode (slow; for tests); False: the compiled kernel (raises without a GPU).
    """

    context_length: int = -1
    eps: float = 1e-6
    state_dtype: str | None = None
    kernel_config: SequenceKernelConfig | None = None
    interpret: bool | None = None

    def __post_init__(self) -> None:
        self.check()
        if resolve_state_dtype(self.state_dtype) not in (None, jnp.dtype(jnp.float32)):
            raise ValueError(f"the recurrent_pallas backend keeps its states in float32; got {self.state_dtype=}")
        if self.kernel_config is not None and not isinstance(self.kernel_config, SequenceKernelConfig):
            raise TypeError(
                f"kernel_config must be a SequenceKernelConfig or None, got {type(self.kernel_config).__name__}"
            )
        if self.interpret is not None and not isinstance(self.interpret, bool):
            raise TypeError(f"interpret must be None or a bool, got {self.interpret!r}")


class mLSTMBackendRecurrentPallas(mLSTMBackend):
    """The mLSTM in recurrent form in one fused Pallas kernel (``recurrent_sequence_pallas``).

    Example:
        >>> backend = mLSTMBackendRecurrentPallas(config=mLSTMBackendRecurrentPallasConfig())
        >>> h = backend(q, k, v, i, f)  # (B, NH, S, DHV)
    """

    config: mLSTMBackendRecurrentPallasConfig
    config_class = mLSTMBackendRecurrentPallasConfig

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
        """Runs ``recurrent_sequence_pallas`` with the config's settings."""
        return recurrent_sequence_pallas(
            q, k, v, i, f,
            c_initial=c_initial, n_initial=n_initial, m_initial=m_initial,
            return_last_states=return_last_states,
            eps=self.config.eps,
            state_dtype=self.config.state_dtype,
            config=self.config.kernel_config,
            interpret=self.config.interpret,
        )  # fmt: skip

    @property
    def can_vmap_over_heads(self) -> bool:
        """False: the kernel takes the heads dimension as part of its grid and is not tested under vmap."""
        return False
