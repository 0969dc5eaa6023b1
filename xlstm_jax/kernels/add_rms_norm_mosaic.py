"""The residual add, RMSNorm and mLSTM gate product of :func:`~xlstm_jax.kernels.add_rms_norm_pallas` as a Mosaic
GPU kernel (Hopper).

The same function as the Triton kernel of :mod:`xlstm_jax.kernels.add_rms_norm` (``add_rms_norm_pallas`` picks
between them with its ``backend`` argument), from the same row math (``residual_sum``, ``rms_scale``,
``normed_row``, ``capped_gate`` there), with the same grid: program ``(r, 0)`` writes row r of ``s`` and ``y``,
program ``(r, 1 + j)`` recomputes row r's norm and writes gate j of row r from row j of the transposed gate
weight (G, K).

Layout. A program is one warpgroup (128 threads). It reads its row from global memory in chunks of 256
elements (128 where K is an odd multiple of 128; :func:`xlstm_jax.kernels.mosaic.chunk_length`), the same
register layout in every dtype. The whole row stays in registers (K <= 8192), so it is read once.

Limits. K must be a multiple of 128 (a warpgroup's row of registers) and at most 8192; other rows take the
Triton kernel (``backend="auto"``) or raise (``backend="mosaic"``). Compiled it needs a Hopper GPU and a JAX
with ``pl.kernel`` and ``plgpu.Mesh`` (0.10 or newer); on a CPU it runs in Mosaic GPU interpret mode where
JAX has it (:func:`xlstm_jax.kernels.mosaic.mosaic_interpret_params`).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from xlstm_jax.kernels.add_rms_norm import capped_gate, normed_row, residual_sum, rms_scale
from xlstm_jax.kernels.mosaic import WARPGROUP, chunk_length, map_under_vmap, mosaic_interpret_params

__all__ = ["MOSAIC_MAX_K", "mosaic_add_rms_norm", "mosaic_add_rms_norm_unsupported"]

MOSAIC_MAX_K = 8192  # the whole row in registers: 64 float32 values a thread per input


def mosaic_add_rms_norm_unsupported(K: int) -> str | None:
    """Why the Mosaic kernel cannot take rows of K elements, or None if it can (no device check)."""
    if K % WARPGROUP or K > MOSAIC_MAX_K:
        return f"the row length K={K} must be a multiple of {WARPGROUP} and at most {MOSAIC_MAX_K}"
    return None


# ---------------------------------------------------------------------------------------------------------
# Kernel body: program (row, 0) writes s and y of its row, program (row, 1 + j) gate j of its row.
# ---------------------------------------------------------------------------------------------------------
def _body(*refs, residuals: int, write_sum: bool, has_side: bool, eps: float, cap: float | None):
    refs = list(refs)
    x_ref = refs.pop(0)  # (M, K)
    r_refs = [refs.pop(0) for _ in range(residuals)]  # each (M, K)
    w_ref = refs.pop(0)  # (K,)
    sw_ref, sb_ref = (refs.pop(0), refs.pop(0)) if has_side else (None, None)  # (G, K), (G,)
    s_ref = refs.pop(0) if write_sum else None  # (M, K)
    y_ref = refs.pop(0)  # (M, K)
    g_ref = refs.pop(0) if has_side else None  # (M, G) float32
    f32 = jnp.float32
    K = x_ref.shape[1]
    chunk = chunk_length(K)
    pieces = [pl.ds(i * chunk, chunk) for i in range(K // chunk)]
    row = lax.axis_index("row")

    def read(ref):  # a (K,) reference as its chunks, in registers
        return [ref.at[p][...] for p in pieces]

    def total(values):  # the sum over the row of chunks of float32 values: added chunkwise, one reduction
        return jnp.sum(functools.reduce(operator.add, values))

    rows = zip(read(x_ref.at[row]), *(read(r.at[row]) for r in r_refs), strict=True)
    s = [residual_sum(x, rs) for x, *rs in rows]
    scale = rms_scale(total(jnp.square(c.astype(f32)) for c in s), K, eps)
    y = [normed_row(c, w, scale) for c, w in zip(s, read(w_ref), strict=True)]

    def write_rows():
        for p, s_c, y_c in zip(pieces, s, y, strict=True):
            if s_ref is not None:
                s_ref.at[row, p][...] = s_c
            y_ref.at[row, p][...] = y_c

    if not has_side:
        write_rows()
        return
    column = lax.axis_index("column")
    pl.when(column == 0)(write_rows)

    @pl.when(column > 0)
    def _():
        j = column - 1
        acc = total(c.astype(f32) * w.astype(f32) for c, w in zip(y, read(sw_ref.at[j]), strict=True))
        g_ref[row, j] = capped_gate(acc, sb_ref[j], cap)


# ---------------------------------------------------------------------------------------------------------
# pl.kernel wrapper.
# ---------------------------------------------------------------------------------------------------------
def mosaic_add_rms_norm(
    x: jax.Array,  # (M, K)
    residuals: Sequence[jax.Array],  # each (M, K) in x's dtype
    weight: jax.Array,  # (K,)
    side: tuple[jax.Array, jax.Array] | None,  # the transposed gate weight (G, K) and the bias (G,)
    *,
    eps: float,
    write_sum: bool,
    cap: float | None,
    interpret: bool,
) -> list[jax.Array]:
    """``[s], y, [g]`` by the Mosaic kernel on a grid (M, 1 + G): s (M, K) only with ``write_sum``, y (M, K) in
    x's dtype, g (M, G) float32 only with ``side``. The caller checks shapes and dtypes.

    Args:
        x, residuals, weight, side: As above.
        eps: RMSNorm epsilon.
        write_sum: Write s.
        cap: The gates' soft cap (with ``side``).
        interpret: Mosaic GPU interpret mode (on any machine, where JAX has it) instead of the compiled kernel.

    Raises:
        ValueError: K is not a row length the kernel covers (:func:`mosaic_add_rms_norm_unsupported`).
    """
    M, K = x.shape
    reason = mosaic_add_rms_norm_unsupported(K)
    if reason is not None:
        raise ValueError(f"the Mosaic GPU add_rms_norm kernel cannot run this shape: {reason}")
    G = 0 if side is None else side[0].shape[0]
    out_type = [jax.ShapeDtypeStruct((M, K), x.dtype)] * (1 + write_sum)
    if side is not None:
        out_type.append(jax.ShapeDtypeStruct((M, G), jnp.float32))
    body = functools.partial(
        _body, residuals=len(residuals), write_sum=write_sum, has_side=side is not None, eps=eps, cap=cap
    )
    kernel = pl.kernel(
        body,
        out_type=tuple(out_type),
        mesh=plgpu.Mesh(grid=(M, 1 + G), grid_names=("row", "column")),
        name="add_rms_norm_mosaic",
        **({"interpret": mosaic_interpret_params()} if interpret else {}),
    )
    return list(map_under_vmap(kernel)(x, *residuals, weight, *(side or ())))
