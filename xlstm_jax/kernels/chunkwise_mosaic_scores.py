"""Every chunk's gated scores over its steps' denominators as a Mosaic GPU kernel for Hopper (``scores="kernel"``).

With precomputed scores the chunkwise kernel (:mod:`xlstm_jax.kernels.chunkwise_mosaic`) reads, per chunk of
L = 64 steps, ``P / den`` as an (L, L) tile and two rows of readout, computed once per head before it.
:func:`~xlstm_jax.kernels.chunkwise_mosaic.normalised_scores` computes them in XLA: a batched product
``q kᵀ`` written in float32, then passes over it for the row sums and for the cast of ``P / den``, and before
those the gate plan's pass over q for ``q̂·n`` of each chunk's border normaliser. :func:`mosaic_normalised_scores`
is the same function as one kernel that reads q and k once, with one program (a warpgroup) per head and chunk::

    P = (q kᵀ) ⊙ D · DHQK^-1/2                        # WGMMA, (L, L); D from the plan, masked causally
    qn = rowsum P + INTER ⊙ (q · n_border)            # or + the plan's q̂·n row, without n_border
    den = max(|qn|, exp(-m)) + eps
    out: r(P / den), and per step INTER / den, GAIN, qn, den

``q · n_border`` (float32, from q's tile in registers and the chunk's border normaliser) replaces the plan's
``q̂·n`` row where ``n_border`` is given: the gate plan then reads no q (:func:`chunk_plan` with
``border_qn=False``). It needs q's (L, DHQK) tile in registers as float32, 128 registers a thread at DHQK = 256;
larger heads take the plan's row.

Shared memory per program at DHQK = 256, bf16: q and k 2·64·256·2 B = 64 KiB, the plan 8·64·4 B = 2 KiB, P's
tile 8 KiB, the readout and (qn, den) rows 1 KiB and ``n_border`` 1 KiB: 76 KiB, two programs an SM. Each
program's copies overlap the other's products.

The gate plan's keys' sums ``nbar_j = sum_t w_t k_t`` (each chunk's part of the normaliser, from which the border
normalisers follow) are a pass over k of their own before the scores: :func:`mosaic_key_sums` reads each chunk's k
tile once, one program per head and chunk (37 KiB of shared memory at DHQK = 256, several programs an SM), and sums
its rows with the weights in one WGMMA product (the weights as three parts that add up to them exactly), where XLA's
reduction over the chunk's steps reads k at two-thirds of the copy rate at B=1 (BENCHMARKS.md).

Interpret mode. ``interpret=True`` runs the kernels in Mosaic GPU's interpreter on any backend (slow; for tests on
a CPU) where the JAX version has one.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from xlstm_jax.kernels.chunkwise_mosaic import (
    _BREAKS,
    _BREAKS_COL,
    _COL,
    _FOLD_MAX_DHQK,
    _GAIN,
    _INTER,
    _LOWER,
    _PLAN_ROWS,
    _QN,
    _READOUT_ROWS,
    _ROW,
    CHUNK,
    _product,
    _RegisterTiles,
    _swizzled,
    _transposed,
)
from xlstm_jax.kernels.mosaic import (
    HEADS_MAJOR,
    Rows,
    check_sequence_operand,
    finished_when_interpreted,
    require_mosaic_interpreter,
)

__all__ = ["mosaic_key_sums", "mosaic_normalised_scores"]


def _scores_body(
    q_ref,  # (BH, S, DHQK) GMEM, S a multiple of L
    k_ref,  # (BH, S, DHQK)
    plan_ref,  # (BH, NC * 8, L) float32: chunk_plan's rows
    *refs,  # with fold: n_border (BH, NC, DHQK) float32; then the outputs r(P / den), the readout and (qn, den)
    eps: float,
    fold: bool,
    interpret: bool,
    sequences: tuple[Rows, Rows],
):
    nb_ref, (p_ref, readout_ref, norm_ref) = (refs[0], refs[1:]) if fold else (None, refs)
    f32, dtype = jnp.float32, q_ref.dtype
    q_rows, k_rows = sequences  # where q and k lie: heads-major (BH, S, DHQK) or windows of heads-minor columns
    DHQK = q_rows.width(q_ref)
    L = CHUNK
    scale = 1.0 / math.sqrt(DHQK)
    regs = _RegisterTiles(interpret)
    tile, row_layout, col_layout = regs.tile, regs.row_layout, regs.col_layout
    load, cast, rows, columns = regs.load, regs.cast, regs.rows, regs.columns
    bh, j = lax.axis_index("bh"), lax.axis_index("chunk")
    steps = pl.ds(j * L, L)
    itemsize = jnp.dtype(dtype).itemsize
    operand = _swizzled(min(128, L * itemsize), itemsize)  # the (L, ·) tiles: rows of at least 64 elements

    def program(q_smem, k_smem, plan_smem, p_smem, readout_smem, norm_smem, loaded, *rest):
        nb_smem, scratch = (rest[0], rest[1:]) if fold else (None, rest)
        plgpu.copy_gmem_to_smem(q_rows.window(q_ref, bh, j * L, L), q_smem, loaded.at[0])
        plgpu.copy_gmem_to_smem(k_rows.window(k_ref, bh, j * L, L), k_smem, loaded.at[1])
        plgpu.copy_gmem_to_smem(plan_ref.at[bh, pl.ds(j * _PLAN_ROWS, _PLAN_ROWS)], plan_smem, loaded.at[2])
        if fold:
            plgpu.copy_gmem_to_smem(nb_ref.at[bh, pl.ds(j, 1)], nb_smem, loaded.at[3])
        for barrier in range(3 + fold):
            plgpu.barrier_wait(loaded.at[barrier])

        def vector(r):
            return load(plan_smem.at[r], row_layout)

        if fold:  # q · n_border first, so that q's registers are free before the scores' product
            q = cast(load(q_smem, tile).astype(f32), tile)
            border = vector(_INTER) * cast(jnp.sum(q * columns(load(nb_smem.at[0], col_layout)), axis=1), row_layout)
        else:
            border = vector(_QN)
        s = _product(q_smem, _transposed(k_smem, scratch[0] if interpret else None, interpret), (L, L))
        d = regs.gates(
            vector(_ROW),
            load(plan_smem.at[_COL], col_layout),
            vector(_BREAKS),
            load(plan_smem.at[_BREAKS_COL], col_layout),
        )
        p = cast(cast(s, tile) * d * scale, tile)
        qn = cast(cast(jnp.sum(p, axis=1), row_layout) + border, row_layout)
        den = cast(jnp.maximum(jnp.abs(qn), vector(_LOWER)) + eps, row_layout)
        p_smem[...] = cast((p / rows(den, L)).astype(dtype), tile)
        for tile_rows, values in ((readout_smem, (vector(_INTER) / den, vector(_GAIN))), (norm_smem, (qn, den))):
            for r, x in enumerate(values):
                tile_rows.at[r][...] = cast(x, row_layout)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(p_smem, p_ref.at[bh, steps])
        plgpu.copy_smem_to_gmem(readout_smem, readout_ref.at[bh, pl.ds(j * 2, 2)])
        plgpu.copy_smem_to_gmem(norm_smem, norm_ref.at[bh, pl.ds(j * 2, 2)])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        program,
        plgpu.SMEM((L, DHQK), dtype, transforms=operand),
        plgpu.SMEM((L, DHQK), dtype, transforms=operand),
        plgpu.SMEM((_PLAN_ROWS, L), f32),
        plgpu.SMEM((L, L), dtype, transforms=operand),
        plgpu.SMEM((_READOUT_ROWS, L), f32),
        plgpu.SMEM((2, L), f32),
        plgpu.Barrier(num_arrivals=1, num_barriers=3 + fold),  # q, k, the plan, n_border loaded
        *([plgpu.SMEM((1, DHQK), f32)] if fold else []),
        *([plgpu.SMEM((DHQK, L), dtype)] if interpret else []),  # kᵀ, copied
    )


@finished_when_interpreted
@functools.partial(jax.jit, static_argnames=("eps", "interpret", "sequences"))
def mosaic_normalised_scores(
    q: jax.Array,
    k: jax.Array,
    plan: jax.Array,
    eps: float,
    n_border: jax.Array | None = None,
    *,
    sequences: tuple[Rows, Rows] = (HEADS_MAJOR, HEADS_MAJOR),
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
    """What :func:`~xlstm_jax.kernels.chunkwise_mosaic.normalised_scores` returns, from one Mosaic GPU kernel.

    Args:
        q, k: (BH, S, DHQK) bf16 or f16, S a multiple of 64 and DHQK of 64; or heads-minor (B, S, W) as
            ``sequences`` describes them (:class:`~xlstm_jax.kernels.mosaic.Rows`, NH windows of DHQK columns each,
            BH = B · NH; q and k may be one array).
        plan: (BH, NC * 8, 64) float32, :func:`~xlstm_jax.kernels.chunkwise_mosaic.chunk_plan`'s rows.
        eps: The denominator's eps.
        n_border: None, or the normaliser before every chunk (BH, NC, DHQK) float32 (DHQK at most
            256): the kernel computes each step's ``q̂·n_border`` from it, in place of the plan's
            row (module docstring).
        sequences: Where q's and k's rows lie (heads-major by default).
        interpret: Run in Mosaic GPU's interpreter (any backend; slow).

    Returns:
        ``(P / den (BH, S, 64) in q's dtype, readout (BH, NC * 2, 64) float32, (qn, den) (BH, NC, 64) float32
        each)``, as ``normalised_scores``.

    Raises:
        ValueError: the shapes or dtypes do not fit together.
    """
    q_rows, k_rows = sequences
    check_sequence_operand("q", q, q_rows)
    BH, S, DHQK = q_rows.count(q), q.shape[1], q_rows.width(q)
    NC = S // CHUNK
    if k.ndim != 3 or (k_rows.count(k), k.shape[1], k_rows.width(k)) != (BH, S, DHQK) or k.dtype != q.dtype:
        raise ValueError(f"k ({k.shape}, {k.dtype}) must have q's shape and dtype ({q.shape}, {q.dtype})")
    check_sequence_operand("k", k, k_rows)
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"q.dtype={q.dtype} must be bfloat16 or float16 (the WGMMA operand dtypes)")
    if plan.shape != (BH, NC * _PLAN_ROWS, CHUNK) or plan.dtype != jnp.float32:
        raise ValueError(f"plan ({plan.shape}, {plan.dtype}) must be {(BH, NC * _PLAN_ROWS, CHUNK)} float32")
    fold = n_border is not None
    if fold and (n_border.shape != (BH, NC, DHQK) or n_border.dtype != jnp.float32 or DHQK > _FOLD_MAX_DHQK):
        raise ValueError(
            f"n_border ({n_border.shape}, {n_border.dtype}) must be {(BH, NC, DHQK)} float32 with DHQK at most "
            f"{_FOLD_MAX_DHQK}"
        )
    params = require_mosaic_interpreter(1) if interpret else None
    kernel = pl.kernel(
        functools.partial(_scores_body, eps=eps, fold=fold, interpret=interpret, sequences=sequences),
        out_type=(
            jax.ShapeDtypeStruct((BH, S, CHUNK), q.dtype),
            jax.ShapeDtypeStruct((BH, NC * _READOUT_ROWS, CHUNK), jnp.float32),
            jax.ShapeDtypeStruct((BH, NC * 2, CHUNK), jnp.float32),
        ),
        mesh=plgpu.Mesh(grid=(BH, NC), grid_names=("bh", "chunk")),
        name="mlstm_chunk_scores_mosaic",
        **({"interpret": params} if interpret else {}),
    )
    p, readout, norm = kernel(q, k, plan, *((n_border,) if fold else ()))
    norm = norm.reshape(BH, NC, 2, CHUNK)
    return p, readout, (norm[:, :, 0], norm[:, :, 1])


# Columns of the keys' sums kernel's weight operand: the weights' three parts, then zeros. 32 two-byte values make
# 64-byte rows, the narrowest swizzle of a transposed WGMMA operand that the chunk kernels use.
_SUMS_COLUMNS = 32
# Per operand dtype, the bits of a float32 that a part of the weights keeps: the sign, the exponent and as many
# mantissa bits as the dtype has (bf16 7, f16 10).
_HEAD_MASK = {jnp.dtype(jnp.bfloat16): 0xFFFF0000, jnp.dtype(jnp.float16): 0xFFFFE000}


def _head(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``x`` float32 with its mantissa cut (toward zero) to the bits ``dtype`` holds, and ``x`` minus it exact in
    float32: a bit mask, which no compiler folds away as it may a float32 -> bf16 -> float32 round trip."""
    bits = lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(_HEAD_MASK[jnp.dtype(dtype)])
    return lax.bitcast_convert_type(bits, jnp.float32)


def _sums_body(k_ref, w_ref, out_ref, *, interpret: bool, sequences: Rows):
    """One chunk's ``sum_t w_t k_t`` as one WGMMA product, ``kᵀ W`` (DHQK, L) x (L, 32): W's first three columns are
    the float32 weights split into three parts of k's dtype, ``w = w1 + w2 + w3`` (w1 and w2 the leading mantissa
    bits the dtype holds, w3 the bits left): exact in bf16; in f16, whose subnormals stop at 2^-24, exact from 1/2
    and within 2^-25 of w below (the gate plan's weights are at most 1); the rest zeros. The product's columns summed
    are the weighted sum, each step's terms exact in the float32 accumulator. The sum over the tile's 64 rows is
    then the product's, where summing the weighted tile in registers across the warpgroup's rows bounded the kernel
    (1.9 TB/s of k on an H100); the sum over W's columns stays within each thread's four lanes."""
    f32, dtype = jnp.float32, k_ref.dtype
    DHQK = sequences.width(k_ref)
    regs = _RegisterTiles(interpret)
    bh, j = lax.axis_index("bh"), lax.axis_index("chunk")
    itemsize = jnp.dtype(dtype).itemsize
    operand = _swizzled(_SUMS_COLUMNS * itemsize, itemsize)  # one swizzle for both WGMMA operands

    def program(k_smem, w_smem, parts_smem, out_smem, loaded, *scratch):
        plgpu.copy_gmem_to_smem(sequences.window(k_ref, bh, j * CHUNK, CHUNK), k_smem, loaded.at[0])
        plgpu.copy_gmem_to_smem(w_ref.at[bh, pl.ds(j, 1)], w_smem, loaded.at[1])
        plgpu.barrier_wait(loaded.at[1])
        w = regs.load(w_smem.at[0], regs.row_layout)  # (L,) one weight a step
        w1 = _head(w, dtype)
        w2 = _head(w - w1, dtype)
        w3 = w - w1 - w2
        column = regs.iota(1, _SUMS_COLUMNS)
        parts = jnp.where(column == 0, regs.rows(w1, _SUMS_COLUMNS), 0.0)
        parts = jnp.where(column == 1, regs.rows(w2, _SUMS_COLUMNS), parts)
        parts = jnp.where(column == 2, regs.rows(w3, _SUMS_COLUMNS), parts)
        parts_smem[...] = regs.cast(parts.astype(dtype), regs.tile)
        plgpu.commit_smem()
        plgpu.barrier_wait(loaded.at[0])
        k_t = _transposed(k_smem, scratch[0] if interpret else None, interpret)  # (DHQK, L)
        sums = _product(k_t, parts_smem, (DHQK, _SUMS_COLUMNS))
        out_smem.at[0][...] = regs.cast(jnp.sum(sums, axis=1), regs.row_layout)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_ref.at[bh, pl.ds(j, 1)])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        program,
        plgpu.SMEM((CHUNK, DHQK), dtype, transforms=operand),
        plgpu.SMEM((1, CHUNK), f32),
        plgpu.SMEM((CHUNK, _SUMS_COLUMNS), dtype, transforms=operand),
        plgpu.SMEM((1, DHQK), f32),
        plgpu.Barrier(num_arrivals=1, num_barriers=2),  # k, the weights loaded
        *([plgpu.SMEM((DHQK, CHUNK), dtype)] if interpret else []),  # kᵀ: the interpreter has no transposed operands
    )


@finished_when_interpreted
@functools.partial(jax.jit, static_argnames=("interpret", "sequences"))
def mosaic_key_sums(
    k: jax.Array, weights: jax.Array, *, sequences: Rows = HEADS_MAJOR, interpret: bool = False
) -> jax.Array:
    """Every chunk's weighted sum of its keys, ``sum_t weights_t k_t`` in float32, from one Mosaic GPU kernel.

    Args:
        k: (BH, S, DHQK) bf16 or f16, S a multiple of 64 and DHQK of 64 (at most 256: the tile's float32 copy
            in one warpgroup's registers); or heads-minor (B, S, W) as ``sequences`` describes it (NH windows of DHQK
            columns, BH = B · NH; :class:`~xlstm_jax.kernels.mosaic.Rows`).
        weights: (BH, NC, 64) float32, NC = S / 64: each step's weight in its chunk's sum.
        interpret: Run in Mosaic GPU's interpreter (any backend; slow).

    Returns:
        (BH, NC, DHQK) float32.

    Raises:
        ValueError: the shapes or dtypes do not fit together.
    """
    check_sequence_operand("k", k, sequences)
    if sequences.width(k) > _FOLD_MAX_DHQK:
        raise ValueError(f"k.shape={k.shape} has DHQK={sequences.width(k)}; it must be at most {_FOLD_MAX_DHQK}")
    if jnp.dtype(k.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"k.dtype={k.dtype} must be bfloat16 or float16")
    BH, S, DHQK = sequences.count(k), k.shape[1], sequences.width(k)
    NC = S // CHUNK
    if weights.shape != (BH, NC, CHUNK) or weights.dtype != jnp.float32:
        raise ValueError(
            f"weights ({weights.shape}, {weights.dtype}) must be {(BH, NC, CHUNK)} float32 for k.shape={k.shape}"
        )
    params = require_mosaic_interpreter(1) if interpret else None
    kernel = pl.kernel(
        functools.partial(_sums_body, interpret=interpret, sequences=sequences),
        out_type=jax.ShapeDtypeStruct((BH, NC, DHQK), jnp.float32),
        mesh=plgpu.Mesh(grid=(BH, NC), grid_names=("bh", "chunk")),
        name="mlstm_key_sums_mosaic",
        **({"interpret": params} if interpret else {}),
    )
    return kernel(k, weights)
