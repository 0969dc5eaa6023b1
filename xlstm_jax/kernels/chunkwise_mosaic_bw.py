"""The backward pass of the chunkwise Mosaic kernel's products, derived by hand, in XLA, laid out as kernels run it.

:mod:`xlstm_jax.kernels.chunkwise_mosaic` splits the chunkwise mLSTM into the gate plan (XLA, O(S) per head,
:func:`~xlstm_jax.kernels.chunkwise_mosaic.chunk_plan`) and the products (the kernel,
:func:`~xlstm_jax.kernels.chunkwise_mosaic.mosaic_chunkwise`). This module holds, on the kernel's operand layout:

- :func:`chunk_products`: the kernel's function in XLA (a ``lax.scan`` over chunks), the reference for the kernel;
- :func:`chunk_products_vjp`: its gradients, in the decomposition a backward kernel runs;
- :func:`chunkwise_split_fw`: the whole cell (plan and products) with that backward: ``jax.vjp`` of the plan (it
  stays in XLA) composed with :func:`chunk_products_vjp`;
- :func:`mosaic_products_vjp`: the same gradients on the Mosaic GPU backward kernels
  (:mod:`~xlstm_jax.kernels.chunkwise_mosaic_scan`, :mod:`~xlstm_jax.kernels.chunkwise_mosaic_grads`);
- :func:`split_cell`: the ``custom_vjp`` that composes any products and their backward with the plan, shared by
  :func:`chunkwise_split_fw` and ``chunkwise_mosaic_fw(..., backward="mosaic")``.

The forward, per chunk j of L steps and head (plan rows as in ``chunk_plan``; ``r(·)`` rounds to the inputs' dtype,
the identity in float32 and float64)::

    S = q kᵀ,  D_ts = exp(ROW_t + COL_s) where s <= t and BREAKS_t == BREAKS_s, else 0,  P = S ⊙ D · DHQK^-1/2
    num = INTER ⊙ (q r(C_j)) + r(P) v,  qn = P 1 + QN,  den = max(|qn|, LOWER) + eps,  h = num / den
    C_{j+1} = decay_j C_j + kᵀ r(GAIN ⊙ v)                                   (C_0 = c0)

The backward, from dh and dC_NC = dc_last (every product between one chunk's tiles; ``scale = DHQK^-1/2``)::

    dnum  = dh / den,  dINTER = Σ_v dnum ⊙ (q r(C_j))
    dden  = -Σ_v dh ⊙ h / den = -(Σ_v dnum ⊙ num) / den = -(INTER ⊙ dINTER + (P ⊙ dnum vᵀ) 1) / den
            (num with P unrounded: in float64 the same; in bf16 the gradient of the function before P's rounding,
            which dROW's cancellation would otherwise carry, times 1/den, into steps whose den is small)
    dqn   = dden · a · sign(qn),  dLOWER = dden · (1 - a),  a = 1 if |qn| > LOWER, 1/2 if equal, else 0
            (jnp.maximum splits a tie in half; jnp.abs takes sign(0) = +1: the conventions of jax.vjp)
    dQN   = dqn,  dP = dnum vᵀ + dqn 1ᵀ,                 dS = dP ⊙ D · scale
    dlogD = dP ⊙ P  (0 where D is masked or 0: -inf in ROW or COL gives 0)
    dROW  = dlogD 1,  dCOL = 1ᵀ dlogD,  dBREAKS = dBREAKS_COL = 0
    dq    = (INTER ⊙ dnum) r(C_j)ᵀ + dS k                dk = dSᵀ q + r(GAIN ⊙ v) dC_{j+1}ᵀ
    dv    = r(P)ᵀ dnum + GAIN ⊙ (k dC_{j+1})             dGAIN = Σ_v v ⊙ (k dC_{j+1})
    ddecay_j = <dC_{j+1}, C_j>,  dC_j = decay_j dC_{j+1} + qᵀ (INTER ⊙ dnum),  dc0 = dC_0

It runs in three stages, each one pass a kernel makes:

(a) the border states C_j before every chunk, by a forward scan of the state update alone (no (L, L) products;
    :func:`chunk_borders`), unless the caller has them;
(b) the border cotangents dC_{j+1}, by a reverse scan over chunks: dnum of a chunk needs only its scores'
    row sums (den), not C, so this pass splits over columns of C like the forward kernel;
(c) every chunk's own gradients from C_j and dC_{j+1} (:func:`_chunk_gradients`), independent of the other
    chunks (here vmapped over chunks); dP and dden sum over all DHV columns, so a kernel runs it per chunk (a
    program that holds every column of a head can fuse (b) and (c) into one reverse pass).

In float64 the hand-derived gradients equal ``jax.vjp`` of :func:`chunk_products` to rounding
(``tests/kernels/test_chunkwise_mosaic_bw.py``). For bfloat16 inputs the backward's products take the operands as
they come (the forward's rounded tiles, float32 cotangents); where a backward kernel rounds is its own choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from xlstm_jax.kernels.chunkwise_mosaic import (
    _BREAKS,
    _BREAKS_COL,
    _COL,
    _GAIN,
    _INTER,
    _LOWER,
    _PLAN_ROWS,
    _QN,
    _ROW,
    CHUNK,
    _dot,
    _normaliser,
    _scores,
    check_split,
    chunk_plan,
    chunkwise_mosaic_unsupported,
)
from xlstm_jax.kernels.chunkwise_mosaic_grads import (
    D_COL,
    D_DECAY,
    D_GAIN,
    D_INTER,
    D_LOWER,
    D_QN,
    D_ROW,
    chunk_gradients_unsupported,
    mosaic_chunk_gradients,
)
from xlstm_jax.kernels.chunkwise_mosaic_scan import mosaic_state_scan, segment_starts, state_scan_unsupported
from xlstm_jax.mlstm.chunkwise import chunk_sequence
from xlstm_jax.mlstm.states import cast_states

__all__ = [
    "chunk_borders",
    "chunk_products",
    "chunk_products_vjp",
    "chunkwise_split_fw",
    "backward_block_dhv",
    "mosaic_backward_unsupported",
    "mosaic_products_vjp",
    "split_cell",
]


def _check(q, k, v, plan, decay, c0) -> tuple[int, int, int, int, int, int]:
    """Checks the kernel's operand shapes; returns ``(BH, S, DHQK, DHV, NC, L)``."""
    if q.ndim != 3:
        raise ValueError(f"q.shape={q.shape} must be (BH, S, DHQK)")
    BH, S, DHQK = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k.shape={k.shape} must equal q.shape={q.shape}")
    if v.ndim != 3 or v.shape[:2] != (BH, S):
        raise ValueError(f"v.shape={v.shape} must be (BH, S, DHV) with (BH, S)={(BH, S)}")
    DHV = v.shape[-1]
    if plan.ndim != 3 or plan.shape[0] != BH or plan.shape[1] % _PLAN_ROWS or plan.shape[2] < 1:
        raise ValueError(f"plan.shape={plan.shape} must be (BH, NC * {_PLAN_ROWS}, L) with BH={BH}")
    NC, L = plan.shape[1] // _PLAN_ROWS, plan.shape[2]
    if S != NC * L:
        raise ValueError(f"q.shape={q.shape} must have S = NC * L = {NC * L} steps for plan.shape={plan.shape}")
    if decay.shape != (BH, NC):
        raise ValueError(f"decay.shape={decay.shape} must be (BH, NC)={(BH, NC)}")
    if c0.shape != (BH, DHQK, DHV):
        raise ValueError(f"c0.shape={c0.shape} must be (BH, DHQK, DHV)={(BH, DHQK, DHV)}")
    return BH, S, DHQK, DHV, NC, L


def _chunks(q, k, v, plan, NC, L):
    """The operands cut into chunks: (BH, NC, L, ·) tiles and the plan as (BH, NC, 8, L)."""
    BH = q.shape[0]
    return (
        q.reshape(BH, NC, L, -1),
        k.reshape(BH, NC, L, -1),
        v.reshape(BH, NC, L, -1),
        plan.reshape(BH, NC, _PLAN_ROWS, L),
    )


def _gated_values(v, plan, acc):
    """``r(GAIN ⊙ v)`` (L, DHV): each step's value weighted by its gain into the state at the chunk's end."""
    return (plan[_GAIN][:, None] * v.astype(acc)).astype(v.dtype)


def _state_update(k, v, plan, acc):
    """``kᵀ r(GAIN ⊙ v)`` (DHQK, DHV): the chunk's contribution to the state at its end."""
    return _dot("td,te->de", k, _gated_values(v, plan, acc), acc)


def _chunk_forward(q, k, v, plan, c, eps):
    """One chunk from its border state c (module docstring), in c's dtype.

    Returns:
        ``(h (L, DHV), S, D, P (L, L), qn, den (L,), q r(C) (L, DHV))``: h and what its backward reuses.
    """
    acc = c.dtype
    s, d, p = _scores(q, k, plan, acc)
    qn, den = _normaliser(p, plan, eps)
    inter = _dot("td,de->te", q, c.astype(q.dtype), acc)
    h = (plan[_INTER][:, None] * inter + _dot("ts,se->te", p.astype(v.dtype), v, acc)) / den[:, None]
    return h, s, d, p, qn, den, inter


def chunk_products(
    q: jax.Array,  # (BH, S, DHQK), S = NC * L
    k: jax.Array,  # (BH, S, DHQK)
    v: jax.Array,  # (BH, S, DHV)
    plan: jax.Array,  # (BH, NC * 8, L)
    decay: jax.Array,  # (BH, NC)
    c0: jax.Array,  # (BH, DHQK, DHV)
    eps: float,
) -> tuple[jax.Array, jax.Array]:
    """The Mosaic chunkwise kernel's function in XLA: a ``lax.scan`` over chunks (module docstring).

    The operands as :func:`~xlstm_jax.kernels.chunkwise_mosaic.mosaic_chunkwise` takes them (any L, any dtype):
    matrix products take the inputs' dtype as operands and accumulate in c0's dtype promoted to float32 (``acc``),
    where C, P and ``GAIN ⊙ v`` are rounded to the inputs' dtype before they enter a product, as in the kernel.

    Args:
        q: Queries (BH, S, DHQK), heads flattened, S a multiple of L.
        k: Keys (BH, S, DHQK).
        v: Values (BH, S, DHV).
        plan: The gate plan (BH, NC * 8, L) of ``chunk_plan``, float32 or wider.
        decay: Each chunk's decay of its border state (BH, NC).
        c0: The memory state before the first chunk (BH, DHQK, DHV).
        eps: Added to the normaliser after the max.

    Returns:
        ``(h (BH, S, DHV) in q's dtype, c after the last chunk (BH, DHQK, DHV) in acc)``.

    Raises:
        ValueError: the shapes do not fit together.
    """
    BH, S, DHQK, DHV, NC, L = _check(q, k, v, plan, decay, c0)
    acc = jnp.promote_types(c0.dtype, jnp.float32)
    qc, kc, vc, pc = _chunks(q, k, v, plan, NC, L)

    def head(q, k, v, plan, decay, c0):
        def step(c, x):
            q, k, v, plan, decay = x
            h = _chunk_forward(q, k, v, plan, c, eps)[0]
            return decay * c + _state_update(k, v, plan, acc), h

        c_last, h = lax.scan(step, c0, (q, k, v, plan, decay.astype(acc)))
        return h.reshape(S, DHV), c_last

    h, c_last = jax.vmap(head)(qc, kc, vc, pc, decay, c0.astype(acc))
    return h.astype(q.dtype), c_last


def chunk_borders(
    k: jax.Array,  # (BH, S, DHQK)
    v: jax.Array,  # (BH, S, DHV)
    plan: jax.Array,  # (BH, NC * 8, L)
    decay: jax.Array,  # (BH, NC)
    c0: jax.Array,  # (BH, DHQK, DHV)
) -> tuple[jax.Array, jax.Array]:
    """The memory states before every chunk and after the last (stage (a)): the state update alone, no scores.

    Args:
        k, v, plan, decay, c0: As :func:`chunk_products`.

    Returns:
        ``(C_j before each chunk (BH, NC, DHQK, DHV), c after the last chunk (BH, DHQK, DHV))``, in c0's dtype
        promoted to float32.

    Raises:
        ValueError: the shapes do not fit together.
    """
    BH, S, DHQK, DHV, NC, L = _check(k, k, v, plan, decay, c0)
    acc = jnp.promote_types(c0.dtype, jnp.float32)
    _, kc, vc, pc = _chunks(k, k, v, plan, NC, L)

    def head(k, v, plan, decay, c0):
        def step(c, x):
            k, v, plan, decay = x
            return decay * c + _state_update(k, v, plan, acc), c

        c_last, borders = lax.scan(step, c0, (k, v, plan, decay))
        return borders, c_last

    return jax.vmap(head)(kc, vc, pc, decay.astype(acc), c0.astype(acc))


def _dnum(q, k, plan, dh, eps, acc):
    """``dnum = dh / den`` (L, DHV) of one chunk: its scores' row sums are all it needs of the forward."""
    _, den = _normaliser(_scores(q, k, plan, acc)[2], plan, eps)
    return dh.astype(acc) / den[:, None]


def _den_slope(qn, lower):
    """``∂den/∂qn`` (..., L) of ``den = max(|qn|, LOWER) + eps``: sign(qn) where |qn| is the larger, half of it at a
    tie, 0 where LOWER is the larger; ``∂den/∂LOWER = 1 - |∂den/∂qn|`` (module docstring)."""
    above = jnp.where(jnp.abs(qn) > lower, 1.0, jnp.where(jnp.abs(qn) == lower, 0.5, 0.0)).astype(qn.dtype)
    return above * jnp.where(qn >= 0, 1.0, -1.0).astype(qn.dtype)


def _chunk_gradients(q, k, v, plan, c, dc_next, dh, eps):
    """One chunk's gradients (stage (c)) from its border state C_j = c and dC_{j+1} = dc_next (module docstring).

    Returns:
        ``(dq (L, DHQK), dk (L, DHQK), dv (L, DHV), dplan (8, L), ddecay ())`` in c's dtype.
    """
    acc, DHQK = c.dtype, q.shape[-1]
    _, s, d, p, qn, den, inter = _chunk_forward(q, k, v, plan, c, eps)
    c_r, p_r = c.astype(q.dtype), p.astype(v.dtype)
    dh = dh.astype(acc)
    dnum = dh / den[:, None]
    dnum_v = _dot("te,se->ts", dnum, v, acc)
    d_inter = jnp.sum(dnum * inter, axis=1)
    # dden = -(Σ_v dnum ⊙ num) / den from the products at hand (module docstring), with P unrounded.
    dden = -(plan[_INTER] * d_inter + jnp.sum(p * dnum_v, axis=1)) / den
    slope = _den_slope(qn, plan[_LOWER])
    dqn, dlower = dden * slope, dden * (1.0 - jnp.abs(slope))
    dp = dnum_v + dqn[:, None]
    ds = dp * d * (1.0 / math.sqrt(DHQK))
    dlog_d = dp * p  # the masked entries and those with -inf in ROW or COL have P = 0
    dgv = _dot("td,de->te", k, dc_next, acc)  # (L, DHV): the state update's cotangent on r(GAIN ⊙ v)
    dq = _dot("te,de->td", plan[_INTER][:, None] * dnum, c_r, acc) + _dot("ts,sd->td", ds, k, acc)
    dk = _dot("ts,td->sd", ds, q, acc) + _dot("te,de->td", _gated_values(v, plan, acc), dc_next, acc)
    dv = _dot("ts,te->se", p_r, dnum, acc) + plan[_GAIN][:, None] * dgv
    d_row, d_col = jnp.sum(dlog_d, axis=1), jnp.sum(dlog_d, axis=0)
    d_gain = jnp.sum(v.astype(acc) * dgv, axis=1)
    dplan = _plan_rows(d_row, d_col, d_inter, dqn, dlower, d_gain, axis=0)
    return dq, dk, dv, dplan, jnp.sum(dc_next * c)


def _plan_rows(d_row, d_col, d_inter, d_qn, d_lower, d_gain, axis):
    """The plan's gradient from its rows' (each (..., L)), stacked at ``axis`` in the plan's order; the break
    counts' rows are 0 (they only select, through comparisons)."""
    zero = jnp.zeros_like(d_row)
    rows = {
        _ROW: d_row,
        _COL: d_col,
        _BREAKS: zero,
        _INTER: d_inter,
        _QN: d_qn,
        _LOWER: d_lower,
        _GAIN: d_gain,
        _BREAKS_COL: zero,
    }
    return jnp.stack([rows[r] for r in range(_PLAN_ROWS)], axis=axis)


def chunk_products_vjp(
    q: jax.Array,  # (BH, S, DHQK), S = NC * L
    k: jax.Array,  # (BH, S, DHQK)
    v: jax.Array,  # (BH, S, DHV)
    plan: jax.Array,  # (BH, NC * 8, L)
    decay: jax.Array,  # (BH, NC)
    c0: jax.Array,  # (BH, DHQK, DHV)
    eps: float,
    dh: jax.Array,  # (BH, S, DHV)
    dc_last: jax.Array,  # (BH, DHQK, DHV)
    borders: jax.Array | None = None,  # (BH, NC, DHQK, DHV)
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """The gradients of :func:`chunk_products`, derived by hand, in three stages (module docstring).

    Args:
        q, k, v, plan, decay, c0, eps: As :func:`chunk_products`.
        dh: The cotangent of h (BH, S, DHV).
        dc_last: The cotangent of the last state (BH, DHQK, DHV).
        borders: The states before every chunk (:func:`chunk_borders`) where the caller has them; None computes
            them (stage (a)).

    Returns:
        ``(dq, dk, dv, dplan, ddecay, dc0)`` shaped and typed like ``(q, k, v, plan, decay, c0)``; the rows of
        ``dplan`` that hold break counts are 0.

    Raises:
        ValueError: the shapes do not fit together.
    """
    BH, S, DHQK, DHV, NC, L = _check(q, k, v, plan, decay, c0)
    for name, x, shape in (("dh", dh, v.shape), ("dc_last", dc_last, c0.shape)):
        if x.shape != shape:
            raise ValueError(f"{name}.shape={x.shape} must be {shape}")
    if borders is None:
        borders = chunk_borders(k, v, plan, decay, c0)[0]
    elif borders.shape != (BH, NC, DHQK, DHV):
        raise ValueError(f"borders.shape={borders.shape} must be (BH, NC, DHQK, DHV)={(BH, NC, DHQK, DHV)}")
    acc = jnp.promote_types(c0.dtype, jnp.float32)
    qc, kc, vc, pc = _chunks(q, k, v, plan, NC, L)
    dhc = dh.reshape(BH, NC, L, DHV)

    def reverse(q, k, v, plan, decay, dh, dc_last):  # stage (b), one head
        def step(dc_next, x):
            q, k, v, plan, decay, dh = x
            d_inter = plan[_INTER][:, None] * _dnum(q, k, plan, dh, eps, acc)
            return decay * dc_next + _dot("td,te->de", q, d_inter, acc), dc_next

        dc0, dc_next = lax.scan(step, dc_last, (q, k, v, plan, decay, dh), reverse=True)
        return dc_next, dc0

    dc_next, dc0 = jax.vmap(reverse)(qc, kc, vc, pc, decay.astype(acc), dhc, dc_last.astype(acc))
    chunk = jax.vmap(jax.vmap(lambda q, k, v, p, c, dc, dh: _chunk_gradients(q, k, v, p, c, dc, dh, eps)))  # (c)
    dq, dk, dv, dplan, ddecay = chunk(qc, kc, vc, pc, borders.astype(acc), dc_next, dhc)
    return (
        dq.reshape(q.shape).astype(q.dtype),
        dk.reshape(k.shape).astype(k.dtype),
        dv.reshape(v.shape).astype(v.dtype),
        dplan.reshape(plan.shape).astype(plan.dtype),
        ddecay.astype(decay.dtype),
        dc0.astype(c0.dtype),
    )


def _backward_kernels_unsupported(DHQK: int, DHV: int, dtype: Any, block_dhv: int, depth: int) -> str | None:
    """Why the state scans or the gradient kernel cannot run ``block_dhv`` columns a program, or None."""
    return state_scan_unsupported(DHQK, DHV, dtype, block_dhv, depth) or chunk_gradients_unsupported(
        DHQK, DHV, dtype, block_dhv
    )


def backward_block_dhv(DHQK: int, DHV: int, dtype: Any, block_dhv: int, depth: int) -> int:
    """The backward kernels' columns per program behind a forward kernel of ``block_dhv`` columns: the same where
    their tiles fit, else 32 (at DHQK=256 the gradient kernel's tiles need 284 KiB of shared memory at 64)."""
    return block_dhv if _backward_kernels_unsupported(DHQK, DHV, dtype, block_dhv, depth) is None else 32


def mosaic_backward_unsupported(
    DHQK: int, DHV: int, dtype: Any, block_dhv: int, depth: int, scores: str = "in_kernel"
) -> str | None:
    """Why the Mosaic GPU backward (:func:`mosaic_products_vjp`, behind the forward kernel of ``block_dhv`` columns
    and ``scores`` writing the border states and each step's (qn, den) with one warpgroup) cannot run this head
    shape, dtype and tiling, or None if it can (no device check). Its kernels run :func:`backward_block_dhv`
    columns; the gradient kernel holds dq in registers, so DHQK is at most 256 there."""
    forward = chunkwise_mosaic_unsupported(
        DHQK, DHV, dtype, block_dhv, depth=depth, consumers=1, scores=scores, normaliser=True
    )  # fmt: skip
    return forward or _backward_kernels_unsupported(
        DHQK, DHV, dtype, backward_block_dhv(DHQK, DHV, dtype, block_dhv, depth), depth
    )


def mosaic_products_vjp(
    q: jax.Array,  # (BH, S, DHQK), S = NC * CHUNK
    k: jax.Array,  # (BH, S, DHQK)
    v: jax.Array,  # (BH, S, DHV)
    plan: jax.Array,  # (BH, NC * 8, CHUNK) float32
    decay: jax.Array,  # (BH, NC) float32
    c0: jax.Array,  # (BH, DHQK, DHV) float32
    eps: float,
    dh: jax.Array,  # (BH, S, DHV)
    dc_last: jax.Array,  # (BH, DHQK, DHV)
    *,
    borders: jax.Array | None = None,  # (BH, NC * DHQK, DHV)
    normaliser: tuple[jax.Array, jax.Array],  # (qn, den), (BH, NC, CHUNK) float32 each
    block_dhv: int = 32,
    depth: int = 2,
    consumers: int = 1,
    interpret: bool = False,
    scan_block_dhv: int | None = None,
    split: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """The gradients of the Mosaic chunkwise kernel's products on the Mosaic GPU backward kernels.

    The stages of :func:`chunk_products_vjp` with the products in kernels: (a) the border states r(C_j) by
    :func:`~xlstm_jax.kernels.chunkwise_mosaic_scan.mosaic_state_scan`; per step in XLA, from the forward's
    (qn, den), ``1/den``, ``INTER/den`` and den's slope in qn; (b) the border
    cotangents r(dC_{j+1}) and dc0 by the same scan in reverse; (c) every chunk's dq, dk, dv and the gradients of
    its plan rows (the normaliser's too, from the products it has: no h is read) and decay by
    :func:`~xlstm_jax.kernels.chunkwise_mosaic_grads.mosaic_chunk_gradients`.

    Args:
        q, k, v, plan, decay, c0, eps: The forward kernel's operands (bf16 or f16 tiles, float32 plan and states).
        dh: The cotangent of h (BH, S, DHV), rounded to q's dtype for the products.
        dc_last: The cotangent of the last state (BH, DHQK, DHV).
        borders: The border states r(C_j) (BH, NC * DHQK, DHV) in q's dtype where the forward wrote them
            (``mosaic_chunkwise(..., borders=True)``); None computes them (stage (a)).
        normaliser: Each step's ``(qn, den)`` (BH, NC, L) float32, as the forward computed them
            (``mosaic_chunkwise(..., normaliser=True)``).
        block_dhv, depth: Columns of a state per program and chunks in flight of the scans and the gradient kernel.
        scan_block_dhv: The scans' columns per warpgroup where they differ from ``block_dhv`` (32 or 64; None:
            ``block_dhv``): the state scans hold one (DHQK, block) float32 accumulator a warpgroup, the gradient
            kernel's tiles do not fit 64 columns at DHQK=256.
        consumers: Warpgroups per program of the scans and the gradient kernel, 1 or 2; a kernel that cannot run
            two at this shape (its ``*_unsupported`` says why) runs one.
        interpret: Run the kernels in Mosaic GPU's interpreter.
        split: Segments of each head's chunks that the reverse state scan runs side by side, each from the cotangent
            it is entered with (:func:`~xlstm_jax.kernels.chunkwise_mosaic_scan.segment_starts`); it must divide NC.

    Returns:
        ``(dq, dk, dv, dplan, ddecay, dc0)`` shaped like ``(q, k, v, plan, decay, c0)``: dq, dk, dv in q's dtype,
        the rest float32; the rows of ``dplan`` that hold break counts are 0.

    Raises:
        ValueError: the shapes do not fit together, or a kernel cannot run them.
    """
    BH, S, DHQK, DHV, NC, L = _check(q, k, v, plan, decay, c0)
    for name, x, shape in (("dh", dh, v.shape), ("dc_last", dc_last, c0.shape)):
        if x.shape != shape:
            raise ValueError(f"{name}.shape={x.shape} must be {shape}")
    f32 = jnp.float32
    dtype = q.dtype
    qc, kc, _, pc = _chunks(q, k, v, plan, NC, L)
    row = lambda r: pc[:, :, r]  # noqa: E731  (BH, NC, L)
    if consumers not in (1, 2):
        raise ValueError(f"consumers={consumers!r} must be 1 or 2 (warpgroups per program)")
    two = consumers == 2
    scan_block = block_dhv if scan_block_dhv is None else scan_block_dhv
    scan_consumers = 2 if two and state_scan_unsupported(DHQK, DHV, dtype, scan_block, depth, 2) is None else 1
    grad_consumers = 2 if two and chunk_gradients_unsupported(DHQK, DHV, dtype, block_dhv, 2) is None else 1
    scan = {"block_dhv": scan_block, "depth": depth, "consumers": scan_consumers, "interpret": interpret}
    if borders is None:
        borders, _ = mosaic_state_scan(k, v, row(_GAIN), decay, c0, reverse=False, **scan)
    elif borders.shape != (BH, NC * DHQK, DHV) or borders.dtype != dtype:
        raise ValueError(f"borders {borders.shape} {borders.dtype} must be {(BH, NC * DHQK, DHV)} {dtype}")
    if any(x.shape != (BH, NC, L) or x.dtype != f32 for x in normaliser):
        shapes = [(x.shape, str(x.dtype)) for x in normaliser]
        raise ValueError(f"normaliser (qn, den) {shapes} must be two {(BH, NC, L)} float32 arrays")
    qn, den = normaliser  # (BH, NC, L) each
    rden = 1.0 / den
    w = row(_INTER) * rden
    dh = dh.astype(dtype)
    if split == 1:
        dborders, dc0 = mosaic_state_scan(q, dh, w, decay, dc_last.astype(f32), reverse=True, **scan)
    else:  # the segments side by side, each from the cotangent after it
        check_split(split, NC, S)
        starts = segment_starts(q, dh, w, decay, dc_last.astype(f32), split, reverse=True, interpret=interpret)
        segments = lambda x: x.reshape(BH * split, x.shape[1] // split, *x.shape[2:])  # noqa: E731
        dborders, dcs = mosaic_state_scan(*map(segments, (q, dh, w, decay)), starts, reverse=True, **scan)
        dborders, dc0 = dborders.reshape(BH, NC * DHQK, DHV), dcs.reshape(BH, split, DHQK, DHV)[:, 0]
    # mosaic_chunk_gradients' vector rows, in its order: ROW, COL, BREAKS, BREAKS_COL, GAIN, RDEN, W, DDEN_DQN
    vectors = (row(_ROW), row(_COL), row(_BREAKS), row(_BREAKS_COL), row(_GAIN), rden, w, _den_slope(qn, row(_LOWER)))
    vec = jnp.stack(vectors, axis=2).reshape(BH, NC * _PLAN_ROWS, L)
    dq, dk, dv, dvec = mosaic_chunk_gradients(
        q, k, v, dh, borders, dborders, vec, block_dhv=block_dhv, consumers=grad_consumers, interpret=interpret
    )  # fmt: skip
    dvec = dvec.reshape(BH, NC, _PLAN_ROWS, L)
    rows = (D_ROW, D_COL, D_INTER, D_GAIN, D_DECAY, D_QN, D_LOWER)
    d_row, d_col, d_inter, d_gain, d_decay, dqn, dlower = (dvec[:, :, r] for r in rows)
    dplan = _plan_rows(d_row, d_col, d_inter, dqn, dlower, d_gain, axis=2).reshape(plan.shape)
    return dq, dk, dv, dplan, d_decay[..., 0], dc0


Products = Callable[..., tuple[jax.Array, jax.Array]]


def split_cell(
    products: Products,
    products_vjp: Callable[..., tuple[jax.Array, ...]],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    i: jax.Array,
    f: jax.Array,
    c_initial: jax.Array | None,
    n_initial: jax.Array | None,
    m_initial: jax.Array | None,
    return_last_states: bool,
    eps: float,
    state_dtype: Any,
    segment_ids: jax.Array | None,
    products_for_grad: Products | None = None,
    products_border_qn: Products | None = None,
    key_sums: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """The mLSTM on a whole sequence split into the gate plan and the products, with the products' own backward.

    The gate plan (``chunk_plan``, chunks of :data:`~xlstm_jax.kernels.chunkwise_mosaic.CHUNK` steps, the last
    padded) runs in XLA and is differentiated by autodiff; the products and their gradients are given: a
    ``custom_vjp`` whose backward composes ``jax.vjp`` of the plan with ``products_vjp``.

    Args:
        products: ``products(q, k, v, plan, decay, c0) -> (h, c_last)`` on the kernel's operands (heads flattened,
            S padded to whole chunks).
        products_vjp: ``products_vjp(q, k, v, plan, decay, c0, residual, dh, dc_last) -> (dq, dk, dv, dplan,
            ddecay, dc0)``: the gradients of ``products``, given its ``residual``.
        products_for_grad: What runs instead of ``products`` under differentiation: the same function returning
            ``(h, c_last, residual)`` (for example with the border states, for ``products_vjp``); None:
            ``products`` with no residual.
        products_border_qn: What runs instead of ``products`` where nothing differentiates the call: the same
            function of the plan without its ``q̂·n_border`` row (``chunk_plan(x, border_qn=False)``, which then
            reads no q) and of the border normalisers (BH, NC, DHQK), given last, from which it computes that row
            itself (the scores kernel); its c0 is None (zeros) where no initial states are given. None:
            ``products``.
        key_sums: The plan's keys' sums where ``products_border_qn`` runs (``chunk_plan``'s ``key_sums``; never
            differentiated); None: XLA's.
        q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states, eps, state_dtype, segment_ids: As
            :func:`~xlstm_jax.mlstm.chunkwise.chunkwise_fw`.

    Returns:
        h (B, NH, S, DHV) in q's dtype, or ``(h, (c, n, m))`` with the last states in the initial states' dtypes
        (the state dtype without).
    """
    x = chunk_sequence(q, k, v, i, f, c_initial, n_initial, m_initial, eps, state_dtype, CHUNK, segment_ids, True)
    states_given = c_initial is not None
    dtype = jnp.result_type(q, k, v)

    def plan_part(q, k, v, i, f, states, segment_ids, border_qn=True):
        """The kernel's operands (BH-flattened) and the last n and m: everything but the products; with
        ``border_qn=False`` the plan without its q̂·n row, and the border normalisers (BH, NC, DHQK) third."""
        c0, n0, m0 = states if states_given else (None, None, None)
        x = chunk_sequence(q, k, v, i, f, c0, n0, m0, eps, state_dtype, CHUNK, segment_ids, True)
        B, NH, S, DHQK, DHV = x.dims
        NC, L = x.NC, x.L
        plan, decay, nm_last, n_border = chunk_plan(
            x, border_qn=border_qn, key_sums=None if border_qn else key_sums, blocked_borders=not border_qn
        )  # fmt: skip
        acc = jnp.promote_types(x.states[0].dtype, jnp.float32)
        operands = (
            x.q.astype(dtype).reshape(B * NH, NC * L, DHQK),
            x.k.astype(dtype).reshape(B * NH, NC * L, DHQK),
            x.v.astype(dtype).reshape(B * NH, NC * L, DHV),
            plan.reshape(B * NH, NC * _PLAN_ROWS, L),
            decay.reshape(B * NH, NC),
            x.states[0].astype(acc).reshape(B * NH, DHQK, DHV),
        )
        return (operands, nm_last) if border_qn else (operands, nm_last, n_border.reshape(B * NH, NC, DHQK))

    def outputs(h, c_last, nm_last):
        """h cut to the sequence and the last states in their dtypes."""
        B, NH, S, DHQK, DHV = x.dims
        h = h.reshape(B, NH, -1, DHV)[:, :, :S].astype(q.dtype)
        return h, cast_states((c_last.reshape(B, NH, DHQK, DHV), *nm_last), x.out_dtypes)

    # segment_ids is an argument of the custom_vjp, not a closure: a traced value closed over would escape its trace
    # where the call is rematerialised (jax.checkpoint) or otherwise re-traced.
    def forward(q, k, v, i, f, states, segment_ids, products=products_for_grad or (lambda *o: (*products(*o), None))):
        (operands, nm_last), plan_vjp = jax.vjp(lambda *a: plan_part(*a, segment_ids), q, k, v, i, f, states)
        h, c_last, residual = products(*operands)
        out, outputs_vjp = jax.vjp(outputs, h, c_last, nm_last)
        return out, (operands, residual, plan_vjp, outputs_vjp)

    @jax.custom_vjp
    def run(q, k, v, i, f, states, segment_ids):
        if products_border_qn is None:
            return forward(q, k, v, i, f, states, segment_ids, lambda *ops: (*products(*ops), None))[0]
        operands, nm_last, n_border = plan_part(q, k, v, i, f, states, segment_ids, border_qn=False)
        if not states_given:  # the kernel starts from zeros: no zero state written and read
            operands = (*operands[:5], None)
        return outputs(*products_border_qn(*operands, n_border), nm_last)

    def run_bwd(residuals, cotangents):
        operands, residual, plan_vjp, outputs_vjp = residuals
        dh, dc_last, dnm_last = outputs_vjp(cotangents)
        d_operands = products_vjp(*operands, residual, dh, dc_last)
        d_operands = tuple(d.astype(o.dtype) for d, o in zip(d_operands, operands, strict=True))
        return (*plan_vjp((d_operands, dnm_last)), None)  # document ids are not differentiable

    run.defvjp(lambda *args: forward(*args), run_bwd)
    states = (c_initial, n_initial, m_initial) if states_given else None
    h, last = run(q, k, v, i, f, states, segment_ids)
    return (h, last) if return_last_states else h


def chunkwise_split_fw(
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
    """The mLSTM on a whole sequence in the Mosaic kernel's split, in XLA, with the hand-derived backward.

    :func:`split_cell` with :func:`chunk_products` and :func:`chunk_products_vjp`: products accumulate in the state
    dtype promoted to float32 (float64 for float64 states).

    Arguments, results and errors as :func:`xlstm_jax.mlstm.chunkwise.chunkwise_fw` (without ``chunk_size`` and
    ``scan_unroll``).

    Returns:
        h (B, NH, S, DHV) in q's dtype, or ``(h, (c, n, m))`` with the last states shaped (B, NH, DHQK, DHV),
        (B, NH, DHQK), (B, NH) in the initial states' dtypes (the state dtype without).

    Raises:
        ValueError, TypeError: as :func:`~xlstm_jax.mlstm.chunkwise.chunkwise_fw`.

    Example:
        >>> B, NH, S, DHQK, DHV = 1, 2, 100, 4, 8
        >>> q = k = jnp.ones((B, NH, S, DHQK)); v = jnp.ones((B, NH, S, DHV)); i = f = jnp.ones((B, NH, S))
        >>> dq = jax.grad(lambda q: chunkwise_split_fw(q, k, v, i, f).sum())(q)
        >>> dq.shape
        (1, 2, 100, 4)
    """

    def products(q, k, v, plan, decay, c0):
        return chunk_products(q, k, v, plan, decay, c0, eps)

    def products_vjp(q, k, v, plan, decay, c0, residual, dh, dc_last):
        del residual  # chunk_products_vjp recomputes what it needs in the accumulation dtype
        return chunk_products_vjp(q, k, v, plan, decay, c0, eps, dh, dc_last)

    return split_cell(
        products, products_vjp, q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states, eps, state_dtype,
        segment_ids,
    )  # fmt: skip
