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

Forget gates that empty the state (resets, f = -inf among them) and non-finite keys or values are handled
as in the parallel form (:mod:`xlstm_jax.mlstm.parallel`): resets are found on the whole sequence and mask
the terms that cross them inside chunks, and zero a chunk's decay of the border state. Document starts of
packed rows (``segment_ids``) do the same, and the running max carried to the next border continues from the
started document's ``m = 0`` (:mod:`xlstm_jax.mlstm.segments`).

Precision: gates, cumulative sums and all stabiliser arithmetic run in float32 (or the state dtype if wider);
log-gate sums only span one chunk. Matrix products take bfloat16 operands for bfloat16 inputs (tensor cores)
with float32 accumulation, so the border states are rounded to bfloat16 only where they enter the read-out
product; the carried states stay in the state dtype (float32 by default).
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.mlstm.checks import check_eps, check_sequence_inputs, resolve_state_dtype
from xlstm_jax.mlstm.parallel import (
    block_log_decay,
    block_readout,
    block_summary,
    combine_states,
    matmul_dtype,
    sequence_log_gates,
)
from xlstm_jax.mlstm.segments import check_segment_ids, document_starts
from xlstm_jax.mlstm.states import cast_states, prepare_states

__all__ = ["ChunkedSequence", "chunk_sequence", "chunkwise_fw"]


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


def border_states(
    F_L: jax.Array,  # (B, NH, NC) each chunk's log decay (block_log_decay: -inf after a reset)
    cbar: jax.Array | None,  # (B, NH, NC, DHQK, DHV) from block_summary, None for n and m only
    nbar: jax.Array,  # (B, NH, NC, DHQK)
    ml: jax.Array,  # (B, NH, NC)
    c0: jax.Array | None,  # (B, NH, DHQK, DHV) initial states, in the state dtype (None with cbar None)
    n0: jax.Array,  # (B, NH, DHQK)
    m0: jax.Array,  # (B, NH)
    border_dtype: Any,
    unroll: int = 8,
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
    """The states before every chunk and after the last one: a ``lax.scan`` of :func:`combine_states`.

    The carried states stay in the dtype of ``c0`` (the state dtype); each step's arithmetic runs in that
    dtype promoted to float32. The memory state before each chunk is emitted in ``border_dtype`` (the
    read-out's matrix operand dtype, the only dtype it is used in), n and m in the arithmetic dtype.

    ``unroll`` chunks per loop iteration: on a GPU each iteration of a while loop costs tens of microseconds,
    and unrolling 8 chunks saves about a quarter of the forward time at S=2048 on an H200; a closed form over
    groups of chunks (a product over the chunk axis, no loop) is slower there (BENCHMARKS.md, the forms).

    Returns:
        ``((c, n, m) after the last chunk, (c, n, m) before each chunk)``, the latter shaped
        (B, NH, NC, DHQK, DHV), (B, NH, NC, DHQK), (B, NH, NC); both c are None without ``cbar``.
    """
    state_dtype = n0.dtype
    acc = jnp.promote_types(state_dtype, jnp.float32)

    def cast(x, dtype):
        return None if x is None else x.astype(dtype)

    def step(carry, x):
        c, n, m = (cast(s, acc) for s in carry)
        border = (cast(c, border_dtype), n, m)
        c, n, m = combine_states(c, n, m, *x)
        return tuple(cast(s, state_dtype) for s in (c, n, m)), border

    xs = tuple(None if x is None else jnp.moveaxis(x, 2, 0) for x in (F_L, cbar, nbar, ml))
    last, borders = jax.lax.scan(step, (c0, n0, m0), xs, unroll=min(unroll, F_L.shape[2]))
    return last, tuple(None if x is None else jnp.moveaxis(x, 0, 2) for x in borders)


def normalised_weight(log_x: jax.Array, log_max: jax.Array) -> jax.Array:
    """``exp(log_x - log_max)``, and 0 where nothing is weighed (``log_max`` -inf): the exponent is masked, so that
    neither the value nor its gradient is NaN there."""
    return jnp.exp(jnp.where(jnp.isfinite(log_max), log_x - log_max, -jnp.inf))


# border_normalisers composes up to this many chunks one after another rather than by an associative scan.
_FOLDED_CHUNKS = 4


def border_normalisers(
    F_L: jax.Array,  # (B, NH, NC) each chunk's log decay (block_log_decay: -inf after a reset)
    nbar: jax.Array,  # (B, NH, NC, DHQK) from block_summary
    ml: jax.Array,  # (B, NH, NC)
    n0: jax.Array,  # (B, NH, DHQK) initial states, in the state dtype
    m0: jax.Array,  # (B, NH)
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """The normaliser and max before every chunk and after the last: :func:`border_states` without c, as an
    associative scan (no loop).

    A chunk acts on (n, m) as ``m' = max(F_L + m, ml)``, ``n' = exp(F_L + m - m') n + exp(ml - m') nbar``
    (:func:`~xlstm_jax.mlstm.parallel.combine_states`). Two chunks in a row act as one with ``F_L = F_1 + F_2``,
    ``ml = max(F_2 + ml_1, ml_2)`` and ``nbar = exp(F_2 + ml_1 - ml) nbar_1 + exp(ml_2 - ml) nbar_2``, an
    associative composition; the initial state is a chunk that drops what comes before it (``F_L = -inf``,
    ``ml = m0``, ``nbar = n0``). ``lax.associative_scan`` composes the NC + 1 of them in O(log NC) rounds of
    element-wise work on (NC, DHQK) arrays, where a ``lax.scan`` runs NC steps (on a GPU, a loop iteration costs
    tens of microseconds). Up to :data:`_FOLDED_CHUNKS` chunks (a served prompt's chunk) are composed one after
    another instead, which XLA fuses with the work around them (xLSTM-7B's 64-token prefill chunk compiled for an
    H200: 1061 kernels, 1093 with the scan; ``benchmarks/launches.py``). Log-gate sums span at most the chunks
    between two borders, as in the scan.

    Where the scan's ``m`` would be ``-inf`` (a reset followed by input gates all ``-inf`` to the chunk's end: the
    recurrence's ``exp(-inf - (-inf))`` is NaN from there on), this gives ``n = 0`` and ``m = -inf``, and the next
    chunk with an open input gate starts from them as from an empty state.

    Returns:
        ``((n, m) after the last chunk, (n, m) before each chunk)``, the latter (B, NH, NC, DHQK) and (B, NH, NC),
        in the state dtype promoted to float32.
    """
    acc = jnp.promote_types(n0.dtype, jnp.float32)
    first = jnp.full((*F_L.shape[:2], 1), -jnp.inf, acc)
    a = jnp.concatenate([first, F_L.astype(acc)], axis=2)
    m = jnp.concatenate([m0.astype(acc)[..., None], ml.astype(acc)], axis=2)
    n = jnp.concatenate([n0.astype(acc)[:, :, None], nbar.astype(acc)], axis=2)

    def compose(earlier, later):
        (a1, m1, n1), (a2, m2, n2) = earlier, later
        m_new = jnp.maximum(a2 + m1, m2)
        w1, w2 = normalised_weight(a2 + m1, m_new), normalised_weight(m2, m_new)
        return a1 + a2, m_new, w1[..., None] * n1 + w2[..., None] * n2

    if F_L.shape[2] > _FOLDED_CHUNKS:
        _, m, n = jax.lax.associative_scan(compose, (a, m, n), axis=2)
    else:  # a few chunks: the same compositions one after another, which XLA fuses with their neighbours
        out = [(a[:, :, 0], m[:, :, 0], n[:, :, 0])]
        for j in range(1, a.shape[2]):
            out.append(compose(out[-1], (a[:, :, j], m[:, :, j], n[:, :, j])))
        m, n = jnp.stack([o[1] for o in out], axis=2), jnp.stack([o[2] for o in out], axis=2)
    return (n[:, :, -1], m[:, :, -1]), (n[:, :, :-1], m[:, :, :-1])


# border_normalisers_blocked's largest block of chunks: its in-block decays are sums over (T + 1, T, T) masks.
_BLOCK_MAX = 32


def _range_sums(a: jax.Array, rows: int, inclusive: bool) -> jax.Array:
    """(..., rows, T) sums of the (..., T) log decays ``a`` over ranges, each summed from its own terms (no
    differences of cumulative sums, whose rounding grows with the sum before the range): ``[t, u]`` sums ``a_k``
    over ``u < k < t``, or with ``inclusive`` over ``u < k <= t``; 0 over an empty range. The masks are
    constants of the program."""
    T = a.shape[-1]
    t, u, k = np.arange(rows)[:, None, None], np.arange(T)[None, :, None], np.arange(T)[None, None, :]
    inside = (u < k) & ((k <= t) if inclusive else (k < t))
    return jnp.sum(jnp.where(inside, a[..., None, None, :], 0.0), axis=-1)


def border_normalisers_blocked(
    F_L: jax.Array,  # (B, NH, NC) each chunk's log decay (block_log_decay: -inf after a reset)
    nbar: jax.Array,  # (B, NH, NC, DHQK)
    ml: jax.Array,  # (B, NH, NC)
    n0: jax.Array,  # (B, NH, DHQK)
    m0: jax.Array,  # (B, NH)
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """:func:`border_normalisers` in closed form over blocks of chunks: a few batched operations and two matrix
    products where the associative scan runs about 20 rounds of small kernels (the Mosaic GPU forward, whose gate
    plan nothing differentiates, runs it from 64 chunks:
    :func:`~xlstm_jax.kernels.chunkwise_mosaic.chunk_plan`).

    Chunk c's own state at its end is ``(ml_c, nbar_c)``; the border before chunk t holds it decayed by the chunks
    between, ``A(c, t)``, the sum of ``F_L_k`` over ``c < k < t``, so that ``m_t = max_{c<t} (ml_c + A(c, t))`` and
    ``n_t = sum_{c<t} exp(ml_c + A(c, t) - m_t) nbar_c``, the initial state ``(m0, n0)`` a chunk before the first.
    The chunks are cut into G blocks of T (a power of two near sqrt(NC), at most :data:`_BLOCK_MAX`; padded with
    chunks ``(0, -inf, 0)``, which change nothing, where T does not divide NC). Inside a block, the decays, maxima
    and weights of every pair of chunks at once and one batched product of the weights with the block's nbar, which
    also gives each block's own state at its end; over the blocks, the same from the initial state and those G
    states, for the state each block is entered with (the last: the state after the last chunk); each border's
    state from its block's entry and its own sum. Every log decay is summed over its own range (no differences of
    cumulative sums), every weight is at most 1, and the products run at float32's full precision. Work and the
    masks' size grow as ``NC · T² + G³`` (2.1 million mask entries over the blocks at NC = 4096).

    Returns:
        As :func:`border_normalisers`.
    """
    acc = jnp.promote_types(n0.dtype, jnp.float32)
    lead, NC, D = F_L.shape[:2], F_L.shape[2], nbar.shape[-1]
    T = min(_BLOCK_MAX, 1 << max(0, math.ceil(math.log2(math.sqrt(NC)))))
    G = -(-NC // T)
    pad = G * T - NC

    def blocks(x, fill):  # (B, NH, G, T, ...), padded with chunks that change nothing
        x = x.astype(acc)
        if pad:
            x = jnp.concatenate([x, jnp.full((*lead, pad, *x.shape[3:]), fill, acc)], axis=2)
        return x.reshape(*lead, G, T, *x.shape[3:])

    a, mls, nb = blocks(F_L, 0.0), blocks(ml, -jnp.inf), blocks(nbar, 0.0)
    highest = jax.lax.Precision.HIGHEST

    # In each block, for the borders t = 0..T (before each of its chunks, and after the last): chunk u's decay to
    # t and weight from u, the maximum over the chunks before t, and the decay from the block's entry to t.
    earlier = np.arange(T)[None, :] < np.arange(T + 1)[:, None]  # [t, u]: chunk u before border t
    between = _range_sums(a, T + 1, inclusive=False)  # (B, NH, G, T + 1, T)
    from_u = jnp.where(earlier, mls[..., None, :] + between, -jnp.inf)
    local_m = jnp.max(from_u, axis=-1)  # (B, NH, G, T + 1); -inf at t = 0
    # From the entry: chunk 0's decay (from t = 1) and those between chunk 0 and t (the sums above: one pass).
    from_entry = jnp.where(earlier[:, 0], a[..., :1], 0.0) + between[..., 0]  # (B, NH, G, T + 1)
    # Over the blocks, the initial state first: the state each block is entered with, and after the last block.
    outer_m = jnp.concatenate([m0.astype(acc)[..., None], local_m[..., -1]], axis=-1)  # (B, NH, G + 1)
    outer_a = jnp.concatenate([jnp.zeros((*lead, 1), acc), from_entry[..., -1]], axis=-1)
    into = jnp.where(
        np.arange(G + 1)[None, :] <= np.arange(G + 1)[:, None],
        outer_m[..., None, :] + _range_sums(outer_a, G + 1, inclusive=True),
        -jnp.inf,
    )  # (B, NH, G + 1, G + 1): [g, h] the state of element h (the initial state, or block h - 1) at block g's entry
    entry_m = jnp.max(into, axis=-1)  # (B, NH, G + 1)
    m = jnp.maximum(entry_m[..., :G, None] + from_entry, local_m)  # (B, NH, G, T + 1)
    # One product: each border's sum over the block's chunks before it, normalised by its m; row T (the block's
    # end) normalised by the block's own maximum instead, its state from zero.
    norm = jnp.concatenate([m[..., :T], local_m[..., T:]], axis=-1)
    local_n = jnp.einsum("...tu,...ud->...td", normalised_weight(from_u, norm[..., None]), nb, precision=highest)
    outer_n = jnp.concatenate([n0.astype(acc)[..., None, :], local_n[..., T, :]], axis=-2)  # (B, NH, G + 1, D)
    entry_n = jnp.einsum("...gh,...hd->...gd", normalised_weight(into, entry_m[..., None]), outer_n, precision=highest)
    from_entry_n = normalised_weight(entry_m[..., :G, None] + from_entry[..., :T], m[..., :T])  # (B, NH, G, T)
    n = local_n[..., :T, :] + from_entry_n[..., None] * entry_n[..., :G, None, :]
    n_b, m_b = n.reshape(*lead, G * T, D)[:, :, :NC], m[..., :T].reshape(*lead, G * T)[:, :, :NC]
    return (entry_n[..., G, :], entry_m[..., G]), (n_b, m_b)


class ChunkedSequence(NamedTuple):
    """A checked sequence cut into NC chunks of L steps (:func:`chunk_sequence`); gates in the accumulation dtype."""

    dims: Any  # (B, NH, S, DHQK, DHV) of the unpadded sequence
    q: jax.Array  # (B, NH, NC, L, DHQK), padded with zeros
    k: jax.Array  # (B, NH, NC, L, DHQK)
    v: jax.Array  # (B, NH, NC, L, DHV)
    F: jax.Array  # (B, NH, NC, L) cumulative log forget gates within each chunk (0 at resets and padding)
    R: jax.Array  # (B, NH, NC, L) breaks (resets, document starts) within each chunk, inclusive
    i: jax.Array  # (B, NH, NC, L) input gate pre-activations
    log_start: jax.Array | None  # (B, NH, NC, L) document-start column (segments.break_gates), or None
    valid: np.ndarray | None  # (NC, L) False at the padding steps, None without padding
    states: tuple[jax.Array, jax.Array, jax.Array]  # (c0, n0, m0) in the state dtype
    out_dtypes: Any  # the last states' dtypes (states.prepare_states)
    operand_dtype: Any  # the matrix products' operand dtype (parallel.matmul_dtype)
    L: int
    NC: int


def chunk_sequence(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    i: jax.Array,
    f: jax.Array,
    c_initial: jax.Array | None,
    n_initial: jax.Array | None,
    m_initial: jax.Array | None,
    eps: float,
    state_dtype: Any,
    chunk_size: int,
    segment_ids: jax.Array | None,
    pad_short: bool = False,
) -> ChunkedSequence:
    """Checks a sequence's arguments (as :func:`chunkwise_fw` documents them) and cuts it into chunks.

    A sequence shorter than ``chunk_size`` is one chunk of S steps, or with ``pad_short`` one padded chunk of
    ``chunk_size`` steps (for kernels with a fixed chunk size).

    Padding steps have log f = 0 and are masked out of every sum, so they leave the states unchanged. The breaks
    (resets and document starts; module docstring of :mod:`xlstm_jax.mlstm.parallel`) are found on the whole
    sequence, so a document that starts on a chunk border breaks that chunk's first step.
    """
    dims, i, f = check_sequence_inputs(q, k, v, i, f, names=("q", "k", "v", "i", "f"))
    check_eps(eps)
    L = check_chunk_size(chunk_size) if pad_short else min(check_chunk_size(chunk_size), dims.S)
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
    state_dtype = c0.dtype
    acc = jnp.promote_types(state_dtype, jnp.float32)  # gates and stabiliser never run in 16 bits
    operand_dtype = matmul_dtype(jnp.result_type(q, k, v), acc)
    B, NH, S, DHQK, DHV = dims
    NC = -(-S // L)
    pad = NC * L - S
    i = i[..., 0].astype(acc)
    log_f, breaks, log_start = sequence_log_gates(i, f[..., 0].astype(acc), m0.astype(acc), starts)  # (B, NH, S)
    if pad:
        seq_pad = ((0, 0), (0, 0), (0, pad))
        q, k, v = (jnp.pad(x, (*seq_pad, (0, 0))) for x in (q, k, v))
        log_f, i, breaks = (jnp.pad(x, seq_pad) for x in (log_f, i, breaks))
        if log_start is not None:
            log_start = jnp.pad(log_start, seq_pad, constant_values=-jnp.inf)
        valid = (np.arange(NC * L) < S).reshape(NC, L)
    else:
        valid = None
    q, k = (x.reshape(B, NH, NC, L, DHQK) for x in (q, k))
    v = v.reshape(B, NH, NC, L, DHV)
    F = jnp.cumsum(log_f.reshape(B, NH, NC, L), axis=-1)  # (B, NH, NC, L) within each chunk
    R = jnp.cumsum(breaks.reshape(B, NH, NC, L), axis=-1)  # breaks within each chunk, inclusive
    i = i.reshape(B, NH, NC, L)
    if log_start is not None:
        log_start = log_start.reshape(B, NH, NC, L)
    return ChunkedSequence(dims, q, k, v, F, R, i, log_start, valid, (c0, n0, m0), out_dtypes, operand_dtype, L, NC)


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
    scan_unroll: int = 8,
    segment_ids: jax.Array | None = None,  # (B, S) int
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """The mLSTM on a whole sequence in chunkwise form: linear in S, matrix products inside chunks.

    Forget gates of -inf (or low enough to empty the state) reset the state exactly as in the recurrent
    form; a NaN or inf in k or v at step t leaves h before t unchanged (h is not finite from t on).
    With ``segment_ids``, each row is packed documents, each computed as if run alone
    (:mod:`xlstm_jax.mlstm.segments`); documents may start anywhere, inside chunks or on their borders.

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
        scan_unroll: Chunks per iteration of the scan over chunk borders (see :func:`border_states`); a
            tuning knob that does not change the function.
        segment_ids: Optional (B, S) integer document ids: position t > 0 whose id differs from position t - 1
            starts a document from zero states (c, n and m); only the row's first document starts from the
            initial states. None: one document per row. The last states are those of the row's last document.

    Returns:
        h (B, NH, S, DHV) in q's dtype, or ``(h, (c, n, m))`` with the last states shaped
        (B, NH, DHQK, DHV), (B, NH, DHQK), (B, NH) in the initial states' dtypes (the state dtype without).

    Raises:
        ValueError: a shape does not match (segment_ids' included), initial states are given partly, or eps,
            state_dtype or chunk_size is invalid.
        TypeError: an input is not a floating-point array, or segment_ids not an integer one.

    Example:
        >>> B, NH, S, DHQK, DHV = 1, 2, 100, 4, 8
        >>> q = k = jnp.ones((B, NH, S, DHQK)); v = jnp.ones((B, NH, S, DHV)); i = f = jnp.ones((B, NH, S))
        >>> h, (c, n, m) = chunkwise_fw(q, k, v, i, f, return_last_states=True, chunk_size=32)
        >>> h.shape, c.shape
        ((1, 2, 100, 8), (1, 2, 4, 8))
    """
    x = chunk_sequence(q, k, v, i, f, c_initial, n_initial, m_initial, eps, state_dtype, chunk_size, segment_ids)
    unroll = check_chunk_size(scan_unroll, "scan_unroll")
    B, NH, S, DHQK, DHV = x.dims
    q, k, v, F, R, i, log_start, valid = x.q, x.k, x.v, x.F, x.R, x.i, x.log_start, x.valid
    c0, n0, m0 = x.states
    operand_dtype, L, NC = x.operand_dtype, x.L, x.NC

    # 1. Each chunk's own contribution to the state at its end (its running max includes a document that
    # starts in it, with no key or value: a chunk with a start drops the border state but not that max).
    cbar, nbar, ml = block_summary(
        k, v, F, F[..., -1], i, operand_dtype, valid, R, R[..., -1], log_start
    )  # (B, NH, NC, ...)

    # 2. The states at the chunk borders.
    (c_last, n_last, m_last), (c_b, n_b, m_b) = border_states(
        block_log_decay(F[..., -1], R[..., -1]), cbar, nbar, ml, c0, n0, m0, operand_dtype, unroll
    )

    # 3. Every chunk's outputs from its border states.
    h = block_readout(q, k, v, F, i, c_b, n_b, m_b, eps, operand_dtype, valid, R, log_start)  # (B, NH, NC, L, DHV)
    h = h.reshape(B, NH, NC * L, DHV)[:, :, :S].astype(q.dtype)
    if not return_last_states:
        return h
    return h, cast_states((c_last, n_last, m_last), x.out_dtypes)
