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

The building blocks below work on any number of leading batch dimensions, none included:
:func:`block_readout` (h of a block from the states before it), :func:`block_update` (the states after a
block, in one pass) and, for the chunkwise form's parallel summaries, :func:`block_summary` with
:func:`combine_states` (the same update in two stages). The parallel form applies them once to the whole
sequence; the chunkwise form (:mod:`xlstm_jax.mlstm.chunkwise`) to every chunk; the fused sequence kernel
(:mod:`xlstm_jax.kernels.recurrent_sequence`) to one head's blocks inside a Pallas kernel, so they use only
operations that Pallas' Triton lowering has (iota masks, 2-D products).

Resets and non-finite inputs. A forget gate that empties the state in the recurrent form (f = -inf, or far
below the input gate; see :func:`~xlstm_jax.mlstm.stabilizer.forget_gate_resets`) is kept out of F; instead
``R_t``, the number of resets up to t, masks every term that crosses one: ``log D[t, s] = -inf`` where
``R_t != R_s``, and ``log w_t = -inf`` where ``R_t > 0``. A NaN or inf in k or v at step s makes h NaN from
step s on (the recurrent form's h is non-finite there too) and leaves every earlier h exactly as without it:
such steps enter the products as zeros, and their rows are set to NaN afterwards, so that no ``0 * NaN``
reaches an earlier row.

Packed documents (``segment_ids``, :mod:`xlstm_jax.mlstm.segments`). A document start breaks the sequence like
a reset: ``R`` counts *breaks*, resets and starts, and the same masks drop every term across one. What differs
is the running max: a document starts from the zero state with ``m = 0``, which enters step t of it with log
weight ``F_t - F_start + logsigmoid(f_start)``. The block functions take that as one more column of the row max
(``log_start``: ``logsigmoid(f)`` at a start, -inf elsewhere) with no key or value, so every form computes
the document as if it ran alone, the ``eps`` term included.

Precision: the gates, the cumulative sums and the stabiliser run in float32 (or the state dtype if
wider). Matrix products take bfloat16/float16 operands when the inputs have that dtype (the gate
weights are rounded to it just before the product, so GPUs use their tensor cores) and float32
(or float64) operands otherwise; they always accumulate in float32 or wider.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.mlstm.checks import check_eps, check_sequence_inputs, resolve_state_dtype
from xlstm_jax.mlstm.segments import break_gates, check_segment_ids, document_starts, segment_max_bound
from xlstm_jax.mlstm.stabilizer import (
    finite_max,
    forget_gate_resets,
    log_forget_gate_masked,
    max_bound,
    normalize_readout,
)
from xlstm_jax.mlstm.states import cast_states, prepare_states

__all__ = [
    "block_log_decay",
    "block_log_weights",
    "block_readout",
    "block_running_max",
    "block_summary",
    "block_update",
    "block_weights",
    "combine_states",
    "matmul_dtype",
    "parallel_stabilized_fw",
    "sequence_log_gates",
]


def matmul_dtype(inputs_dtype: Any, acc_dtype: Any) -> jnp.dtype:
    """The operand dtype of the matrix products: 16-bit inputs keep their dtype, else ``acc_dtype``.

    Args:
        inputs_dtype: The common dtype of q, k and v.
        acc_dtype: The dtype of the stabiliser arithmetic and of the accumulation (float32 or wider).
    """
    inputs_dtype = jnp.dtype(inputs_dtype)
    return inputs_dtype if inputs_dtype.itemsize < 4 else jnp.dtype(acc_dtype)


def _dot(spec: str, a: jax.Array, b: jax.Array, operand_dtype: Any, acc_dtype: Any) -> jax.Array:
    """``einsum(spec, a, b)`` with both operands in ``operand_dtype``, accumulated in ``acc_dtype``.

    float32 operands ask for HIGHEST precision, which keeps GPUs from rounding them to TF32.
    """
    operand_dtype = jnp.dtype(operand_dtype)
    precision = jax.lax.Precision.HIGHEST if operand_dtype.itemsize >= 4 else jax.lax.Precision.DEFAULT
    return jnp.einsum(
        spec, a.astype(operand_dtype), b.astype(operand_dtype), precision=precision, preferred_element_type=acc_dtype
    )


def sequence_log_gates(
    i: jax.Array,  # (..., S) input gate pre-activations, in the accumulation dtype
    f: jax.Array,  # (..., S) forget gate pre-activations, in the accumulation dtype
    m0: jax.Array,  # (...) the running max before the first step
    starts: jax.Array | None = None,  # (..., S) bool: document starts (segments.document_starts), None for none
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The log forget gates to sum, the breaks and the document-start column of a sequence (module docstring).

    Returns:
        ``(log_f, breaks, log_start)``: ``logsigmoid(f)`` with 0 at the resets (..., S); the breaks, resets or
        document starts, as 0/1 in f's dtype (so that their cumulative sum, ``R``, is computed like F's); and
        ``log_start`` of :func:`xlstm_jax.mlstm.segments.break_gates` (..., S), None without ``starts``.
    """
    bound = max_bound(m0, i)
    if starts is None:
        resets = forget_gate_resets(f, i, bound[..., None])
        return log_forget_gate_masked(f, resets), resets.astype(f.dtype), None
    resets = forget_gate_resets(f, i, segment_max_bound(bound)[..., None])
    log_f = log_forget_gate_masked(f, resets)
    return log_f, *break_gates(log_f, resets, starts)


def block_log_decay(
    F_L: jax.Array,  # (...) sum of the block's summed log forget gates
    R_L: jax.Array | None,  # (...) the block's number of breaks (resets, document starts), or None for none
) -> jax.Array:
    """The log of the factor by which a block multiplies the states before it: F_L, or -inf after a break."""
    return F_L if R_L is None else jnp.where(R_L > 0, -jnp.inf, F_L)


def _nonfinite_steps(k: jax.Array, v: jax.Array, acc: Any) -> jax.Array:
    """(..., L) 1.0 at the steps whose key or value has a NaN or inf, else 0.0 (float maxima: Pallas' Triton
    lowering has no boolean reductions)."""

    def bad(x):
        return jnp.max(jnp.where(jnp.isfinite(x.astype(acc)), 0.0, 1.0).astype(acc), axis=-1)

    return jnp.maximum(bad(k), bad(v))


def _start_weights(
    F: jax.Array,  # (..., L)
    F_L: jax.Array,  # (...)
    log_start: jax.Array,  # (..., L)
    R: jax.Array,  # (..., L) break counts: a start is itself a break, so R is given whenever log_start is
    R_L: jax.Array,  # (...)
) -> jax.Array:
    """(..., L) the log weight at the block's end of the zero state of a document started at step s (running
    max only): ``F_L - F_s + log_start_s`` where no break follows s in the block, else -inf."""
    return jnp.where(R_L[..., None] == R, F_L[..., None] - F + log_start, -jnp.inf)


def block_log_weights(
    F: jax.Array,  # (..., L) cumulative sum of log forget gates from the block's start, inclusive
    i: jax.Array,  # (..., L) input gate pre-activations
    m0: jax.Array,  # (...) the running max before the block
    valid: np.ndarray | None = None,  # (L,) or broadcastable to (..., L): False marks padding steps
    R: jax.Array | None = None,  # (..., L) inclusive count of breaks from the block's start, None for none
    log_start: jax.Array | None = None,  # (..., L) document-start column (segments.break_gates), None for none
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The log gate weights of a block's read-out and its running max (module docstring).

    Returns:
        ``(log_d (..., L, L), log_w (..., L), m (..., L))``: ``log D[t, s] = F_t - F_s + i_s`` where s <= t, s is
        valid and no break lies between them (else -inf); the initial state's ``log w_t = F_t + m0`` (-inf after
        a break); and the recurrent running max ``m_t`` over both and the document-start columns.
    """
    L = F.shape[-1]
    # Causal mask from iotas rather than a NumPy constant, so that this also runs inside a Pallas kernel.
    mask = jax.lax.broadcasted_iota(jnp.int32, (L, L), 1) <= jax.lax.broadcasted_iota(jnp.int32, (L, L), 0)
    if valid is not None:
        mask = mask & valid[..., None, :]
    if R is not None:
        mask = mask & (R[..., :, None] == R[..., None, :])  # no break between s and t
    F_ts = F[..., :, None] - F[..., None, :]  # (..., L, L)
    log_d = jnp.where(mask, F_ts + i[..., None, :], -jnp.inf)  # (..., L, L)
    log_w = F + m0[..., None]  # (..., L) weight of the initial state at each step
    if R is not None:
        log_w = jnp.where(R > 0, -jnp.inf, log_w)
    m = jnp.maximum(log_w, jnp.max(log_d, axis=-1))  # (..., L) the recurrent running max
    if log_start is not None:  # the zero state of the document that step t belongs to, if it started here
        m = jnp.maximum(m, jnp.max(jnp.where(mask, F_ts + log_start[..., None, :], -jnp.inf), axis=-1))
    return log_d, log_w, m


def block_running_max(
    F: jax.Array,  # (..., L) cumulative sum of log forget gates from the block's start, inclusive
    i: jax.Array,  # (..., L) input gate pre-activations
    log_w: jax.Array,  # (..., L) the initial state's log weight (block_log_weights' second result)
    valid: np.ndarray | jax.Array | None = None,  # (L,) or broadcastable to (..., L): False marks padding steps
    R: jax.Array | None = None,  # (..., L) inclusive count of breaks from the block's start, None for none
    log_start: jax.Array | None = None,  # (..., L) document-start column (segments.break_gates), None for none
) -> jax.Array:
    """The running max ``m`` of :func:`block_log_weights` as a scan over the block's steps: O(L log L) work rather
    than the row max of the (L, L) matrix, for XLA (the kernels, whose Pallas Triton lowering has no scans, take
    the row max).

    ``max_{s <= t} (F_t - F_s + i_s)`` over the steps s of t's document is ``F_t + max_{s <= t} (i_s - F_s)``, a
    running max restarted at every break (``R`` counts them and never decreases along the block); document starts
    add ``log_start_s - F_s`` to it. The same max up to the rounding of the two sums (it only stabilises).

    Returns:
        ``m`` (..., L).
    """
    u = i - F
    if log_start is not None:
        u = jnp.maximum(u, log_start - F)
    if valid is not None:
        u = jnp.where(valid, u, -jnp.inf)
    if R is None:
        run = jax.lax.cummax(u, axis=u.ndim - 1)
    else:

        def combine(a, b):  # a before b: b's max restarts where a break lies between them
            (a_max, a_breaks), (b_max, b_breaks) = a, b
            return jnp.where(a_breaks == b_breaks, jnp.maximum(a_max, b_max), b_max), b_breaks

        run, _ = jax.lax.associative_scan(combine, (u, jnp.broadcast_to(R, u.shape)), axis=-1)
    return jnp.maximum(log_w, F + run)


def block_readout(
    q: jax.Array,  # (..., L, DHQK)
    k: jax.Array,  # (..., L, DHQK)
    v: jax.Array,  # (..., L, DHV)
    F: jax.Array,  # (..., L) cumulative sum of log forget gates from the block's start, inclusive
    i: jax.Array,  # (..., L) input gate pre-activations
    c0: jax.Array | None,  # (..., DHQK, DHV) state before the block, None for zeros
    n0: jax.Array | None,  # (..., DHQK), None for zeros
    m0: jax.Array,  # (...)
    eps: float,
    operand_dtype: Any,
    valid: np.ndarray | None = None,  # (L,) or broadcastable to (..., L): False marks padding steps
    R: jax.Array | None = None,  # (..., L) inclusive count of breaks from the block's start, None for none
    log_start: jax.Array | None = None,  # (..., L) document-start column (segments.break_gates), None for none
) -> jax.Array:
    """The hidden states of a block of L steps that starts from the states ``(c0, n0, m0)``.

    Computes the quadratic form of the module docstring on the block: an (L, L) gate matrix whose row
    max, together with the initial-state column ``F_t + m0`` (and the document-start columns, with
    ``log_start``), is the recurrent running max ``m_t``. Steps marked invalid contribute nothing to later
    steps (their own outputs are meaningless). Terms that cross a break (a reset or a document start) are
    masked out. A step whose k or v is not finite enters the products as zeros, and the
    rows from it on are NaN: earlier rows are exactly those without it.

    Args:
        q, k, v: Queries, keys (..., L, DHQK) and values (..., L, DHV), any dtype.
        F, i: Gates (..., L) in the accumulation dtype (float32 or wider), which is also that of the result;
            F sums the log forget gates with 0 at the resets (:func:`sequence_log_gates`).
        c0, n0, m0: The states before the block, in the accumulation dtype. ``c0 = n0 = None`` stands for
            zero states and skips their products (m0 still enters the running max). Besides saving work,
            this avoids products with an in-graph zero constant, which XLA:CPU of jax 0.10.2 miscompiled
            here (non-finite h for B=1, NH=4, S=1024, DHQK=64, DHV=128 under jit).
        eps: Added to the normaliser after the max.
        operand_dtype: Dtype of the matrix products' operands (see :func:`matmul_dtype`).
        valid: Optional mask of the steps that exist.
        R: Optional inclusive count of the breaks in the block (their cumulative sum, like F): resets and,
            with packed documents, document starts.
        log_start: Optional, with packed documents: at each document start, the log weight of the zero
            state's ``m = 0`` (``logsigmoid(f)``), -inf elsewhere. It enters the running max only.

    Returns:
        h (..., L, DHV) in F's dtype.
    """
    acc = F.dtype
    DHQK = q.shape[-1]
    bad = _nonfinite_steps(k, v, acc)  # (..., L)
    k = jnp.where(bad[..., None] > 0, 0.0, k).astype(k.dtype)
    v = jnp.where(bad[..., None] > 0, 0.0, v).astype(v.dtype)
    log_d, log_w, m = block_log_weights(F, i, m0, valid, R, log_start)
    d = jnp.exp(log_d - m[..., None])
    w = jnp.exp(log_w - m)

    scale = 1.0 / math.sqrt(DHQK)
    scores = _dot("...td,...sd->...ts", q, k, operand_dtype, acc) * (scale * d)  # (..., L, L)
    num = _dot("...ts,...se->...te", scores, v, operand_dtype, acc)  # (..., L, DHV)
    qn = jnp.sum(scores, axis=-1)  # (..., L)
    if c0 is not None:
        num = num + (scale * w)[..., None] * _dot("...td,...de->...te", q, c0, operand_dtype, acc)
        # q̂·n0 runs in the accumulation dtype, as does the row sum (a product and a sum, not a matrix-vector
        # product: Pallas' Triton lowering only has 2-D matrix products).
        qn = qn + (scale * w) * jnp.sum(q.astype(acc) * n0[..., None, :], axis=-1)
    h = normalize_readout(num, qn, m, eps)
    poisoned = jnp.cumsum(bad, axis=-1) > 0  # (..., L) at or after a step with a non-finite k or v
    return jnp.where(poisoned[..., None], jnp.nan, h)


def block_summary(
    k: jax.Array,  # (..., L, DHQK)
    v: jax.Array | None,  # (..., L, DHV), or None for the normaliser and max only
    F: jax.Array,  # (..., L) inclusive cumulative sum of log forget gates from the block's start
    F_L: jax.Array,  # (...) F at the block's last step, F[..., -1]
    i: jax.Array,  # (..., L)
    operand_dtype: Any,
    valid: np.ndarray | None = None,  # (L,) or broadcastable to (..., L)
    R: jax.Array | None = None,  # (..., L) inclusive count of breaks, None for none
    R_L: jax.Array | None = None,  # (...) R at the block's last step
    log_start: jax.Array | None = None,  # (..., L) document-start column (segments.break_gates), None for none
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What a block of L steps adds to the states, stabilised by its own max.

    Step s enters the state at the block's end with log weight ``a_s = F_L - F_s + i_s`` (-inf when a break
    follows it in the block). A document start in the block's last stretch (no break after it) adds
    ``F_L - F_s + log_start_s``, its zero state's running max, to ``ml`` only. With ``ml`` the max of those, this
    returns ``cbar = sum_s exp(a_s - ml) k_s v_sᵀ``,
    ``nbar = sum_s exp(a_s - ml) k_s`` and ``ml``; :func:`combine_states` adds them to the states before the
    block, decayed by :func:`block_log_decay`.

    Returns:
        ``(cbar (..., DHQK, DHV), nbar (..., DHQK), ml (...))`` in F's dtype; ``cbar`` is None when ``v`` is.
    """
    weights, ml = block_weights(F, F_L, i, valid, R, R_L, log_start)
    k_g = k.astype(F.dtype) * weights[..., None]  # (..., L, DHQK)
    cbar = None if v is None else _dot("...sd,...se->...de", k_g, v, operand_dtype, F.dtype)
    return cbar, jnp.sum(k_g, axis=-2), ml


def block_weights(
    F: jax.Array,  # (..., L)
    F_L: jax.Array,  # (...)
    i: jax.Array,  # (..., L)
    valid: np.ndarray | None = None,
    R: jax.Array | None = None,
    R_L: jax.Array | None = None,
    log_start: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The weights ``exp(a_s - ml)`` (..., L) with which :func:`block_summary`'s steps enter the state at the
    block's end, and ``ml`` (...), from the same arguments: ``nbar = sum_s weights_s k_s``."""
    a = F_L[..., None] - F + i  # (..., L)
    if valid is not None:
        a = jnp.where(valid, a, -jnp.inf)
    if R is not None:
        a = jnp.where(R_L[..., None] == R, a, -jnp.inf)
    if log_start is None:
        ml, shift = finite_max(a)  # ml = -inf for a block of input gates -inf: it adds nothing
    else:
        ml, shift = finite_max(jnp.maximum(a, _start_weights(F, F_L, log_start, R, R_L)))
    return jnp.exp(a - shift[..., None]), ml


def combine_states(
    c: jax.Array | None,  # (..., DHQK, DHV) states before a block, or None to combine n and m only
    n: jax.Array,  # (..., DHQK)
    m: jax.Array,  # (...)
    F_L: jax.Array,  # (...) the block's log decay, block_log_decay (-inf after a reset)
    cbar: jax.Array | None,  # (..., DHQK, DHV) from block_summary (None with c None)
    nbar: jax.Array,  # (..., DHQK)
    ml: jax.Array,  # (...)
) -> tuple[jax.Array | None, jax.Array, jax.Array]:
    """The states after a block: ``m' = max(F_L + m, ml)``, ``c' = exp(F_L + m - m') c + exp(ml - m') cbar``.

    For a block of one step (``F_L = logsigmoid(f)``, ``ml = i``, ``cbar = k vᵀ``) this is the recurrent step
    of :func:`xlstm_jax.mlstm.stabilizer.step_gates`; ``m'`` is the recurrent running max at the block's end.

    Returns:
        ``(c', n', m')`` in the dtypes of the arguments' promotion (``c'`` None when ``c`` is).
    """
    m_new = jnp.maximum(F_L + m, ml)
    decay = jnp.exp(F_L + m - m_new)
    gain = jnp.exp(ml - m_new)
    c_new = None if c is None else decay[..., None, None] * c + gain[..., None, None] * cbar
    n_new = decay[..., None] * n + gain[..., None] * nbar
    return c_new, n_new, m_new


def block_update(
    c: jax.Array,  # (..., DHQK, DHV) states before the block
    n: jax.Array,  # (..., DHQK)
    m: jax.Array,  # (...)
    k: jax.Array,  # (..., L, DHQK)
    v: jax.Array,  # (..., L, DHV)
    F: jax.Array,  # (..., L) inclusive cumulative sum of log forget gates from the block's start
    F_L: jax.Array,  # (...) F at the block's last step, F[..., -1]
    i: jax.Array,  # (..., L)
    operand_dtype: Any,
    R: jax.Array | None = None,  # (..., L) inclusive count of breaks, None for none
    R_L: jax.Array | None = None,  # (...) R at the block's last step
    log_start: jax.Array | None = None,  # (..., L) document-start column (segments.break_gates), None for none
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The states after a block of L steps, from the states before it, in one pass.

    The same function as ``combine_states(c, n, m, F_L, *block_summary(k, v, F, F_L, i, ...))``, for when
    the states before the block are at hand: the block's terms are weighted by ``exp(a_s - m')`` with the
    final max ``m' = max(F_L + m, max_s a_s)`` directly, so the update is one product accumulated onto the
    decayed state, ``c' = exp(F_L + m - m') c + sum_s exp(a_s - m') k_s v_sᵀ``, with no separate summary
    (in the fused kernel the product then accumulates in place into the state tile). The chunkwise form
    needs the summaries of all chunks before their states exist, so it uses the two-stage version.

    Returns:
        ``(c', n', m')`` in the accumulation dtype (F's).
    """
    acc = F.dtype
    a = F_L[..., None] - F + i  # (..., L) log weight of step s at the block's end
    if R is not None:
        a = jnp.where(R_L[..., None] == R, a, -jnp.inf)  # steps before a break add nothing
    log_decay = block_log_decay(F_L, R_L) + m
    m_new = jnp.maximum(log_decay, jnp.max(a, axis=-1))  # a at the last step is finite, so m_new is
    if log_start is not None:
        m_new = jnp.maximum(m_new, jnp.max(_start_weights(F, F_L, log_start, R, R_L), axis=-1))
    decay = jnp.exp(log_decay - m_new)
    k_g = k.astype(acc) * jnp.exp(a - m_new[..., None])[..., None]  # (..., L, DHQK)
    c_new = decay[..., None, None] * c + _dot("...sd,...se->...de", k_g, v, operand_dtype, acc)
    n_new = decay[..., None] * n + jnp.sum(k_g, axis=-2)
    return c_new, n_new, m_new


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
    *,
    segment_ids: jax.Array | None = None,  # (B, S) int
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """The mLSTM on a whole sequence in quadratic form: O(S²) work, no loop over time.

    Forget gates of -inf (or low enough to empty the state) reset the state exactly as in the recurrent
    form; a NaN or inf in k or v at step t makes h NaN from t on and leaves h before t unchanged.
    With ``segment_ids``, each row is packed documents, each computed as if run alone
    (:mod:`xlstm_jax.mlstm.segments`).

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
        state_dtype: Dtype of the states. If None: the initial states' dtype when given, else float32 (or
            the forget gate's dtype if wider). The stabiliser arithmetic runs in this dtype promoted to float32.
        segment_ids: Optional (B, S) integer document ids: position t > 0 whose id differs from position t - 1
            starts a document from zero states (c, n and m); only the row's first document starts from the
            initial states. None: one document per row. The last states are those of the row's last document.

    Returns:
        h (B, NH, S, DHV) in q's dtype, or ``(h, (c, n, m))`` with the last states shaped
        (B, NH, DHQK, DHV), (B, NH, DHQK), (B, NH) in the initial states' dtypes (the state dtype without).

    Raises:
        ValueError: a shape does not match (segment_ids' included), initial states are given partly, or
            eps / state_dtype is invalid.
        TypeError: an input is not a floating-point array, or segment_ids not an integer one.

    Example:
        >>> B, NH, S, DHQK, DHV = 1, 2, 5, 4, 8
        >>> q = k = jnp.ones((B, NH, S, DHQK)); v = jnp.ones((B, NH, S, DHV)); i = f = jnp.ones((B, NH, S))
        >>> h, (c, n, m) = parallel_stabilized_fw(q, k, v, i, f, return_last_states=True)
        >>> h.shape, c.shape
        ((1, 2, 5, 8), (1, 2, 4, 8))
    """
    dims, i, f = check_sequence_inputs(q, k, v, i, f, names=("q", "k", "v", "i", "f"))
    check_eps(eps)
    segment_ids = check_segment_ids(segment_ids, dims.B, dims.S)
    starts = None if segment_ids is None else document_starts(segment_ids)[:, None, :]  # (B, 1, S)
    (c0, n0, m0), out_dtypes = prepare_states(
        c_initial,
        n_initial,
        m_initial,
        dims,
        resolve_state_dtype(state_dtype),
        default_dtype=jnp.promote_types(f.dtype, jnp.float32),
    )
    acc = jnp.promote_types(c0.dtype, jnp.float32)  # gates and stabiliser never run in 16 bits
    operand_dtype = matmul_dtype(jnp.result_type(q, k, v), acc)
    c0, n0, m0 = (x.astype(acc) for x in (c0, n0, m0))
    i = i[..., 0].astype(acc)  # (B, NH, S)
    log_f, breaks, log_start = sequence_log_gates(i, f[..., 0].astype(acc), m0, starts)
    F = jnp.cumsum(log_f, axis=-1)  # (B, NH, S) inclusive
    R = jnp.cumsum(breaks, axis=-1)
    given = c_initial is not None  # without states, the zero states' products are skipped
    c_h, n_h = (c0, n0) if given else (None, None)
    h = block_readout(q, k, v, F, i, c_h, n_h, m0, eps, operand_dtype, R=R, log_start=log_start).astype(q.dtype)
    if not return_last_states:
        return h
    last = block_update(c0, n0, m0, k, v, F, F[..., -1], i, operand_dtype, R=R, R_L=R[..., -1], log_start=log_start)
    return h, cast_states(last, out_dtypes)
