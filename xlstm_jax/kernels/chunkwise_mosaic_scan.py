"""A chunk-by-chunk state scan as a Mosaic GPU kernel for Hopper: the border states of the chunkwise mLSTM.

Per flattened head ``bh`` and chunk j of L = 64 steps (``a_j`` the (L, DHA) tile of a, ``b_j`` the (L, DHB) tile of
b, ``r(·)`` the rounding to the inputs' dtype), :func:`mosaic_state_scan` runs one of two recurrences::

    reverse=False:  X_0 = x0;   borders_j = r(X_j),      X_{j+1} = decay_j X_j     + a_jᵀ r(gain_j ⊙ b_j)
    reverse=True:   X_NC = x0;  borders_j = r(X_{j+1}),  X_j     = decay_j X_{j+1} + a_jᵀ r(gain_j ⊙ b_j)

and returns every chunk's border and the state after the last step of the scan (X_NC, or X_0 in reverse). It is
the state update of :func:`xlstm_jax.kernels.chunkwise_mosaic.mosaic_chunkwise` alone (no (L, L) scores), and
gives the backward of the chunkwise kernel (the equations in :mod:`xlstm_jax.kernels.chunkwise_mosaic_bw`) its
two scans:

- forward, ``a = k``, ``b = v``, ``gain`` the plan's GAIN row, ``x0 = c0``: the border states r(C_j) that every
  chunk's gradients read, and the last state c;
- reverse, ``a = q``, ``b = dh``, ``gain = INTER / den``, ``x0`` the last state's cotangent: the border
  cotangents r(dC_{j+1}), and the initial state's cotangent dC_0;

and, for sequences cut into segments that run side by side (the forward kernel's and this scan's ``split``), the
states where each segment is entered (:func:`segment_starts`), from runs of chunks scanned from zeros:
``x0=None`` (no state read), ``borders=False`` (the last state alone, no border staged) and
``rows=(per, stride, offset)`` (``per`` of every ``stride`` rows from the ``offset``-th, read in place).

One program (a CUDA block of ``consumers`` warpgroups) per head and block of ``consumers * block_dhv`` columns
of X; each warpgroup holds its ``block_dhv`` columns in registers in float32 from ``x0`` to the last state. The
chunks' a, b and gain tiles arrive through a TMA pipeline ``depth`` chunks deep (in the order the scan visits
them); per chunk, ``r(gain ⊙ b)`` goes to shared memory, and the product ``aᵀ r(gain ⊙ b)`` runs on the WGMMA
units accumulating onto ``decay · X`` in float32 (X and its update share one register set) while the chunk's
border ``r(X)`` is staged in a tile from the registers and leaves by a TMA store. Where X beside its accumulator
would need more than 128 float32 registers a thread (``2 · DHA · block_dhv / 128``: 256 at DHA=256,
block_dhv=64) the border is staged instead at the end of the chunk before (or before the loop), so that one set
is live, 128 registers there; the staging then precedes the product rather than overlapping it.

The gated operand (``x_operand``). With ``"shared"`` (above) each chunk's ``r(gain ⊙ b)`` goes through a tile in
shared memory and a fence before the product reads it. With ``"registers"`` (``borders=False``, 64 columns a
warpgroup; :func:`segment_starts`' form) each warpgroup holds Xᵀ (block_dhv, DHA) instead and runs the transposed
product ``Xᵀ = decay · Xᵀ + r(gain ⊙ b)ᵀ a``, whose A operand ``r(gain ⊙ b)ᵀ`` is formed in registers from b's tile
(read through its transposed view) and whose B operand is a's tile as it arrived: no gated tile, no fence, the same
sums and roundings. X goes in and out through transposed views of its tiles.

With ``consumers=2`` the two warpgroups of a program share one copy of the a and gain tiles per pipeline slot
(warpgroup 0 issues their copies) and each has its own b, r(gain ⊙ b) and staging tiles; while one waits on its
product, its border store or its copies, the other's run. A slot is refilled once both warpgroups have arrived
at its "consumed" barrier.

Shared memory per program (:func:`state_scan_shared_memory_bytes`), at DHA=256, block_dhv=32, depth=2, bf16: per
slot a 64·256·2 B = 32 KiB and gain 64·4 B = 256 B, shared; per warpgroup the b tiles 2·64·32·2 B = 8 KiB,
r(gain ⊙ b) 4 KiB and the borders' staging tile 256·32·2 B = 16 KiB, 28 KiB: 92.5 KiB in the chunk loop with one
warpgroup, 120.5 KiB with two. X in and out goes through float32 tiles of 256·32·4 B = 32 KiB per warpgroup in
scopes of their own (the larger scope only with two warpgroups, block_dhv=64 and depth=1). With the gated operand in
registers at block_dhv=64: a 2·32 KiB and the gains, and per warpgroup the b tiles 2·64·64·2 B = 16 KiB, 80.5 KiB
with one warpgroup. Hopper allows 227 KiB
per block; a few KiB of it are kept for the barriers and alignment that Mosaic GPU adds
(:func:`state_scan_unsupported`).

Limits. Hopper (TMA and WGMMA). a and b bf16 or f16 (the WGMMA operand dtypes); DHA a multiple of 64, DHB a
multiple of ``consumers * block_dhv`` (block_dhv 32 or 64, consumers 1 or 2). ``interpret=True`` runs the kernel
in Mosaic GPU's interpreter on any backend (slow; for tests on a CPU) where the JAX version has one; two
warpgroups (``consumers=2``) need three threads in XLA's CPU pool
(:func:`xlstm_jax.kernels.mosaic.require_mosaic_interpreter`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from xlstm_jax.kernels.chunkwise_mosaic import (
    _ROWS,
    _SMEM_LIMIT,
    _SMEM_RESERVE,
    CHUNK,
    _accumulate,
    _load_transposed,
    _register_operand,
    _RegisterTiles,
    _store_transposed,
    _swizzled,
    _Warpgroups,
)
from xlstm_jax.kernels.mosaic import HEADS_MAJOR, Rows, finished_when_interpreted, require_mosaic_interpreter

__all__ = [
    "X_OPERANDS",
    "mosaic_state_scan",
    "run_chunks",
    "segment_starts",
    "state_scan_shared_memory_bytes",
    "state_scan_unsupported",
]

# Where the scan's product takes its gated operand r(gain ⊙ b) from (``x_operand``; module docstring): a tile in shared
# memory (the B operand of aᵀ r(gain ⊙ b)), or registers (the A operand of the transposed product, X held as Xᵀ).
X_OPERANDS = ("shared", "registers")


def state_scan_shared_memory_bytes(
    DHA: int, dtype: Any, block_dhv: int, depth: int = 2, consumers: int = 1, x_operand: str = "shared"
) -> int:
    """Bytes of shared memory of the scan's largest scope, the tiles without the barriers, per program.

    The chunk loop's scope: per pipeline slot the a tile (L, DHA) and the gains (1, L) float32, shared by the
    warpgroups; per warpgroup ``depth`` b tiles (L, block_dhv), the gated tile r(gain ⊙ b) (L, block_dhv) and the
    borders' staging tile (DHA, block_dhv); with ``x_operand="registers"`` neither of the last two (the gated tile
    stays in registers, and that form writes no borders). The float32 tiles that carry X in and out, (DHA,
    block_dhv) per warpgroup, live in scopes of their own; with one warpgroup they are never the larger, with two
    they can be (block_dhv=64, depth=1), and the larger scope counts.
    """
    item = jnp.dtype(dtype).itemsize
    shared = depth * (CHUNK * DHA * item + CHUNK * 4)
    own = depth * CHUNK * block_dhv * item
    if x_operand != "registers":
        own += CHUNK * block_dhv * item + DHA * block_dhv * item
    return max(shared + consumers * own, consumers * DHA * block_dhv * 4)


def state_scan_unsupported(
    DHA: int, DHB: int, dtype: Any, block_dhv: int, depth: int, consumers: int = 1, x_operand: str = "shared"
) -> str | None:
    """Why :func:`mosaic_state_scan` cannot run this shape, dtype and tiling, or None if it can (no device check).

    Args:
        DHA: Rows of the state (the width of a).
        DHB: Columns of the state (the width of b).
        dtype: The dtype of a and b.
        block_dhv: Columns of the state per warpgroup.
        depth: Chunks in flight in the TMA pipeline.
        consumers: Warpgroups per program, 1 or 2.
        x_operand: Where the product's gated operand comes from (:data:`X_OPERANDS`): ``"registers"`` takes
            ``block_dhv=64`` (the 64 rows of a WGMMA A operand).
    """
    if x_operand not in X_OPERANDS:
        return f"x_operand={x_operand!r} must be one of {X_OPERANDS}"
    if x_operand == "registers" and block_dhv != 64:
        return f'x_operand="registers" takes block_dhv=64 (the rows of a WGMMA A operand), got {block_dhv}'
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"inputs must be bfloat16 or float16 (the WGMMA operand dtypes), got {jnp.dtype(dtype)}"
    if DHA <= 0 or DHA % _ROWS:
        return f"DHA={DHA} must be a positive multiple of {_ROWS}"
    if block_dhv not in (32, 64) or DHB <= 0 or DHB % block_dhv:
        return f"block_dhv={block_dhv} must be 32 or 64 and divide DHB={DHB}"
    if consumers not in (1, 2):
        return f"consumers={consumers!r} must be 1 or 2 (warpgroups per program)"
    if DHB % (consumers * block_dhv):
        return (
            f"DHB={DHB} must be a multiple of consumers * block_dhv = {consumers * block_dhv} "
            f"(consumers={consumers}, block_dhv={block_dhv})"
        )
    if not isinstance(depth, int) or depth < 1:
        return f"depth={depth!r} must be a positive integer (chunks in flight)"
    smem = state_scan_shared_memory_bytes(DHA, dtype, block_dhv, depth, consumers, x_operand)
    if smem + _SMEM_RESERVE > _SMEM_LIMIT:
        return (
            f"the tiles need {smem / 1024:g} KiB of shared memory at DHA={DHA}, block_dhv={block_dhv}, "
            f"depth={depth}, consumers={consumers}; a Hopper block has {_SMEM_LIMIT // 1024} KiB, "
            f"{_SMEM_RESERVE // 1024} KiB of it kept for barriers"
        )
    return None


def _scan_body(
    a_ref,  # (R, S, DHA) GMEM, S a multiple of L
    b_ref,  # (R, S, DHB)
    gain_ref,  # (R, NC * gain_rows[0], L) float32: chunk j's gains in row j * gain_rows[0] + gain_rows[1]
    decay_ref,  # (R, NC) float32
    *refs,  # x0 (BH, DHA, DHB) float32 unless zero_start; out: the borders (BH, NC * DHA, DHB) in a's dtype with
    # borders; x (BH, DHA, DHB) float32
    reverse: bool,
    block_dhv: int,
    depth: int,
    consumers: int,
    interpret: bool,
    zero_start: bool,
    borders: bool,
    rows: tuple[int, int, int] | None,
    registers: bool = False,
    sequences: tuple[Rows, Rows] = (HEADS_MAJOR, HEADS_MAJOR),
    gain_rows: tuple[int, int] = (1, 0),
):
    # registers (x_operand="registers", no borders): each warpgroup holds Xᵀ (NV, DHA) and the product is
    # Xᵀ = decay · Xᵀ + r(gain ⊙ b)ᵀ a, its A operand r(gain ⊙ b)ᵀ in registers: no gated tile, no fence.
    x0_ref, refs = (None, refs) if zero_start else (refs[0], refs[1:])
    borders_ref, x_ref = refs if borders else (None, refs[0])
    f32, dtype = jnp.float32, a_ref.dtype
    a_rows, b_rows = sequences  # where the rows of a and b lie (kernels.mosaic.Rows)
    S, DHA = a_rows.steps(a_ref), a_rows.width(a_ref)
    L, NV, NC = CHUNK, block_dhv, S // CHUNK
    regs = _RegisterTiles(interpret)
    tile, row_layout, col_layout = regs.tile, regs.row_layout, regs.col_layout
    bh, vb = lax.axis_index("bh"), lax.axis_index("vb")
    # The row of the inputs this program scans: its own, or with ``rows = (per, stride, offset)`` ``per`` of every
    # ``stride`` rows from the ``offset``-th (program p scans row (p // per) * stride + offset + p % per).
    row = bh if rows is None else lax.div(bh, rows[0]) * rows[1] + rows[2] + lax.rem(bh, rows[0])
    itemsize = jnp.dtype(dtype).itemsize
    # With two warpgroups ("consumers"), per-warpgroup tiles have a leading axis of 2 and warpgroup 0 issues the
    # copies of the a and gain tiles they share; one warpgroup leaves every tile and copy as it is.
    group = _Warpgroups(consumers, vb, NV)
    split, wg, columns, own, per_warpgroup, leader = (
        group.split, group.wg, group.columns, group.own, group.smem, group.leader
    )  # fmt: skip
    b_barrier, gain_barrier = 1 + wg, 1 + consumers  # indices (times depth) into ``loaded``: a 0

    load, cast = regs.load, regs.cast

    def chunk_of(i):  # the chunk that the scan visits i-th
        return NC - 1 - i if reverse else i

    # One swizzle for every product operand (WGMMA needs the two operands' swizzles equal): the widest that a
    # row of block_dhv columns allows.
    swizzle = min(128, NV * itemsize)
    operand = _swizzled(swizzle, itemsize)

    overlap = 2 * DHA * NV // 128 <= 128  # X and its accumulator side by side: float32 registers a thread

    def body(a_bufs, b_bufs, gain_bufs, loaded, *rest):
        gb_smem, rest = (None, rest) if registers else (own(rest[0]), rest[1:])
        border_smem, rest = (own(rest[0]), rest[1:]) if borders else (None, rest)
        consumed, at = (rest[0], rest[1:]) if split else (None, rest)
        b_bufs = own(b_bufs)
        # The first border r(X) from the registers before any copy into this scope: the loads of x0 from the
        # last scope's tile (which these tiles reuse) are then ordered before the copies by the fence. (With two
        # warpgroups each does so before its own copies; the other's loads precede the scope's block barrier.)
        if borders:
            border_smem[...] = cast(x_init.astype(border_smem.dtype), tile)
        plgpu.commit_smem()

        def issue(i, slot, refill=False):
            """Starts the TMA copies of the tiles of the i-th chunk visited into buffer ``slot`` (a refill: once it
            is consumed)."""
            j = chunk_of(i)

            def copy_b():
                b_loaded = loaded.at[b_barrier * depth + slot]
                plgpu.copy_gmem_to_smem(b_rows.window(b_ref, row, j * L, L, columns), b_bufs.at[slot], b_loaded)

            def copy_shared():
                if refill and split:
                    plgpu.barrier_wait(consumed.at[slot])  # both warpgroups are done with the slot
                plgpu.copy_gmem_to_smem(a_rows.window(a_ref, row, j * L, L), a_bufs.at[slot], loaded.at[slot])
                if not split:
                    copy_b()
                gain_loaded = loaded.at[gain_barrier * depth + slot]
                gain_row = pl.ds(j * gain_rows[0] + gain_rows[1], 1)
                plgpu.copy_gmem_to_smem(gain_ref.at[row, gain_row], gain_bufs.at[slot], gain_loaded)

            leader(copy_shared)
            if split:
                copy_b()  # each warpgroup its own columns

        for i in range(min(depth, NC)):
            issue(i, i)

        def chunk(i, x):
            j, slot = chunk_of(i), lax.rem(i, depth)
            for operand_index in (0, b_barrier, gain_barrier):
                plgpu.barrier_wait(loaded.at[operand_index * depth + slot])
            a_smem, b_smem, gain_smem = a_bufs.at[slot], b_bufs.at[slot], gain_bufs.at[slot]
            if registers:
                # r(gain ⊙ b)ᵀ (NV, L) in registers, the A operand of r(gain ⊙ b)ᵀ a, accumulated onto decay · Xᵀ.
                gain = load(gain_smem.at[0], col_layout)
                gb = cast(_load_transposed(b_smem, interpret).astype(f32) * regs.columns(gain), tile)
                gb = _register_operand(cast(gb.astype(dtype), tile), own(at[0]) if interpret else None, interpret)

                def transposed_product(accs):
                    plgpu.wgmma(accs[0], gb, a_smem)

                (x,) = _accumulate(transposed_product, (cast(decay_ref[row, j] * x, tile),), interpret)
                x = cast(x, tile)

                @pl.when(i + depth < NC)
                def _():  # the product has read the slot
                    if split:
                        plgpu.barrier_arrive(consumed.at[slot])
                    issue(i + depth, slot, refill=True)

                return x
            if interpret:  # the interpreter has no transposed WGMMA operands: transpose through shared memory
                a_t = own(at[0])
                a_t[...] = a_smem[...].T
            else:
                a_t = a_smem.transpose((1, 0))  # (DHA, L)

            # r(gain ⊙ b) into shared memory for the product aᵀ r(gain ⊙ b).
            gain = load(gain_smem.at[0], row_layout)
            gb = load(b_smem, tile).astype(f32) * cast(lax.broadcast_in_dim(gain, (L, NV), (0,)), tile)
            gb_smem[...] = cast(gb.astype(dtype), tile)
            plgpu.commit_smem()

            def stage(x):  # r(X) into the border tile, once the last border has left it
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                border_smem[...] = cast(x.astype(border_smem.dtype), tile)
                plgpu.commit_smem()

            # The product accumulates onto decay · X (X and its update share the accumulator's registers) while this
            # chunk's border r(X) goes out. Where X fits beside its accumulator (2 · DHA · block_dhv / 128 float32
            # registers a thread, at most 128) X is staged in the tile during the product; else it was staged at
            # the end of the chunk before, so that one set is live (128 registers at DHA=256, block_dhv=64).
            def product(accs):
                plgpu.wgmma(accs[0], a_t, gb_smem)
                if not borders:
                    return
                if overlap:
                    pl.when(i > 0)(lambda: stage(x))  # the first border was staged before the loop
                plgpu.copy_smem_to_gmem(border_smem, borders_ref.at[bh, pl.ds(j * DHA, DHA), columns])

            (x,) = _accumulate(product, (cast(decay_ref[row, j] * x, tile),), interpret)
            x = cast(x, tile)
            if borders and not overlap:
                pl.when(i + 1 < NC)(lambda: stage(x))  # the next chunk's border

            @pl.when(i + depth < NC)
            def _():  # every read of the slot (the gated tile, the product) has completed
                if split:
                    plgpu.barrier_arrive(consumed.at[slot])
                issue(i + depth, slot, refill=True)

            return x

        x_last = lax.fori_loop(0, NC, chunk, x_init)
        plgpu.wait_smem_to_gmem(0)
        return x_last

    if zero_start:
        x_init = cast(jnp.zeros((NV, DHA) if registers else (DHA, NV), f32), tile)
    elif registers:
        x_init = group.state_in(x0_ref, bh, lambda ref: _load_transposed(ref, interpret))
    else:
        x_init = group.state_in(x0_ref, bh, lambda ref: load(ref, tile))
    x_last = pl.run_scoped(
        body,
        plgpu.SMEM((depth, L, DHA), dtype, transforms=operand),
        per_warpgroup((depth, L, NV), dtype, transforms=operand),
        plgpu.SMEM((depth, 1, L), f32),
        plgpu.Barrier(num_arrivals=1, num_barriers=(2 + consumers) * depth),
        *([] if registers else [per_warpgroup((L, NV), dtype, transforms=operand)]),  # r(gain ⊙ b)
        *([per_warpgroup((DHA, NV), dtype, transforms=operand)] if borders else []),
        *([plgpu.Barrier(num_arrivals=consumers, num_barriers=depth)] if split else []),
        # the interpreter's copies: r(gain ⊙ b)ᵀ as a product operand (registers), else aᵀ
        *([per_warpgroup((NV, L) if registers else (DHA, L), dtype)] if interpret else []),
        collective_axes="wg",
    )
    store = (lambda ref, x: _store_transposed(ref, x, interpret)) if registers else None
    group.state_out(x_last, x_ref, bh, store)


def _check(
    a,
    b,
    gain,
    decay,
    x0,
    block_dhv: int,
    depth: int,
    consumers: int,
    rows: tuple[int, int, int] | None,
    x_operand: str = "shared",
    sequences: tuple[Rows, Rows] = (HEADS_MAJOR, HEADS_MAJOR),
    gain_rows: tuple[int, int] = (1, 0),
) -> int:
    """ValueError naming the argument where the shapes or dtypes do not fit the scan; else the programs' rows."""
    named = (
        ("a", a, 3),
        ("b", b, 3),
        ("gain", gain, 3),
        ("decay", decay, 2),
        *([("x0", x0, 3)] if x0 is not None else []),
    )
    for name, x, ndim in named:
        if x.ndim != ndim:
            raise ValueError(f"{name}.shape={x.shape} must have {ndim} axes")
    a_rows, b_rows = sequences
    for name, x, x_rows in (("a", a, a_rows), ("b", b, b_rows)):
        if x.shape[1] % x_rows.parts or (x_rows.heads and x_rows.column + x_rows.heads * x_rows.width(x) > x.shape[-1]):
            raise ValueError(f"{name}.shape={x.shape} does not hold the rows {x_rows} describes")
    BH, S, DHA = a_rows.count(a), a_rows.steps(a), a_rows.width(a)
    programs = BH
    if rows is not None:
        per, stride, offset = rows
        if not (per > 0 and offset >= 0 and per + offset <= stride) or BH % stride:
            raise ValueError(
                f"rows={rows} must be (per, stride, offset) with 0 < per, 0 <= offset, per + offset <= stride and "
                f"stride dividing {BH} rows"
            )
        programs = BH // stride * per
    if S == 0 or S % CHUNK:
        raise ValueError(f"a.shape={a.shape}: the steps S={S} must be a positive multiple of {CHUNK}")
    NC, DHB = S // CHUNK, b_rows.width(b)
    if (b_rows.count(b), b_rows.steps(b)) != (BH, S):
        raise ValueError(f"b.shape={b.shape} must be (BH, S, DHB) = ({BH}, {S}, DHB) as a.shape={a.shape}")
    if b.dtype != a.dtype:
        raise ValueError(f"b.dtype={b.dtype} must equal a.dtype={a.dtype}")
    per, first = gain_rows
    if not (per >= 1 and 0 <= first < per):
        raise ValueError(f"gain_rows={gain_rows} must be (rows per chunk, the gains' row) with 0 <= row < rows")
    expected = {"gain": (BH, NC * per, CHUNK), "decay": (BH, NC), "x0": (programs, DHA, DHB)}
    for name, x in (("gain", gain), ("decay", decay), *([("x0", x0)] if x0 is not None else [])):
        if x.shape != expected[name]:
            raise ValueError(
                f"{name}.shape={x.shape} must be {expected[name]} for a.shape={a.shape} and b.shape={b.shape}"
            )
        if x.dtype != jnp.float32:
            raise ValueError(f"{name}.dtype={x.dtype} must be float32")
    reason = state_scan_unsupported(DHA, DHB, a.dtype, block_dhv, depth, consumers, x_operand)
    if reason is not None:
        raise ValueError(
            f"mosaic_state_scan cannot run a.shape={a.shape}, b.shape={b.shape} ({a.dtype}): {reason}"
        )  # fmt: skip
    return programs


@finished_when_interpreted
@functools.partial(
    jax.jit,
    static_argnames=(
        "reverse",
        "block_dhv",
        "depth",
        "consumers",
        "interpret",
        "borders",
        "rows",
        "x_operand",
        "sequences",
        "gain_rows",
    ),
)
def mosaic_state_scan(
    a: jax.Array,  # (BH, S, DHA), S a multiple of CHUNK
    b: jax.Array,  # (BH, S, DHB)
    gain: jax.Array,  # (BH, NC, CHUNK) float32
    decay: jax.Array,  # (BH, NC) float32
    x0: jax.Array | None,  # (BH, DHA, DHB) float32, or None for zeros
    *,
    reverse: bool,
    block_dhv: int = 32,
    depth: int = 2,
    consumers: int = 1,
    interpret: bool = False,
    borders: bool = True,
    rows: tuple[int, int, int] | None = None,
    x_operand: str = "shared",
    sequences: tuple[Rows, Rows] = (HEADS_MAJOR, HEADS_MAJOR),
    gain_rows: tuple[int, int] = (1, 0),
) -> tuple[jax.Array | None, jax.Array]:
    """The chunk-by-chunk state scan on ``BH`` flattened heads (module docstring), in a Mosaic GPU kernel.

    Args:
        a: (BH, S, DHA) bfloat16 or float16, S = NC * CHUNK: the left factors of the updates (k, or q in reverse).
        b: (BH, S, DHB), a's dtype: the right factors (v, or dh in reverse).
        gain: (BH, NC, CHUNK) float32: each step's weight on its row of b.
        decay: (BH, NC) float32: each chunk's factor on the state it carries over.
        x0: (BH, DHA, DHB) float32: the state the scan starts from (before chunk 0, or after chunk NC-1 in
            reverse); None: zeros, none read.
        reverse: Scan from the last chunk to the first.
        block_dhv: Columns of the state per warpgroup, 32 or 64.
        depth: Chunks in flight in the TMA pipeline.
        consumers: Warpgroups per program, 1 or 2, each with its own ``block_dhv`` columns of the state; two share
            the a and gain tiles in shared memory and overlap each other's products and waits (module docstring).
        interpret: Run in Mosaic GPU's interpreter (any backend; slow).
        borders: Write every chunk's border; False: only the last state (borders None), no tile staged.
        rows: None, one scan per row of the inputs; or ``(per, stride, offset)``: ``per`` rows of every
            ``stride`` from the ``offset``-th (a scan of part of each head, read in place), ``BH // stride * per``
            scans, whose x0 and outputs have that many rows.
        x_operand: Where the product's gated operand r(gain ⊙ b) comes from (:data:`X_OPERANDS`): ``"shared"``, a
            tile in shared memory written per chunk (the B operand of aᵀ r(gain ⊙ b)); ``"registers"`` (with
            ``borders=False`` and ``block_dhv=64``), registers: each warpgroup holds Xᵀ and runs the transposed
            product r(gain ⊙ b)ᵀ a with its A operand in registers, no tile written and no fence per chunk
            (:func:`segment_starts`' form where it fits; the same sums and roundings).
        sequences: Where the rows of a and b lie (:class:`~xlstm_jax.kernels.mosaic.Rows` each): heads-major, (BH,
            S, ·) as above; or heads-minor windows of columns of (B, parts · S, W), read in place, BH = B · NH ·
            parts rows of S steps each (gain, decay and x0 per row as above).
        gain_rows: ``(per, row)``: gain holds ``per`` rows a chunk, (BH, NC · per, CHUNK), chunk j's gains in row
            ``j · per + row`` (the gate plan itself, read in place of a copy of its gains' row); (1, 0) as above.

    Returns:
        ``(borders (BH, NC * DHA, DHB) in a's dtype, x_last (BH, DHA, DHB) float32)``: rows ``j * DHA`` to
        ``(j + 1) * DHA`` of borders hold r(X_j) (forward) or r(X_{j+1}) (reverse), the state on chunk j's side
        where the scan enters it; x_last is X_NC (forward) or X_0 (reverse). With ``rows``, a row per scan.

    Raises:
        ValueError: shapes or dtypes that do not fit (naming the argument), or a shape, dtype or tiling the kernel
            does not run (:func:`state_scan_unsupported`).
    """
    if x_operand == "registers" and borders:
        raise ValueError('x_operand="registers" takes borders=False (the borders are staged from X, not Xᵀ)')
    programs = _check(a, b, gain, decay, x0, block_dhv, depth, consumers, rows, x_operand, sequences, gain_rows)
    S, DHA, DHB = sequences[0].steps(a), sequences[0].width(a), sequences[1].width(b)
    params = require_mosaic_interpreter(consumers) if interpret else None
    body = functools.partial(
        _scan_body, reverse=reverse, block_dhv=block_dhv, depth=depth, consumers=consumers, interpret=interpret,
        zero_start=x0 is None, borders=borders, rows=rows, registers=x_operand == "registers", sequences=sequences,
        gain_rows=gain_rows,
    )  # fmt: skip
    kernel = pl.kernel(
        body,
        out_type=(
            *([jax.ShapeDtypeStruct((programs, S // CHUNK * DHA, DHB), a.dtype)] if borders else []),
            jax.ShapeDtypeStruct((programs, DHA, DHB), jnp.float32),
        ),
        mesh=plgpu.Mesh(
            grid=(programs, DHB // (consumers * block_dhv)),
            grid_names=("bh", "vb"),
            num_threads=consumers,
            thread_name="wg",
        ),
        name="mlstm_state_scan_mosaic_reverse" if reverse else "mlstm_state_scan_mosaic",
        **({"interpret": params} if interpret else {}),
    )
    out = kernel(a, b, gain, decay, *(() if x0 is None else (x0,)))
    return (out[0], out[1]) if borders else (None, out[0])


# segment_starts sums a segment's chunks in runs of at most this many chunks, side by side, and cuts them shorter
# (down to _RUN_MIN_CHUNKS) while their grid has fewer than _RUN_MIN_PROGRAMS programs (two waves of about one per SM).
_RUN_CHUNKS = 64
_RUN_MIN_CHUNKS = 8
_RUN_MIN_PROGRAMS = 256


def run_chunks(BH: int, split: int, per: int, column_programs: int) -> int:
    """The chunks per run that :func:`segment_starts` scans side by side for ``BH`` rows cut into ``split`` segments
    of ``per`` chunks, each run taking ``column_programs`` programs (one per block of the state's columns).

    The longest power of two up to :data:`_RUN_CHUNKS` that divides ``per``, halved (not below
    :data:`_RUN_MIN_CHUNKS`) while the runs of the ``split - 1`` segments scanned would have fewer than
    :data:`_RUN_MIN_PROGRAMS` programs. A program's TMA pipeline fills once per run, so long runs pay it less often,
    and a grid of a few programs leaves SMs idle. Timed on an H100 (jax 0.11.2, DHA=256, DHB=512, 64 columns,
    2026-12-07), the scan with XLA's chaining of the runs: four segments of 256 chunks at B=1, NH=8 in 0.426, 0.352
    and 0.305 ms with runs of 16, 32 and 64 chunks; two of 256 at B=2 in 0.291, 0.246 and 0.206 ms; two of 64 at
    B=1 (the 7B prefill of 8192 tokens) in 0.052, 0.068 and 0.080 ms, where 16 chunks give 256 programs.
    """
    size = math.gcd(per, _RUN_CHUNKS)
    while size > _RUN_MIN_CHUNKS and BH * (split - 1) * (per // size) * column_programs < _RUN_MIN_PROGRAMS:
        size //= 2
    return size


def segment_starts(
    a: jax.Array,
    b: jax.Array,
    gain: jax.Array,
    decay: jax.Array,
    x0: jax.Array | None,
    split: int,
    *,
    reverse: bool,
    interpret: bool = False,
    sequences: tuple[Rows, Rows] = (HEADS_MAJOR, HEADS_MAJOR),
    gain_rows: tuple[int, int] = (1, 0),
) -> jax.Array:
    """The state where the scan enters each of ``split`` equal segments of every row's chunks, so that the segments
    can run side by side (the forward kernel's and the backward scan's ``split``).

    The recurrence is affine in X, so a run of chunks acts on the state it is entered with as ``D · X + Y``: D the
    product of its decays, Y the scan from zeros over the run. The runs of :func:`run_chunks` chunks that make
    up every segment but the last one visited are scanned side by side (:func:`mosaic_state_scan` from zeros, the
    last state alone, a, b and gain read in place, the gated operand in registers where 64 columns fit: the same
    products and roundings as the full scan), and XLA
    chains their ``(D, Y)`` from ``x0`` through the segments in the scan's order.

    Args:
        a, b, gain, decay: As :func:`mosaic_state_scan`; S a multiple of ``split`` · :data:`CHUNK`.
        x0: (BH, DHA, DHB) float32, the state the scan starts from, or None for zeros.
        split: Segments per row.
        reverse: The scan's direction (from the last chunk to the first).
        interpret: Run the scan in Mosaic GPU's interpreter.
        sequences: Where the rows of a and b lie: heads-major (BH, S, ·), or windows of heads-minor columns
            (B, S, W) with BH = B · NH, read in place in runs of chunks (:class:`~xlstm_jax.kernels.mosaic.Rows`).
        gain_rows: As :func:`mosaic_state_scan`'s: gain (BH, NC · per, CHUNK), chunk j's gains in row j · per + row.

    Returns:
        (BH * split, DHA, DHB) float32, row-major by (row, segment): the state each segment is entered with (forward:
        before its first chunk; reverse: after its last), ``x0`` for the first one visited.
    """
    a_rows, b_rows = sequences
    BH, S, DHA, DHB = a_rows.count(a), a_rows.steps(a), a_rows.width(a), b_rows.width(b)
    per = S // CHUNK // split  # chunks per segment
    # The gated operand in registers where it fits (64 columns), else in shared memory; two chunks in flight where
    # the tiles fit, else one.
    block_dhv, depth, x_operand = next(
        (b_, d, xo)
        for xo in X_OPERANDS[::-1]
        for d in (2, 1)
        for b_ in (64, 32)
        if state_scan_unsupported(DHA, DHB, a.dtype, b_, d, 1, xo) is None
    )
    size = run_chunks(BH, split, per, DHB // block_dhv)  # chunks per run
    runs = per // size  # runs per segment

    def as_runs(x):  # (BH, NC·…, …) as one row per run, row-major by (row, segment, run)
        return x.reshape(BH * split * runs, x.shape[1] // (split * runs), *x.shape[2:])

    # The runs of every segment but the last visited: forward the first split - 1 segments, reverse the last.
    rows = ((split - 1) * runs, split * runs, runs if reverse else 0)
    # Heads-minor a and b are read in place, a run's steps found by the kernel (Rows); heads-major ones are reshaped.
    heads_minor = a_rows.heads > 0
    if heads_minor:
        sequences = (a_rows._replace(parts=split * runs), b_rows._replace(parts=split * runs))
    operands = (a, b) if heads_minor else tuple(map(as_runs, (a, b)))
    _, y = mosaic_state_scan(
        *operands, *map(as_runs, (gain, decay)), None, reverse=reverse, block_dhv=block_dhv, depth=depth,
        interpret=interpret, borders=False, rows=rows, x_operand=x_operand, sequences=sequences, gain_rows=gain_rows,
    )  # fmt: skip
    y = y.reshape(BH, split - 1, runs, DHA, DHB)
    through = jnp.prod(decay.reshape(BH, split, runs, size), axis=-1)  # each run's decay of the state entering it
    through = through[:, 1:] if reverse else through[:, :-1]  # the runs scanned above
    x = jnp.zeros((BH, DHA, DHB), jnp.float32) if x0 is None else x0.astype(jnp.float32)
    starts = [x]
    for g in reversed(range(split - 1)) if reverse else range(split - 1):
        for r in reversed(range(runs)) if reverse else range(runs):
            x = through[:, g, r, None, None] * x + y[:, g, r]
        starts.append(x)
    starts = starts[::-1] if reverse else starts
    return jnp.stack(starts, axis=1).reshape(BH * split, DHA, DHB)
