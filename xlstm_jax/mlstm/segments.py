"""Packed documents: the document starts that ``segment_ids`` define, written once for every form of the cell.

A row of a batch may hold several documents one after another. ``segment_ids`` (B, S), integers, names each
position's document; position t > 0 of row b starts a new document iff ``segment_ids[b, t] !=
segment_ids[b, t - 1]``. A new document starts from the states a document run alone starts from, ``c = 0``,
``n = 0`` and ``m = 0``, so its first step is ``m' = max(logsigmoid(f) + 0, i)``; only the row's first
document starts from the given initial states. (This is not a forget gate of 0: that would give ``m' = i``,
which changes h through the normaliser's lower bound ``exp(-m')``.)

The recurrent forms zero the carried states before a start (:func:`reset_states`). The forms that work in
log space (parallel, chunkwise, the fused sequence kernel) treat a start like a forget-gate reset
(:mod:`xlstm_jax.mlstm.stabilizer`): every term that crosses it is masked out, the block functions of
:mod:`xlstm_jax.mlstm.parallel` count *breaks* (resets and starts) where they counted resets. The running max
is what differs: after a start it continues from the zero state's ``m = 0``, which enters step t of the
document with log weight ``sum_{r = start..t} logsigmoid(f_r)``, like an input gate of ``logsigmoid(f)`` at
the start with no key or value (:func:`break_gates` gives that ``log_start``); after a reset nothing of the
state before survives. Such a document-start column takes part in the row max of every block and in the
running max carried across chunk or block borders, so a document that starts inside a chunk drops the carried
state and keeps its own ``m`` track.

A NaN or inf in k or v keeps its meaning within a document (h is not finite from that step on, and exactly
unchanged before it). Later documents of the same row are NaN in the log-space forms, which carry the poisoned
state into a product with a zero weight, while the recurrent forms start them from exact zeros; a row with a
non-finite input has no specified h after it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["break_gates", "check_segment_ids", "document_starts", "reset_states", "segment_max_bound"]


def check_segment_ids(segment_ids: Any, B: int, S: int) -> jax.Array | None:
    """Checks optional segment ids against the batch and sequence sizes; returns them as an array (or None).

    Raises:
        TypeError: not an array of integers (booleans included).
        ValueError: the shape is not (B, S).
    """
    if segment_ids is None:
        return None
    if not hasattr(segment_ids, "shape") or not hasattr(segment_ids, "dtype"):
        raise TypeError(f"segment_ids must be an integer array (B, S)={(B, S)}, got {type(segment_ids).__name__}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"segment_ids must be an integer array (B, S), got segment_ids.dtype={segment_ids.dtype}")
    if tuple(segment_ids.shape) != (B, S):
        raise ValueError(f"segment_ids.shape={tuple(segment_ids.shape)} must be (B, S)={(B, S)}")
    return jnp.asarray(segment_ids)


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """(B, S) bool: True where a new document starts (position t > 0 whose id differs from position t - 1)."""
    first = jnp.zeros(segment_ids.shape[:-1] + (1,), bool)
    return jnp.concatenate([first, segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)


def reset_states(states: tuple[jax.Array, ...], start: jax.Array) -> tuple[jax.Array, ...]:
    """The states with every entry of a row that starts a document replaced by 0 (recurrent forms).

    Args:
        states: Arrays with leading dims (B, ...), e.g. c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH, 1).
        start: (B,) bool, the rows whose next step starts a document.

    A select, not a product: a state is exactly 0 after it, whatever it held.
    """
    return tuple(jnp.where(start.reshape(start.shape + (1,) * (x.ndim - 1)), jnp.zeros((), x.dtype), x) for x in states)


def segment_max_bound(m_bound: jax.Array) -> jax.Array:
    """An upper bound of the running max before every step of a row with document starts: ``max(m_bound, 0)``.

    ``forget_gate_resets`` needs a bound of m before each step; a document starts from ``m = 0`` and its running
    max stays below ``max(0, max_s i_s)``, so the bound of a row without starts, raised to 0, covers it.
    """
    return jnp.maximum(m_bound, 0.0)


def break_gates(
    log_f: jax.Array,  # (..., L) logsigmoid(f), 0 at the resets (stabilizer.log_forget_gate_masked)
    resets: jax.Array,  # (..., L) bool, the forget-gate resets
    starts: jax.Array,  # (..., L) bool or 0/1, the document starts
) -> tuple[jax.Array, jax.Array]:
    """The breaks and the document-start column of a block (see the module docstring), in log_f's dtype.

    Returns:
        ``(breaks, log_start)``, both (..., L): ``breaks`` is 1.0 at a reset or a start (their cumulative sum is
        the break count of the block functions, which mask every term across a break), else 0.0;
        ``log_start`` is ``logsigmoid(f)`` at a start that is not also a reset, the log weight with which the
        zero state's ``m = 0`` enters that step, and -inf elsewhere. Comparisons and selects only, so that
        this also runs inside a Pallas kernel.
    """
    dtype = log_f.dtype
    start = starts > 0
    breaks = jnp.where(resets | start, 1.0, 0.0).astype(dtype)
    log_start = jnp.where(start & ~resets, log_f, -jnp.inf).astype(dtype)
    return breaks, log_start
