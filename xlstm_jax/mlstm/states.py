"""The dtype rules of the carried states (c, n, m), shared by every form of the cell.

- Without initial states, the states start at zero in ``state_dtype`` or, when that is None, in the
  form's default dtype (the forget gate's dtype for the documented recurrent form).
- With initial states, they are cast to ``state_dtype`` only when it is given; otherwise the
  computation runs in ``c_initial``'s dtype. The returned last states come back in the dtypes of the
  initial states, so carrying states from call to call never changes their dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from xlstm_jax.mlstm.checks import SequenceDims, check_initial_states

__all__ = ["States", "cast_states", "prepare_states"]

States = tuple[jax.Array, jax.Array, jax.Array]  # c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH)


def prepare_states(
    c_initial: Any,  # (B, NH, DHQK, DHV) or None
    n_initial: Any,  # (B, NH, DHQK) or None
    m_initial: Any,  # (B, NH) or None
    dims: SequenceDims,
    state_dtype: jnp.dtype | None,
    default_dtype: Any,
) -> tuple[States, tuple[Any, Any, Any]]:
    """Checks the initial states and returns them in the compute state dtype.

    Returns:
        ``((c, n, m), out_dtypes)``: the states to start from, all in one dtype, and the dtypes in which
        the last states must be returned.
    """
    given = check_initial_states(c_initial, n_initial, m_initial, dims)
    if given is None:
        dtype = state_dtype if state_dtype is not None else jnp.dtype(default_dtype)
        B, NH, _, DHQK, DHV = dims
        states = (
            jnp.zeros((B, NH, DHQK, DHV), dtype),
            jnp.zeros((B, NH, DHQK), dtype),
            jnp.zeros((B, NH), dtype),
        )
        return states, (dtype, dtype, dtype)
    out_dtypes = tuple(x.dtype for x in given)
    dtype = state_dtype if state_dtype is not None else given[0].dtype
    return tuple(jnp.asarray(x, dtype) for x in given), out_dtypes


def cast_states(states: States, dtypes: tuple[Any, Any, Any]) -> States:
    """Casts each state to its dtype (a no-op where it already has it)."""
    return tuple(x.astype(d) for x, d in zip(states, dtypes, strict=True))
