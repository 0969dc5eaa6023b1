"""The mLSTM cell in recurrent form: one step, and a sequence as a loop of steps.

For each batch element and head, with states c (DHQK, DHV), n (DHQK) and the running max m::

    m' = max(logsigmoid(f) + m, i),   f' = exp(logsigmoid(f) + m - m'),   i' = exp(i - m')
    c' = f' c + i' k vᵀ,              n' = f' n + i' k
    h  = (q̂ᵀ c') / (max(|q̂ᵀ n'|, exp(-m')) + eps),   q̂ = q / sqrt(DHQK)

A forget gate pre-activation of -inf (forget gate 0) gives logsigmoid(f) = -inf and f' = 0: the state is reset.
This form is the definition the other forms follow at such gates (see :mod:`xlstm_jax.mlstm.stabilizer`).
Packed documents (:func:`recurrent_sequence_segments_fw`): before a document's first step the states are set
to zero, c = n = 0 and m = 0 (:mod:`xlstm_jax.mlstm.segments`).

Precision: the state dtype is c's dtype. q, k, v and the gates are upcast to it, so the state update,
the read-out products q̂·c' and q̂·n' and the division all run in the state dtype; only h is cast back
to q's dtype. (Reading out in bfloat16 would lose about three significant digits.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from xlstm_jax.mlstm.checks import (
    check_eps,
    check_sequence_inputs,
    check_step_inputs,
    resolve_state_dtype,
)
from xlstm_jax.mlstm.segments import check_segment_ids, document_starts, reset_states
from xlstm_jax.mlstm.stabilizer import normalize_readout, step_gates
from xlstm_jax.mlstm.states import cast_states, prepare_states

__all__ = ["recurrent_sequence_fw", "recurrent_sequence_segments_fw", "recurrent_step_fw"]

# The read-out products run in the state dtype; HIGHEST keeps GPUs from using TF32 for float32 dots.
_PRECISION = jax.lax.Precision.HIGHEST


def recurrent_step_fw(
    c: jax.Array,  # (B, NH, DHQK, DHV)
    n: jax.Array,  # (B, NH, DHQK)
    m: jax.Array,  # (B, NH, 1)
    q: jax.Array,  # (B, NH, DHQK)
    k: jax.Array,  # (B, NH, DHQK)
    v: jax.Array,  # (B, NH, DHV)
    i: jax.Array,  # (B, NH, 1)
    f: jax.Array,  # (B, NH, 1)
    eps: float = 1e-6,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """This is a single step of the mLSTM operation in recurrent form.

    Args:
        c: Memory state tensor of shape (B, NH, DHQK, DHV); its dtype is the state dtype.
        n: Normalizer state tensor of shape (B, NH, DHQK), in the state dtype.
        m: Max state tensor of shape (B, NH, 1), in the state dtype.
        q: Queries tensor of shape (B, NH, DHQK). h is returned in q's dtype.
        k: Keys tensor of shape (B, NH, DHQK).
        v: Values tensor of shape (B, NH, DHV).
        i: Input gate pre-activation of shape (B, NH, 1) (or (B, NH)).
        f: Forget gate pre-activation of shape (B, NH, 1) (or (B, NH)).
        eps: Added to the normaliser after the max, ``max(|q̂·n'|, exp(-m')) + eps``. Defaults to 1e-6.

    Returns:
        The hidden state h (B, NH, DHV) in q's dtype and the new states
        ``(matC_state_new, vecN_state_new, vecM_state_new)`` with the shapes and dtype of (c, n, m).

    Raises:
        ValueError: a shape does not match, or eps is not positive and finite.
        TypeError: the states do not share one dtype, or an input is not a floating-point array.

    Example:
        >>> B, NH, DHQK, DHV = 1, 2, 4, 8
        >>> c, n, m = jnp.zeros((B, NH, DHQK, DHV)), jnp.zeros((B, NH, DHQK)), jnp.zeros((B, NH, 1))
        >>> q = k = jnp.ones((B, NH, DHQK)); v = jnp.ones((B, NH, DHV)); i = f = jnp.zeros((B, NH, 1))
        >>> h, (c, n, m) = recurrent_step_fw(c, n, m, q, k, v, i, f)
        >>> h.shape
        (1, 2, 8)
    """
    i, f = check_step_inputs(c, n, m, q, k, v, i, f)
    check_eps(eps)
    dtype, out_dtype = c.dtype, q.dtype
    q, k, v, i, f = (x.astype(dtype) for x in (q, k, v, i, f))
    m_new, f_act, i_act = step_gates(m, i, f)  # each (B, NH, 1)
    c_new = f_act[..., None] * c + (i_act[..., None] * k[..., :, None]) * v[..., None, :]
    n_new = f_act * n + i_act * k
    q_hat = q / math.sqrt(q.shape[-1])
    num = jnp.einsum("bhd,bhde->bhe", q_hat, c_new, precision=_PRECISION)  # (B, NH, DHV)
    qn = jnp.einsum("bhd,bhd->bh", q_hat, n_new, precision=_PRECISION)  # (B, NH)
    h = normalize_readout(num, qn, m_new[..., 0], eps)
    return h.astype(out_dtype), (c_new, n_new, m_new)


StepFn = Callable[..., tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]]


def recurrent_sequence_fw(
    queries: jax.Array,  # (B, NH, S, DHQK)
    keys: jax.Array,  # (B, NH, S, DHQK)
    values: jax.Array,  # (B, NH, S, DHV)
    igate_preact: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    fgate_preact: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    c_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    n_initial: jax.Array | None = None,  # (B, NH, DHQK)
    m_initial: jax.Array | None = None,  # (B, NH)
    return_last_states: bool = False,
    eps: float = 1e-6,
    state_dtype: Any = None,
    use_scan: bool = False,
    mlstm_step_fn: StepFn = recurrent_step_fw,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Forward pass of the mLSTM cell in recurrent form on a full sequence.

    Args:
        queries: Queries tensor of shape (B, NH, S, DHQK).
        keys: Keys tensor of shape (B, NH, S, DHQK).
        values: Values tensor of shape (B, NH, S, DHV).
        igate_preact: Input gate pre-activation tensor of shape (B, NH, S, 1) or (B, NH, S); normalised to
            (B, NH, S, 1) on entry.
        fgate_preact: Forget gate pre-activation tensor of shape (B, NH, S, 1) or (B, NH, S).
        c_initial: Initial memory state tensor of shape (B, NH, DHQK, DHV). If None, initialized to zeros.
        n_initial: Initial normalizer state tensor of shape (B, NH, DHQK). If None, initialized to zeros.
        m_initial: Initial max state tensor of shape (B, NH). If None, initialized to zeros. The three
            initial states are given together or not at all.
        return_last_states: Whether to return the last states. Defaults to False.
        eps: Epsilon value for numerical stability. Defaults to 1e-6.
        state_dtype: Dtype of the states (a name such as ``"float32"``, or a dtype). If None, the dtype of the
            initial states if provided, otherwise the dtype of the forget gate pre-activations. With initial
            states, the returned last states have the dtypes of the initial states.
        use_scan: Whether to use ``jax.lax.scan`` for the loop (faster to compile) instead of an unrolled
            Python loop over time. A sequence of length 1 takes one step either way.
        mlstm_step_fn: Function to compute a single mLSTM step, called with the keyword arguments of
            ``recurrent_step_fw``. Defaults to ``recurrent_step_fw``.

    Returns:
        Hidden states of shape (B, NH, S, DHV) in queries' dtype if ``return_last_states`` is False, else
        ``(h, (c_last, n_last, m_last))`` with shapes (B, NH, DHQK, DHV), (B, NH, DHQK) and (B, NH).

    Raises:
        ValueError: a shape does not match, initial states are given partly, eps is not positive and finite,
            or state_dtype is not a floating dtype name.
        TypeError: mlstm_step_fn is not callable, or an input is not a floating-point array.

    Example:
        >>> B, NH, S, DHQK, DHV = 1, 2, 5, 4, 8
        >>> q = k = jnp.ones((B, NH, S, DHQK)); v = jnp.ones((B, NH, S, DHV)); i = f = jnp.zeros((B, NH, S))
        >>> h, (c, n, m) = recurrent_sequence_fw(q, k, v, i, f, return_last_states=True, use_scan=True)
        >>> h.shape, c.shape, m.shape
        ((1, 2, 5, 8), (1, 2, 4, 8), (1, 2))
    """
    return recurrent_sequence_segments_fw(
        queries, keys, values, igate_preact, fgate_preact, c_initial, n_initial, m_initial,
        return_last_states=return_last_states, eps=eps, state_dtype=state_dtype, use_scan=use_scan,
        mlstm_step_fn=mlstm_step_fn,
    )  # fmt: skip


def recurrent_sequence_segments_fw(
    queries: jax.Array,  # (B, NH, S, DHQK)
    keys: jax.Array,  # (B, NH, S, DHQK)
    values: jax.Array,  # (B, NH, S, DHV)
    igate_preact: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    fgate_preact: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    c_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    n_initial: jax.Array | None = None,  # (B, NH, DHQK)
    m_initial: jax.Array | None = None,  # (B, NH)
    return_last_states: bool = False,
    eps: float = 1e-6,
    state_dtype: Any = None,
    use_scan: bool = False,
    mlstm_step_fn: StepFn = recurrent_step_fw,
    *,
    segment_ids: jax.Array | None = None,  # (B, S) int
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """:func:`recurrent_sequence_fw` on rows of packed documents (the function of the recurrent backend).

    The documented :func:`recurrent_sequence_fw` keeps its signature and calls this with ``segment_ids=None``.

    Args:
        queries, keys, values, igate_preact, fgate_preact, c_initial, n_initial, m_initial, return_last_states,
            eps, state_dtype, use_scan, mlstm_step_fn: As for :func:`recurrent_sequence_fw`.
        segment_ids: Optional (B, S) integer document ids: before a position t > 0 whose id differs from
            position t - 1 the states are set to zero (c, n and m), as for a document run alone
            (:mod:`xlstm_jax.mlstm.segments`); only the row's first document starts from the initial states.
            None: one document per row. The last states are those of the row's last document.

    Returns:
        As :func:`recurrent_sequence_fw`.

    Raises:
        ValueError: as :func:`recurrent_sequence_fw`, or segment_ids is not (B, S).
        TypeError: as :func:`recurrent_sequence_fw`, or segment_ids is not an integer array.
    """
    dims, i, f = check_sequence_inputs(queries, keys, values, igate_preact, fgate_preact)
    check_eps(eps)
    if not callable(mlstm_step_fn):
        raise TypeError(f"mlstm_step_fn must be callable, got {type(mlstm_step_fn).__name__}")
    segment_ids = check_segment_ids(segment_ids, dims.B, dims.S)
    (c, n, m), out_dtypes = prepare_states(
        c_initial, n_initial, m_initial, dims, resolve_state_dtype(state_dtype), default_dtype=f.dtype
    )

    def step(carry, x):
        q_t, k_t, v_t, i_t, f_t, *start_t = x  # (B, NH, DHQK) x2, (B, NH, DHV), (B, NH, 1) x2[, (B, 1) bool]
        c, n, m = reset_states(carry, start_t[0][:, 0]) if start_t else carry
        h_t, carry = mlstm_step_fn(c=c, n=n, m=m, q=q_t, k=k_t, v=v_t, i=i_t, f=f_t, eps=eps)
        return carry, h_t

    carry = (c, n, m[..., None])
    xs = (queries, keys, values, i, f)
    if segment_ids is not None:
        xs = (*xs, document_starts(segment_ids)[:, None, :])  # (B, 1, S): time on axis 2, like the inputs
    if use_scan and dims.S > 1:
        carry, h = _checkpointed_scan(step, carry, tuple(jnp.moveaxis(x, 2, 0) for x in xs), dims.S)
        h = jnp.moveaxis(h, 0, 2)
    else:
        hs = []
        for t in range(dims.S):
            carry, h_t = step(carry, tuple(x[:, :, t] for x in xs))
            hs.append(h_t)
        h = jnp.stack(hs, axis=2)
    if not return_last_states:
        return h
    c, n, m = carry
    return h, cast_states((c, n, m[..., 0]), out_dtypes)


def _checkpointed_scan(step, carry, xs, S: int):
    """``jax.lax.scan(step, carry, xs)`` over S steps whose reverse mode keeps O(S/K + K) states, K ~ sqrt(S).

    A plain scan saves every step's (DHQK, DHV) state for the backward pass: O(S) states. Here the steps
    are grouped into chunks of K; the outer scan saves only the carry at chunk borders, and the backward
    pass of each chunk recomputes its K steps (``jax.checkpoint``), one extra forward pass in all. The
    S mod K remaining steps run as one more checkpointed chunk. The forward result is unchanged.
    """
    K = max(1, math.isqrt(S - 1) + 1)  # ceil(sqrt(S))
    n_chunks, tail = divmod(S, K)
    chunk = jax.checkpoint(lambda carry, xs_chunk: jax.lax.scan(step, carry, xs_chunk))
    head = tuple(x[: n_chunks * K].reshape(n_chunks, K, *x.shape[1:]) for x in xs)
    carry, h = jax.lax.scan(chunk, carry, head)
    h = h.reshape(n_chunks * K, *h.shape[2:])
    if tail:
        carry, h_tail = chunk(carry, tuple(x[n_chunks * K :] for x in xs))
        h = jnp.concatenate([h, h_tail], axis=0)
    return carry, h
