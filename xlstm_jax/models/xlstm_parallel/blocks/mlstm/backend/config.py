"""The generic mLSTM backend: one thin Flax module that runs a form's pure function with its config.

Each backend (``"recurrent"``, ``"parallel_stabilized"``, ``"chunkwise"``, ``"recurrent_pallas"``) is a
subclass of :class:`mLSTMBackend` that only declares its config class, its pure function and whether it can
be vmapped over heads; the call itself is written once, here. Configs are frozen dataclasses, so backends
are hashable and ``jax.jit(backend)`` works.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import flax.linen as nn
import jax

from xlstm_jax.mlstm.checks import check_eps, resolve_state_dtype

__all__ = ["mLSTMBackend", "mLSTMBackendConfig"]


@dataclass(frozen=True)
class mLSTMBackendConfig:
    """The settings every backend config has; each backend's config adds its own fields after these.

    Configs are frozen (hashable), so that a backend can be a static argument of ``jax.jit`` or be jitted
    itself. ``context_length`` is the one exception: :meth:`assign_model_config_params` sets it in place,
    because that is how the documented method is called (for its effect, on a config already built). No form
    uses the context length, so it takes no part in equality and hashing (``compare=False``): setting it never
    changes the hash of a config already in use as a static argument.

    Attributes:
        context_length: The model's context length (-1: not set); copied by ``assign_model_config_params``.
        eps: Added to the normaliser after the max. Defaults to 1e-6.
        state_dtype: Name of the state dtype (e.g. ``"float32"``), or None for the form's rule.
    """

    context_length: int = dataclasses.field(default=-1, compare=False)
    eps: float = 1e-6
    state_dtype: str | None = None

    def __post_init__(self) -> None:
        check_eps(self.eps)
        resolve_state_dtype(self.state_dtype)
        _check_context_length(self.context_length)

    def assign_model_config_params(self, model_config: Any) -> None:
        """Copies the model-wide settings the backend needs (the context length) from ``model_config``.

        The config is updated in place (see the class docstring for why that keeps it hashable).

        Raises:
            TypeError: ``model_config`` has no ``context_length``.
            ValueError: its context length is not -1 or a positive integer.
        """
        if not hasattr(model_config, "context_length"):
            raise TypeError(f"model_config must have a context_length, got {type(model_config).__name__}")
        _check_context_length(model_config.context_length)
        object.__setattr__(self, "context_length", model_config.context_length)

    def form_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the form's function: every field but ``context_length``, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "context_length"}


def _check_context_length(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or value > 0):
        raise ValueError(f"context_length must be -1 (not set) or a positive integer, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raises ``TypeError`` unless ``value`` is a bool (config flags: ``"false"`` is not False)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


class mLSTMBackend(nn.Module):
    """An mLSTM backend: maps (q, k, v, i, f) and optional initial states to h (and the last states).

    The generic backend: ``__call__`` runs the subclass's ``form`` (a pure function of ``xlstm_jax.mlstm`` or
    ``xlstm_jax.kernels`` with the signature of the sequence forms and a keyword ``segment_ids``) with
    ``config.form_kwargs()``. A subclass
    sets ``config_class`` and ``form`` and says whether it can be vmapped over the heads dimension.

    Raises:
        TypeError: ``config`` is not an instance of the backend's ``config_class`` (None included), at
            construction.
    """

    config: Any
    config_class: ClassVar[type[mLSTMBackendConfig]]
    form: ClassVar[Callable[..., Any]]

    def __post_init__(self) -> None:
        if not isinstance(self.config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs config={self.config_class.__name__}(...), got "
                f"{type(self.config).__name__}: {self.config!r}"
            )
        super().__post_init__()

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
        *,
        segment_ids: jax.Array | None = None,  # (B, S) int
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
        """Runs the backend's form with the config's settings.

        Args:
            q: Queries (B, NH, S, DHQK).
            k: Keys (B, NH, S, DHQK).
            v: Values (B, NH, S, DHV).
            i: Input gate pre-activations (B, NH, S) or (B, NH, S, 1).
            f: Forget gate pre-activations (B, NH, S) or (B, NH, S, 1).
            c_initial: Initial memory state (B, NH, DHQK, DHV), or None for zeros.
            n_initial: Initial normaliser state (B, NH, DHQK), or None for zeros.
            m_initial: Initial max state (B, NH), or None for zeros. Give all three states or none.
            return_last_states: Also return the states after the last step.
            segment_ids: Optional (B, S) integer document ids of packed rows: a position whose id differs from
                the previous one starts a document from zero states (c, n and m); only the row's first document
                starts from the initial states (:mod:`xlstm_jax.mlstm.segments`). None: one document per row.

        Returns:
            h (B, NH, S, DHV), or ``(h, (c, n, m))`` with the last states (B, NH, DHQK, DHV), (B, NH, DHQK),
            (B, NH), as the form returns them.
        """
        return type(self).form(
            q,
            k,
            v,
            i,
            f,
            c_initial=c_initial,
            n_initial=n_initial,
            m_initial=m_initial,
            return_last_states=return_last_states,
            segment_ids=segment_ids,
            **self.config.form_kwargs(),
        )

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmapped over the heads dimension (set by each backend)."""
        raise NotImplementedError(f"{type(self).__name__} must define can_vmap_over_heads")
