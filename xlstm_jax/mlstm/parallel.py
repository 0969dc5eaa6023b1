"""The mLSTM cell in parallel (quadratic) form, with initial states in and last states out.

With ``F_t = sum_{r<=t} logsigmoid(f_r)`` (a cumulative sum over the sequence) and the initial states
``(C0, n0, m0)`` held scaled by ``exp(-m0)``, the recurrent form unrolls to::

    log D[t, s] = F_t - F_s + i_s  for s <= t (else -inf),   log w_t = F_t + m0
    m_t  = max(log w_t, max_s log D[t, s])          # exactly the recurrent running max
    num_t = sum_s exp(log D[t, s] - m_t) (q̂_t·k_s) v_s + exp(log w_t - m_t) q̂_t·C0
    qn_t  = sum_s exp(log D[t, s] - m_t) (q̂_t·k_s)     + exp(log w_t - m_t) q̂_t·n0
    h_t   = num_t / (max(|qn_t|, exp(-m_t)) + eps)

The initial-state column ``log w`` takes part in the row max even when no state is given (then
``m0 = 0`` and ``C0 = n0 = 0``), because the recurrent running max starts from ``m0``. So this form
computes the recurrent form's function exactly, the ``eps`` term included.

Precision: the gates, the cumulative sums and the stabiliser run in float32 (or the state dtype if
wider); the products ``q·kᵀ`` take q and k in their own dtype with float32 accumulation.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from xlstm_jax.mlstm.checks import check_eps, check_sequence_inputs, resolve_state_dtype
from xlstm_jax.mlstm.stabilizer import log_forget_gate, normalize_readout
from xlstm_jax.mlstm.states import cast_states, prepare_states

__all__ = ["parallel_stabilized_fw"]

_PRECISION = jax.lax.Precision.HIGHEST


def parallel_stabilized_fw(
    q: jax.Array,  # (B, NH, S, DHQK)
    k: jax.Array,  # (B, NH, S, DHQK)
    v: jax.Array,  # (B, NH, S, DHV)
    i: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    f: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    c_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    n_initial: jax.Array | None = None,  # (B, NH, DHQK)
    m_initial: jax.Array | None = None,  # (B, NH)
    return_last_states: bool = False,
    eps: float = 1e-6,
    state_dtype: Any = None,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """The mLSTM on a whole sequence in quadratic form: O(S²) work, no loop over time.

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
        eps: Added to the normaliser after the max. Defaults to 1e-6.
        state_dtype: Dtype of the states and of the stabiliser arithmetic. If None: the initial states'
            dtype when given, else float32 (or the gates' dtype if wider).

    Returns:
        h (B, NH, S, DHV) in q's dtype, or ``(h, (c, n, m))`` with the last states shaped
        (B, NH, DHQK, DHV), (B, NH, DHQK), (B, NH) in the initial states' dtypes (the state dtype without).
    """
    dims, i, f = check_sequence_inputs(q, k, v, i, f, names=("q", "k", "v", "i", "f"))
    check_eps(eps)
    (c0, n0, m0), out_dtypes = prepare_states(
        c_initial, n_initial, m_initial, dims, resolve_state_dtype(state_dtype),
        default_dtype=jnp.promote_types(f.dtype, jnp.float32),
    )
    dtype = c0.dtype
    S = dims.S
    log_f = log_forget_gate(f[..., 0].astype(dtype))  # (B, NH, S)
    i = i[..., 0].astype(dtype)  # (B, NH, S)
    F = jnp.cumsum(log_f, axis=-1)  # (B, NH, S) inclusive
    causal = jnp.tril(jnp.ones((S, S), dtype=bool))
    log_d = jnp.where(causal, F[..., :, None] - F[..., None, :] + i[..., None, :], -jnp.inf)  # (B, NH, S, S)
    log_w = F + m0[..., None]  # (B, NH, S) weight of the initial state at each step
    m = jnp.maximum(log_w, jnp.max(log_d, axis=-1))  # (B, NH, S)
    d = jnp.exp(log_d - m[..., None])
    w = jnp.exp(log_w - m)

    scale = 1.0 / math.sqrt(dims.DHQK)
    qk = jnp.einsum("bhtd,bhsd->bhts", q, k, precision=_PRECISION, preferred_element_type=dtype) * scale
    scores = qk * d  # (B, NH, S, S)
    q_hat = q.astype(dtype) * scale
    num = jnp.einsum("bhts,bhse->bhte", scores, v.astype(dtype), precision=_PRECISION)
    num = num + w[..., None] * jnp.einsum("bhtd,bhde->bhte", q_hat, c0, precision=_PRECISION)
    qn = jnp.sum(scores, axis=-1) + w * jnp.einsum("bhtd,bhd->bht", q_hat, n0, precision=_PRECISION)
    h = normalize_readout(num, qn, m, eps).astype(q.dtype)
    if not return_last_states:
        return h

    # States after step S: the last row of the gate matrix, applied to the outer products k_s v_sᵀ.
    m_last = m[..., -1]  # (B, NH)
    d_last = d[..., -1, :]  # (B, NH, S), already scaled by exp(-m_last)
    w_last = w[..., -1]  # (B, NH)
    k_w = k.astype(dtype) * d_last[..., None]
    c_last = jnp.einsum("bhsd,bhse->bhde", k_w, v.astype(dtype), precision=_PRECISION)
    c_last = c_last + w_last[..., None, None] * c0
    n_last = jnp.sum(k_w, axis=-2) + w_last[..., None] * n0
    return h, cast_states((c_last, n_last, m_last), out_dtypes)
