"""The base class of every mLSTM backend: a thin Flax module around one pure form of the cell."""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax

from xlstm_jax.mlstm.checks import check_eps, resolve_state_dtype

__all__ = ["mLSTMBackend", "mLSTMBackendConfig"]


class mLSTMBackendConfig:
    """Checks shared by the backend configs (dataclasses): call from ``__post_init__``."""

    def check(self) -> None:
        check_eps(self.eps)
        resolve_state_dtype(self.state_dtype)

    def assign_model_config_params(self, model_config: Any) -> None:
        """Copies the model-wide settings the backend needs (the context length) from ``model_config``."""
        self.context_length = model_config.context_length


class mLSTMBackend(nn.Module):
    """An mLSTM backend: maps (q, k, v, i, f) and optional initial states to h (and the last states).

    Subclasses set ``config_class``, implement ``__call__`` by delegating to a pure function of
    ``xlstm_jax.mlstm`` and say whether they can be vmapped over the heads dimension.
    """

    config: Any
    config_class: ClassVar[type]

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
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmapped over the heads dimension."""
        raise NotImplementedError(f"{type(self).__name__} must implement can_vmap_over_heads")
