"""The mLSTM cell in chunkwise form: a recurrence over chunk borders, the quadratic form inside chunks.

The sequence is cut into NC chunks of L steps (the last one padded with no-op steps when L does not
divide S). Three stages, each a few large batched operations:

1. Every chunk's own contribution to the state at its end, stabilised by its own max
   (:func:`~xlstm_jax.mlstm.parallel.block_summary`): two matrix products per chunk, all chunks at once.
2. The states at the chunk borders, by a ``lax.scan`` over chunks of
   :func:`~xlstm_jax.mlstm.parallel.combine_states` (element-wise work on (DHQK, DHV) states, NC steps).
   The border max ``m`` is the recurrent running max at that step, exactly.
3. Every chunk's outputs from its border states by the quadratic form
   (:func:`~xlstm_jax.mlstm.parallel.block_readout`), all chunks at once.

Inside a chunk the running max is ``m_t = max(F_t + m_border, max_{s<=t} (F_t - F_s + i_s))`` with F the
within-chunk cumulative sum of log forget gates: the recurrent ``m_t``, so this form computes the recurrent
function exactly, the ``eps`` term and the lower bound ``exp(-m_t)`` included. Work is O(S L (DHQK + DHV) +
S DHQK DHV), memory O(S L + NC DHQK DHV) per head.

Precision: gates, cumulative sums and all stabiliser arithmetic run in float32 (or the state dtype if wider);
log-gate sums only span one chunk. Matrix products take bfloat16 operands for bfloat16 inputs (tensor cores)
with float32 accumulation, so the border states are rounded to bfloat16 only where they enter the read-out
product; the carried states stay in the state dtype (float32 by default).
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.mlstm.checks import check_eps, check_sequence_inputs, resolve_state_dtype
from xlstm_jax.mlstm.parallel import block_readout, block_summary, combine_states, matmul_dtype
from xlstm_jax.mlstm.stabilizer import finite_max, log_forget_gate
from xlstm_jax.mlstm.states import cast_states, prepare_states

__all__ = ["chunkwise_fw"]


def check_chunk_size(chunk_size: Any, name: str = "chunk_size") -> int:
    """Returns ``chunk_size`` as an int; raises ValueError (naming ``name``) unless it is a positive integer."""
    message = f"{name} must be a positive integer, got {chunk_size!r}"
    if isinstance(chunk_size, bool | np.bool_):
        raise ValueError(message)
    try:
        value = operator.index(chunk_size)
    except TypeError:
        raise ValueError(message) from None
    if value < 1:
        raise ValueError(message)
    return value


def _dot_f(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """A product over chunks in the arithmetic dtype (HIGHEST: no TF32 rounding of the states)."""
    return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST)


def border_states(
    F_L: jax.Array,  # (B, NH, NC) sum of each chunk's log forget gates
    cbar: jax.Array,  # (B, NH, NC, DHQK, DHV) from block_summary
    nbar: jax.Array,  # (B, NH, NC, DHQK)
    ml: jax.Array,  # (B, NH, NC)
    c0: jax.Array,  # (B, NH, DHQK, DHV) initial states, in the state dtype
    n0: jax.Array,  # (B, NH, DHQK)
    m0: jax.Array,  # (B, NH)
    border_dtype: Any,
    group: int = 16,
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
    """The states before every chunk and after the last one.

    The recurrence ``state_{k+1} = combine_states(state_k, chunk k)`` is solved in closed form inside
    groups of G chunks, and by a ``lax.scan`` of :func:`combine_states` over groups. With
    ``seg[k, j] = sum_{j<l<k} F_L[l]`` (the decay from the end of chunk j to the start of chunk k, summed
    directly so that no long prefix sums lose precision) and ``D[k] = sum_{l<k} F_L[l]``, the state before
    chunk k of a group that starts from ``(C, n, m)`` is::

        m_k = max(D[k] + m, max_{j<k} (seg[k, j] + ml_j))         # the recurrent running max
        C_k = exp(D[k] + m - m_k) C + sum_{j<k} exp(seg[k, j] + ml_j - m_k) cbar_j

    a product over the chunk axis that reads every ``cbar`` once and writes every border state once, with
    no loop (a scan over chunks moves the same bytes but pays a loop iteration per chunk). Each group's own
    contribution (the row k = G, from a zero state) feeds the scan over groups, so the work stays linear in S.

    Args:
        F_L, cbar, nbar, ml: Per-chunk sums and summaries (:func:`~xlstm_jax.mlstm.parallel.block_summary`),
            in the arithmetic dtype (float32 or wider).
        c0, n0, m0: The initial states, in the state dtype, which the returned last states keep.
        border_dtype: Dtype of the emitted memory states (the read-out's matrix operand dtype, the only
            dtype they are used in); n and m are emitted in the arithmetic dtype.
        group: Chunks per group G; a tuning knob that does not change the function.

    Returns:
        ``((c, n, m) after the last chunk, (c, n, m) before each chunk)``, the latter shaped
        (B, NH, NC, DHQK, DHV), (B, NH, NC, DHQK), (B, NH, NC).
    """
    state_dtype = c0.dtype
    acc = jnp.promote_types(state_dtype, jnp.float32)
    B, NH, NC = F_L.shape
    G = min(group, NC)
    NG = -(-NC // G)
    if NG * G > NC:  # padding chunks change nothing: no decay, no contribution
        extra = ((0, 0), (0, 0), (0, NG * G - NC))
        F_L, ml = jnp.pad(F_L, extra), jnp.pad(ml, extra, constant_values=-jnp.inf)
        cbar, nbar = jnp.pad(cbar, (*extra, (0, 0), (0, 0))), jnp.pad(nbar, (*extra, (0, 0)))
    F_L, ml = F_L.reshape(B, NH, NG, G), ml.reshape(B, NH, NG, G)
    cbar = cbar.reshape(B, NH, NG, G, *cbar.shape[-2:])
    nbar = nbar.reshape(B, NH, NG, G, nbar.shape[-1])

    rows, cols = np.arange(G + 1)[:, None], np.arange(G)[None, :]  # border k in 0..G, chunk j in 0..G-1
    between = (cols[..., None] < np.arange(G)) & (np.arange(G) < rows[..., None])  # (G+1, G, G): j < l < k
    seg = jnp.sum(jnp.where(between, F_L[..., None, None, :], 0.0), axis=-1)  # (B, NH, NG, G+1, G)
    D = jnp.sum(jnp.where(cols < rows, F_L[..., None, :], 0.0), axis=-1)  # (B, NH, NG, G+1)
    log_a = jnp.where(cols < rows, seg + ml[..., None, :], -jnp.inf)  # (B, NH, NG, G+1, G)

    # Each group's own contribution to the state at its end, and the scan over groups.
    a_end = log_a[..., G, :]  # (B, NH, NG, G)
    m_end, shift = finite_max(a_end)  # -inf for a group of chunks that add nothing
    w_end = jnp.exp(a_end - shift[..., None])
    c_end = _dot_f("...j,...jde->...de", w_end, cbar)
    n_end = _dot_f("...j,...jd->...d", w_end, nbar)

    def step(carry, x):
        c, n, m = (s.astype(acc) for s in carry)
        start = (c, n, m)
        c, n, m = combine_states(c, n, m, *x)
        return (c.astype(state_dtype), n.astype(state_dtype), m.astype(state_dtype)), start

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (D[..., G], c_end, n_end, m_end))
    last, starts = jax.lax.scan(step, (c0, n0, m0), xs)
    c_g, n_g, m_g = (jnp.moveaxis(x, 0, 2) for x in starts)  # (B, NH, NG, ...) state at each group's start

    # The border states inside each group, from the group's start.
    log_w = D[..., :G] + m_g[..., None]  # (B, NH, NG, G)
    log_a = log_a[..., :G, :]  # (B, NH, NG, G, G)
    m_b = jnp.maximum(log_w, jnp.max(log_a, axis=-1))
    w = jnp.exp(log_w - m_b)
    a = jnp.exp(log_a - m_b[..., None])
    c_b = w[..., None, None] * c_g[:, :, :, None] + _dot_f("...kj,...jde->...kde", a, cbar)
    n_b = w[..., None] * n_g[:, :, :, None] + _dot_f("...kj,...jd->...kd", a, nbar)
    c_b = c_b.astype(border_dtype).reshape(B, NH, NG * G, *c_b.shape[-2:])[:, :, :NC]
    n_b = n_b.reshape(B, NH, NG * G, n_b.shape[-1])[:, :, :NC]
    m_b = m_b.reshape(B, NH, NG * G)[:, :, :NC]
    return last, (c_b, n_b, m_b)


def chunkwise_fw(
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
    chunk_size: int = 256,
    *,
    border_group: int = 16,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """The mLSTM on a whole sequence in chunkwise form: linear in S, matrix products inside chunks.

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
        state_dtype: Dtype of the carried states. If None: the initial states' dtype when given, else
            float32 (or the forget gate's dtype if wider). The stabiliser arithmetic runs in this dtype
            promoted to float32.
        chunk_size: Steps per chunk, L (a positive int; default 256, the fastest of 64/128/256 on an H200
            at DHQK=256, DHV=512, see BENCHMARKS.md). Any S works: when L does not divide S the last
            chunk is padded with steps that change nothing; when S < L one chunk of S steps is used.
        border_group: Chunks per group in the computation of the border states (see :func:`border_states`);
            a tuning knob that does not change the function.

    Returns:
        h (B, NH, S, DHV) in q's dtype, or ``(h, (c, n, m))`` with the last states shaped
        (B, NH, DHQK, DHV), (B, NH, DHQK), (B, NH) in the initial states' dtypes (the state dtype without).

    Raises:
        ValueError: a shape does not match, initial states are given partly, or eps, state_dtype or
            chunk_size is invalid.
        TypeError: an input is not a floating-point array.

    Example:
        >>> B, NH, S, DHQK, DHV = 1, 2, 100, 4, 8
        >>> q = k = jnp.ones((B, NH, S, DHQK)); v = jnp.ones((B, NH, S, DHV)); i = f = jnp.ones((B, NH, S))
        >>> h, (c, n, m) = chunkwise_fw(q, k, v, i, f, return_last_states=True, chunk_size=32)
        >>> h.shape, c.shape
        ((1, 2, 100, 8), (1, 2, 4, 8))
    """
    dims, i, f = check_sequence_inputs(q, k, v, i, f, names=("q", "k", "v", "i", "f"))
    check_eps(eps)
    L = min(check_chunk_size(chunk_size), dims.S)
    group = check_chunk_size(border_group, "border_group")
    (c0, n0, m0), out_dtypes = prepare_states(
        c_initial,
        n_initial,
        m_initial,
        dims,
        resolve_state_dtype(state_dtype),
        default_dtype=jnp.promote_types(f.dtype, jnp.float32),
    )
    state_dtype = c0.dtype
    acc = jnp.promote_types(state_dtype, jnp.float32)  # gates and stabiliser never run in 16 bits
    operand_dtype = matmul_dtype(jnp.result_type(q, k, v), acc)
    B, NH, S, DHQK, DHV = dims
    NC = -(-S // L)
    pad = NC * L - S

    # Padding steps have log f = 0 and are masked out of every sum, so they leave the states unchanged.
    log_f = log_forget_gate(f[..., 0].astype(acc))  # (B, NH, S)
    i = i[..., 0].astype(acc)
    if pad:
        seq_pad = ((0, 0), (0, 0), (0, pad))
        q, k, v = (jnp.pad(x, (*seq_pad, (0, 0))) for x in (q, k, v))
        log_f, i = jnp.pad(log_f, seq_pad), jnp.pad(i, seq_pad)
        valid = (np.arange(NC * L) < S).reshape(NC, L)
    else:
        valid = None
    q, k = (x.reshape(B, NH, NC, L, DHQK) for x in (q, k))
    v = v.reshape(B, NH, NC, L, DHV)
    F = jnp.cumsum(log_f.reshape(B, NH, NC, L), axis=-1)  # (B, NH, NC, L) within each chunk
    i = i.reshape(B, NH, NC, L)

    # 1. Each chunk's own contribution to the state at its end.
    cbar, nbar, ml = block_summary(k, v, F, i, operand_dtype, valid)  # (B, NH, NC, ...)

    # 2. The states at the chunk borders.
    (c_last, n_last, m_last), (c_b, n_b, m_b) = border_states(
        F[..., -1], cbar, nbar, ml, c0, n0, m0, operand_dtype, group
    )

    # 3. Every chunk's outputs from its border states.
    h = block_readout(q, k, v, F, i, c_b, n_b, m_b, eps, operand_dtype, valid)  # (B, NH, NC, L, DHV)
    h = h.reshape(B, NH, NC * L, DHV)[:, :, :S].astype(q.dtype)
    if not return_last_states:
        return h
    return h, cast_states((c_last, n_last, m_last), out_dtypes)
