"""Every chunk's own gradients of the chunkwise mLSTM as a Mosaic GPU kernel for Hopper (stage (c) of the backward).

The backward of :mod:`xlstm_jax.kernels.chunkwise_mosaic_bw` runs in three passes: the border states r(C_j) before
every chunk, the border cotangents r(dC_{j+1}) after every chunk (two scans), and per chunk the gradients of its
products from those two borders, independent of the other chunks. :func:`mosaic_chunk_gradients` is that last
pass: one program (a CUDA block of ``consumers`` warpgroups, 1 or 2) per head and chunk of L = 64 steps. Per
chunk, with ``scale = DHQK^-1/2``, ``r(·)`` the rounding to the inputs' dtype and every product on the WGMMA units
(operands in the inputs' dtype, float32 accumulation)::

    S = q kᵀ,  D_ts = exp(ROW_t + COL_s) where s <= t and BREAKS_t == BREAKS_s, else 0,  P = S ⊙ D · scale
    X = Σ_v dh ⊙ (q C_j),  dden = -RDEN ⊙ (W ⊙ X + RDEN ⊙ (P ⊙ dh vᵀ) 1)
    dQN = dden ⊙ DDEN_DQN,  dLOWER = dden ⊙ (1 - |DDEN_DQN|)
    dP = RDEN ⊙ (dh vᵀ) + dQN 1ᵀ,  dS = dP ⊙ D · scale,  dlogD = dP ⊙ P
    dROW = dlogD 1,  dCOL = 1ᵀ dlogD
    dq = r(dS) k + r(W ⊙ dh) C_jᵀ                        dINTER = RDEN ⊙ Σ_v dh ⊙ (q C_j)
    dk = r(dS)ᵀ q + r(GAIN ⊙ v) dC_{j+1}ᵀ                dGAIN = Σ_v v ⊙ (k dC_{j+1})
    dv = r(P)ᵀ r(RDEN ⊙ dh) + GAIN ⊙ (k dC_{j+1})        dDECAY = <dC_{j+1}, C_j>

(``RDEN = 1/den``, ``W = INTER/den`` and ``DDEN_DQN``, the slope of ``den = max(|qn|, LOWER) + eps`` in qn
(sign(qn), 1/2 of it at a tie, 0 where LOWER is the larger), come from XLA: the same values as
``_chunk_gradients`` of :mod:`~xlstm_jax.kernels.chunkwise_mosaic_bw`, whose module docstring derives the
gradients. There the normaliser's cotangent ``dden = -Σ_v dh ⊙ h / den``, with ``h = num / den`` and
``num = INTER ⊙ (q C_j) + P v``, is the dden above: from products the kernel has in float32 anyway, so the
backward reads no h.)

The program keeps q and k (L, DHQK) in shared memory and walks the DHV columns in blocks of ``block_dhv``, each
loop a TMA pipeline of two slots:

- first, while the first tiles arrive: ``q kᵀ`` and the gates give P, which goes to shared memory twice, rounded
  (r(P), for dv) and in float32 (for dS);
- dq's loop, over C_j, dC_{j+1}, dh and v blocks: ``r(W ⊙ dh) C_jᵀ`` accumulates into dq (L, DHQK) float32 and
  ``dh vᵀ`` into (L, L); ``q C_j`` per block gives X and dINTER, the border tiles' elementwise product dDECAY.
  After it, from ``dh vᵀ``, X and P (both loaded from shared memory), the normaliser's dQN and dLOWER, then dP,
  dS, dlogD, dROW and dCOL, r(dS) into shared memory (D computed again: with dq's accumulator live, at most two
  (L, L) float32 values are), and ``r(dS) k`` completes dq;
- dk's loop, over dC_{j+1}, v and dh blocks: ``r(GAIN ⊙ v) dC_{j+1}ᵀ`` accumulates into dk, and each block of dv
  is written; then ``r(dS)ᵀ q`` completes dk.

With one warpgroup (``consumers=1``) the two loops run in turn, because one (L, DHQK) float32 accumulator is 128
registers a thread at DHQK = 256 and two would not fit beside the rest (see Registers below). With two
(``consumers=2``) they run at once, one per warpgroup, over one pipeline: warpgroup 0 copies C_j, dC_{j+1}, dh and v
once per block and runs dq's loop, warpgroup 1 runs dk's loop on the same slots, and a slot is refilled once both
have arrived at its "consumed" barrier. Every tile is then read from global memory once per program (with one
warpgroup dC_{j+1}, dh and v twice). Warpgroup 1 waits at barriers for r(P) before its loop and for r(dS) after it.
Once both have arrived at a last barrier (every product reading q and k complete), warpgroup 0 stages dq in q's tile
and warpgroup 1 dk in k's, and warpgroup 0 writes the vectors.

Registers. dq's accumulator (128 float32 registers a thread at DHQK = 256) is live from dq's loop to the end of
dq; the loop adds dh vᵀ's accumulator (32) and per block about 32 more. r(P) is written before the accumulators
are opened (while the first tiles arrive), with P in float32 beside it, and after the loop dh vᵀ goes to shared
memory in float32 (its accumulator's last read), so that computing dS runs no product and holds at most two (L, L)
float32 values beside dq: about 192 registers a thread at the peak, of the 255 a thread can have. (Forming P again
there, a 32-register accumulator beside dq's, made ptxas spill 244 bytes a thread with two warpgroups at DHQK=256;
loading it leaves 4.)

Shared memory (:func:`chunk_gradients_smem_bytes`), at DHQK = 256, block_dhv = 32, bf16: for the whole program q
and k 2·64·256·2 B = 64 KiB, the input and output vectors 2·8·64·4 B = 4 KiB, r(P) and r(dS) 2·64·64·2 B = 16 KiB,
dh vᵀ and P in float32 2·64·64·4 B = 32 KiB (116 KiB). One warpgroup: the larger loop's scope, dq's: two slots of
C_j and dC_{j+1} 2·2·256·32·2 B = 64 KiB, of dh and v 16 KiB, r(W ⊙ dh) 4 KiB (84 KiB; dk's loop needs 60 KiB,
dq's and dk's output tiles 32 KiB): 200 KiB in all, within Hopper's 227 KiB less a 4 KiB reserve for barriers.
block_dhv = 64 needs 284 KiB at DHQK = 256 and runs for DHQK <= 128. Two warpgroups: the shared slots 80 KiB and
both loops' four scratch tiles 16 KiB, 212 KiB; dq and dk need no tiles of their own. block_dhv = 64 runs for
DHQK <= 128 there.

Operands (heads flattened, NC = S / 64 chunks): q, k (BH, S, DHQK) and v, dh (BH, S, DHV) in bf16 or f16; the
borders r(C_j) and r(dC_{j+1}) as (BH, NC · DHQK, DHV) in the same dtype; per chunk 8 float32 vectors of L as
(BH, NC · 8, L), rows :data:`ROW`, :data:`COL`, :data:`BREAKS`, :data:`BREAKS_COL` (the break counts again, read
as a column vector), :data:`GAIN`, :data:`RDEN`, :data:`W`, :data:`DDEN_DQN`.

Interpret mode. ``interpret=True`` runs the kernel in Mosaic GPU's interpreter on any backend (slow; for tests on
a CPU) where the JAX version has one; two warpgroups (``consumers=2``) need three threads in XLA's CPU pool
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
    _SMEM_LIMIT,
    _SMEM_RESERVE,
    CHUNK,
    _product,
    _RegisterTiles,
    _swizzled,
    _transposed,
)
from xlstm_jax.kernels.mosaic import finished_when_interpreted, require_mosaic_interpreter

__all__ = [
    "BREAKS",
    "BREAKS_COL",
    "COL",
    "DDEN_DQN",
    "D_COL",
    "D_DECAY",
    "D_GAIN",
    "D_INTER",
    "D_LOWER",
    "D_QN",
    "D_ROW",
    "GAIN",
    "RDEN",
    "ROW",
    "VEC_ROWS",
    "W",
    "chunk_gradients_smem_bytes",
    "chunk_gradients_unsupported",
    "mosaic_chunk_gradients",
]

VEC_ROWS = 8  # float32 vectors of L per chunk, in the input ``vec`` and the output ``dvec``
# The input vectors' rows: the gate plan's log halves and break counts (as chunk_plan's), each step's gain into the
# state at the chunk's end, 1/den, INTER/den, and den's slope in qn (module docstring).
ROW, COL, BREAKS, BREAKS_COL, GAIN, RDEN, W, DDEN_DQN = range(VEC_ROWS)
# The output vectors' rows; row 7 is 0.
D_ROW, D_COL, D_INTER, D_GAIN, D_DECAY, D_QN, D_LOWER = range(7)
_DEPTH = 2  # pipeline slots of every column-block loop
_ROWS = 64  # the WGMMA layout tiles rows in groups of 64


def chunk_gradients_smem_bytes(DHQK: int, dtype: Any, block_dhv: int, consumers: int = 1) -> int:
    """Bytes of shared memory of the kernel's largest scope: the tiles, not the barriers (module docstring).

    With one warpgroup dq's loop and dk's loop have scopes of their own and the larger counts; with two, one
    pipeline of C_j, dC_{j+1}, dh and v feeds both, beside both loops' scratch tiles.
    """
    L, NV, item = CHUNK, block_dhv, jnp.dtype(dtype).itemsize
    # q, k; the vectors; r(P), r(dS); dh vᵀ and P in float32
    program = 2 * L * DHQK * item + 2 * VEC_ROWS * L * 4 + 2 * L * L * item + 2 * L * L * 4
    slots_q = _DEPTH * (2 * DHQK * NV + 2 * L * NV) * item  # C, dC; dh, v
    if consumers > 1:
        return program + slots_q + 4 * L * NV * item  # r(W ⊙ dh); r(GAIN ⊙ v), r(RDEN ⊙ dh), dv
    loop_q = slots_q + L * NV * item
    loop_k = _DEPTH * (DHQK * NV + 2 * L * NV) * item + 3 * L * NV * item  # dC; v, dh; 3 scratch tiles
    out = L * DHQK * item  # dq or dk on its way out
    return program + max(loop_q, loop_k, out)


def chunk_gradients_unsupported(DHQK: int, DHV: int, dtype: Any, block_dhv: int, consumers: int = 1) -> str | None:
    """Why the kernel cannot run this head shape, dtype, column block and number of warpgroups (``consumers``),
    or None if it can (no device check)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"inputs must be bfloat16 or float16 (the WGMMA operand dtypes), got {jnp.dtype(dtype)}"
    if DHQK % _ROWS or not 0 < DHQK <= 256:
        return f"DHQK={DHQK} must be a multiple of {_ROWS} and at most 256 (dq's accumulator in registers)"
    if block_dhv not in (32, 64) or DHV % block_dhv or DHV <= 0:
        return f"block_dhv={block_dhv} must be 32 or 64 and divide DHV={DHV}"
    if consumers not in (1, 2):
        return f"consumers={consumers!r} must be 1 or 2 (warpgroups per program)"
    smem = chunk_gradients_smem_bytes(DHQK, dtype, block_dhv, consumers)
    if smem + _SMEM_RESERVE > _SMEM_LIMIT:
        return (
            f"the tiles need {smem // 1024} KiB of shared memory at DHQK={DHQK}, block_dhv={block_dhv}, "
            f"consumers={consumers}; a Hopper block has {_SMEM_LIMIT // 1024} KiB, {_SMEM_RESERVE // 1024} KiB of "
            "it kept for barriers"
        )
    return None


def _gradients_body(
    q_ref,  # (BH, S, DHQK) GMEM
    k_ref,  # (BH, S, DHQK)
    v_ref,  # (BH, S, DHV)
    dh_ref,  # (BH, S, DHV)
    borders_ref,  # (BH, NC * DHQK, DHV): r(C_j)
    dborders_ref,  # (BH, NC * DHQK, DHV): r(dC_{j+1})
    vec_ref,  # (BH, NC * 8, L) float32
    dq_ref,  # (BH, S, DHQK) out
    dk_ref,  # (BH, S, DHQK) out
    dv_ref,  # (BH, S, DHV) out
    dvec_ref,  # (BH, NC * 8, L) float32 out
    *,
    block_dhv: int,
    consumers: int,
    interpret: bool,
):
    f32, dtype = jnp.float32, q_ref.dtype
    _, _, DHQK = q_ref.shape
    DHV = v_ref.shape[-1]
    L, NV, NB = CHUNK, block_dhv, DHV // block_dhv
    scale = 1.0 / math.sqrt(DHQK)
    regs = _RegisterTiles(interpret)
    tile, row_layout, col_layout = regs.tile, regs.row_layout, regs.col_layout
    bh, j = lax.axis_index("bh"), lax.axis_index("chunk")
    steps = pl.ds(j * L, L)
    border_rows = pl.ds(j * DHQK, DHQK)
    itemsize = jnp.dtype(dtype).itemsize
    # One swizzle for every product operand (WGMMA needs the two operands' swizzles equal).
    operand = _swizzled(min(128, NV * itemsize), itemsize)
    # With two warpgroups ("consumers") warpgroup 0 issues the copies of the tiles they share.
    split = consumers > 1
    wg = lax.axis_index("wg") if split else 0

    def leader(f):  # runs f on warpgroup 0 only
        if split:
            pl.when(wg == 0)(f)
        else:
            f()

    load, cast, rows = regs.load, regs.cast, regs.rows

    def zeros_row():
        return cast(jnp.zeros((L,), f32), row_layout)

    def program(q_smem, k_smem, vec_smem, dvec_smem, p_smem, ds_smem, dh_v_smem, p32_smem, loaded, *scratch):
        def transposed(ref, index):  # the interpreter's copy in scratch tile ``index``
            return _transposed(ref, scratch[index] if interpret else None, interpret)

        def copy_inputs():
            plgpu.copy_gmem_to_smem(q_ref.at[bh, steps], q_smem, loaded.at[0])
            plgpu.copy_gmem_to_smem(k_ref.at[bh, steps], k_smem, loaded.at[1])
            plgpu.copy_gmem_to_smem(vec_ref.at[bh, pl.ds(j * VEC_ROWS, VEC_ROWS)], vec_smem, loaded.at[2])

        leader(copy_inputs)
        for barrier in range(3):
            plgpu.barrier_wait(loaded.at[barrier])

        def vector(r):
            return load(vec_smem.at[r], row_layout)

        def gates():
            """D (L, L) float32 in registers: exp(ROW_t + COL_s) on the causal steps of one document, else 0."""
            return regs.gates(
                vector(ROW),
                load(vec_smem.at[COL], col_layout),
                vector(BREAKS),
                load(vec_smem.at[BREAKS_COL], col_layout),
            )

        def gated_scores():
            """P (L, L) float32 in registers: q kᵀ on the WGMMA units, gated."""
            scores = _product(q_smem, transposed(k_smem, 0), (L, L))
            return cast(cast(scores, tile) * gates() * scale, tile)

        def write_p():
            """r(P) into shared memory, for dv's product, and P in float32, for dS."""
            p = gated_scores()
            p32_smem[...] = p
            p_smem[...] = cast(p.astype(dtype), tile)
            plgpu.commit_smem()

        def write_ds(inter):
            """From ``dh vᵀ`` (staged in shared memory) and X (``inter``, Σ_v dh ⊙ q C_j): the rows dQN and dLOWER,
            r(dS) into shared memory and the rows dROW and dCOL. dq's accumulator is live here, so at most two (L, L)
            float32 values are: P and dh vᵀ are loaded from shared memory (no product beside dq's accumulator), and
            D is computed again for dS."""
            p = load(p32_smem, tile)
            dh_v = load(dh_v_smem, tile)
            rden = vector(RDEN)
            num_dh = vector(W) * inter + rden * cast(jnp.sum(p * cast(dh_v, tile), axis=1), row_layout)
            dden = cast(-rden * num_dh, row_layout)  # -Σ_v dh ⊙ h / den
            slope = vector(DDEN_DQN)
            dqn = cast(dden * slope, row_layout)
            dvec_smem.at[D_QN][...] = dqn
            dvec_smem.at[D_LOWER][...] = cast(dden * (1.0 - jnp.abs(slope)), row_layout)
            dp = cast(rows(rden, L) * cast(dh_v, tile) + rows(dqn, L), tile)
            dlog_d = cast(dp * p, tile)
            dvec_smem.at[D_ROW][...] = cast(jnp.sum(dlog_d, axis=1), row_layout)
            dvec_smem.at[D_COL][...] = cast(jnp.sum(dlog_d, axis=0), col_layout)
            ds_smem[...] = cast((dp * gates() * scale).astype(dtype), tile)
            plgpu.commit_smem()

        # The column-block loops' tiles, by name: the sources are functions of a column slice giving the GMEM view.
        sources = {
            "c": lambda c: borders_ref.at[bh, border_rows, c],
            "dc": lambda c: dborders_ref.at[bh, border_rows, c],
            "dh": lambda c: dh_ref.at[bh, steps, c],
            "v": lambda c: v_ref.at[bh, steps, c],
        }
        q_tiles, q_scratch = ("c", "dc", "dh", "v"), ("wdh",)  # dq's loop
        k_tiles, k_scratch = ("dc", "v", "dh"), ("gv", "rdh", "dv")  # dk's loop

        def pipeline(names, scratch_names, shared=False):
            """The shared memory of a :func:`blocks` loop: ``_DEPTH`` slots per tile, their barriers, the scratch
            tiles (L, NV), and where the loop is ``shared`` by two warpgroups the slots' "consumed" barriers."""
            shapes = [sources[name](pl.ds(0, NV)).shape[-2:] for name in names]
            return [
                *[plgpu.SMEM((_DEPTH, *shape), dtype, transforms=operand) for shape in shapes],
                plgpu.Barrier(num_arrivals=1, num_barriers=len(names) * _DEPTH),
                *[plgpu.SMEM((L, NV), dtype, transforms=operand) for _ in scratch_names],
                *([plgpu.Barrier(num_arrivals=2, num_barriers=_DEPTH)] if shared else []),
            ]

        def parts(refs, layout):
            """A :func:`pipeline` scope's refs: the slots per tile, their barriers, the scratch tiles by name, and
            the "consumed" barriers (None unless the pipeline is shared)."""
            names, scratch_names = layout
            n, m = len(names), len(scratch_names)
            scratch_tiles = dict(zip(scratch_names, refs[n + 1 : n + 1 + m], strict=True))
            return refs[:n], refs[n], scratch_tiles, refs[n + 1 + m] if len(refs) > n + 1 + m else None

        def issue(refs, layout, b, slot, refill=False):
            """Starts the copies of column block b into ``slot`` (a refill: once the slot is consumed)."""
            buffers, barriers, _, consumed = parts(refs, layout)
            if refill and consumed is not None:
                plgpu.barrier_wait(consumed.at[slot])  # both warpgroups are done with the slot
            for i, name in enumerate(layout[0]):
                barrier = barriers.at[i * _DEPTH + slot]
                plgpu.copy_gmem_to_smem(sources[name](pl.ds(b * NV, NV)), buffers[i].at[slot], barrier)

        def prime(refs, layout):
            """The first ``_DEPTH`` column blocks' copies, before :func:`blocks` (and before its caller opens the
            accumulators, so that what runs while the copies arrive has the registers)."""
            for b in range(min(_DEPTH, NB)):
                issue(refs, layout, b, b)

        def blocks(refs, layout, step, carry, *, issues=True):
            """Runs ``step(b, tiles, scratch, carry)`` over the DHV column blocks b in a two-slot TMA pipeline
            (:func:`prime` has issued the first copies).

            ``refs`` are the allocations of :func:`pipeline` (``layout``: the tiles' and the scratch tiles' names);
            ``tiles`` and ``scratch`` map the names to the current block's copies and to the scratch tiles. ``step``
            ends with every read of its tiles complete (its products waited for, a ``commit_smem`` after its
            loads), so that the slot can be refilled. Only where ``issues`` does this warpgroup copy the tiles; in a
            shared loop a slot is refilled once both warpgroups have arrived at its "consumed" barrier.
            """
            buffers, barriers, scratch_tiles, consumed = parts(refs, layout)

            def body(b, acc):
                slot = lax.rem(b, _DEPTH)
                for i in range(len(buffers)):
                    plgpu.barrier_wait(barriers.at[i * _DEPTH + slot])
                tiles = {name: buffer.at[slot] for name, buffer in zip(layout[0], buffers, strict=True)}
                acc = step(b, tiles, scratch_tiles, acc)

                @pl.when(b + _DEPTH < NB)
                def _():
                    if consumed is not None:  # every read of this warpgroup from the slot has completed
                        plgpu.barrier_arrive(consumed.at[slot])
                    if issues:
                        issue(refs, layout, b + _DEPTH, slot, refill=True)

                return acc

            out = lax.fori_loop(0, NB, body, carry)
            plgpu.wait_smem_to_gmem(0)  # the step's outputs have left shared memory
            return out

        def write(x, out_ref, staging):
            """An (L, ·) float32 tile to ``out_ref`` through the ``staging`` tile, in the outputs' dtype."""
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile has left ``staging``
            staging[...] = cast(x.astype(dtype), tile)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(staging, out_ref)

        def write_scoped(x, out_ref):
            def scoped(staging):
                write(x, out_ref, staging)
                plgpu.wait_smem_to_gmem(0)

            pl.run_scoped(scoped, plgpu.SMEM(x.shape, dtype, transforms=operand))

        # dq's loop: dq's border term, dh vᵀ, dINTER and dDECAY from C_j, dC_{j+1}, dh and v; then dS and dq.
        def q_step(acc_dq, acc_dh_v):
            def step(b, tiles, scratch_tiles, carry):
                c_smem, dc_smem, dh_smem, v_smem = (tiles[name] for name in q_tiles)
                wdh_smem = scratch_tiles["wdh"]
                inter, decay = carry

                def dh():  # loaded where it is used, not held through the loop below (160 registers are in use)
                    return cast(load(dh_smem, tile).astype(f32), tile)

                wdh_smem[...] = cast((rows(vector(W), NV) * dh()).astype(dtype), tile)
                for r in range(DHQK // _ROWS):  # <dC, C> of the blocks, 64 rows of DHQK at a time
                    part = pl.ds(r * _ROWS, _ROWS)
                    c = cast(load(c_smem.at[part], tile).astype(f32), tile)
                    dc = cast(load(dc_smem.at[part], tile).astype(f32), tile)
                    decay = cast(decay + cast(jnp.sum(c * dc, axis=1), row_layout), row_layout)
                plgpu.commit_smem()

                def products(acc_qc):
                    plgpu.wgmma(acc_dq, wdh_smem, transposed(c_smem, 2))
                    plgpu.wgmma(acc_dh_v, dh_smem, transposed(v_smem, 1))
                    plgpu.wgmma(acc_qc, q_smem, c_smem)
                    plgpu.wgmma_wait(0)
                    return acc_qc[...]

                q_c = pl.run_scoped(products, plgpu.ACC((L, NV), f32))
                inter = cast(inter + cast(jnp.sum(dh() * cast(q_c, tile), axis=1), row_layout), row_layout)
                return inter, decay

            return step

        def dq_side(refs, layout=(q_tiles, q_scratch), *, prologue=None, ds_written=None):
            """dq (registers) from dq's loop, with r(dS), dROW, dCOL, dQN and dLOWER (``ds_written`` once they are
            in shared memory) and the rows dINTER and dDECAY into shared memory. ``prologue`` runs while the first
            tiles arrive, before the accumulators are open."""
            prime(refs, layout)
            if prologue is not None:
                prologue()

            def run(acc_dq, acc_dh_v):
                inter, decay = blocks(refs, layout, q_step(acc_dq, acc_dh_v), (zeros_row(), zeros_row()))
                dh_v_smem[...] = cast(acc_dh_v[...], tile)  # its last read: out of the registers for what follows
                write_ds(inter)
                if ds_written is not None:
                    ds_written()
                plgpu.wgmma(acc_dq, ds_smem, k_smem)
                plgpu.wgmma_wait(0)
                return acc_dq[...], inter, decay

            dq, inter, decay = pl.run_scoped(run, plgpu.ACC((L, DHQK), f32), plgpu.ACC((L, L), f32))
            dvec_smem.at[D_INTER][...] = cast(vector(RDEN) * inter, row_layout)
            total = jnp.sum(cast(lax.broadcast_in_dim(decay, (L, L), (0,)), tile), axis=0)  # every entry the sum
            dvec_smem.at[D_DECAY][...] = cast(total, col_layout)
            return dq

        # dk's loop: dk's border term, dv and dGAIN from dC_{j+1}, v, dh and r(P); then dk from r(dS).
        def k_step(acc_dk):
            def step(b, tiles, scratch_tiles, carry):
                dc_smem, v_smem, dh_smem = (tiles[name] for name in k_tiles)
                gv_smem, rdh_smem, dv_smem = (scratch_tiles[name] for name in k_scratch)
                gain = vector(GAIN)
                v = cast(load(v_smem, tile).astype(f32), tile)
                gv_smem[...] = cast((rows(gain, NV) * v).astype(dtype), tile)
                rdh = rows(vector(RDEN), NV) * cast(load(dh_smem, tile).astype(f32), tile)
                rdh_smem[...] = cast(rdh.astype(dtype), tile)
                plgpu.commit_smem()

                def products(acc_pdh, acc_kdc):
                    plgpu.wgmma(acc_dk, gv_smem, transposed(dc_smem, 3))
                    plgpu.wgmma(acc_pdh, transposed(p_smem, 4), rdh_smem)
                    plgpu.wgmma(acc_kdc, k_smem, dc_smem)
                    plgpu.wgmma_wait(0)
                    return acc_pdh[...], acc_kdc[...]

                p_dh, k_dc = pl.run_scoped(products, plgpu.ACC((L, NV), f32), plgpu.ACC((L, NV), f32))
                k_dc = cast(k_dc, tile)
                dv = cast(cast(p_dh, tile) + rows(gain, NV) * k_dc, tile)
                write(dv, dv_ref.at[bh, steps, pl.ds(b * NV, NV)], dv_smem)
                return cast(carry + cast(jnp.sum(v * k_dc, axis=1), row_layout), row_layout)

            return step

        def dk_side(refs, layout=(k_tiles, k_scratch), *, issues=True, prologue=None, ds_ready=None):
            """dk (registers) from dk's loop (r(P) in shared memory once ``prologue`` returns; r(dS) once
            ``ds_ready`` returns), its row dGAIN and the unused row's zeros into shared memory."""
            if issues:
                prime(refs, layout)
            if prologue is not None:
                prologue()

            def run(acc_dk):
                dgain = blocks(refs, layout, k_step(acc_dk), zeros_row(), issues=issues)
                if ds_ready is not None:
                    ds_ready()
                plgpu.wgmma(acc_dk, transposed(ds_smem, 5), q_smem)
                plgpu.wgmma_wait(0)
                return acc_dk[...], dgain

            dk, dgain = pl.run_scoped(run, plgpu.ACC((L, DHQK), f32))
            dvec_smem.at[D_GAIN][...] = cast(dgain, row_layout)
            for r in range(D_LOWER + 1, VEC_ROWS):
                dvec_smem.at[r][...] = zeros_row()
            return dk

        def write_dvec():
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(dvec_smem, dvec_ref.at[bh, pl.ds(j * VEC_ROWS, VEC_ROWS)])

        if not split:  # one warpgroup: dq's loop (r(P) while its first tiles arrive), then dk's, each in a scope
            dq = pl.run_scoped(lambda *refs: dq_side(refs, prologue=write_p), *pipeline(q_tiles, q_scratch))
            write_scoped(dq, dq_ref.at[bh, steps])
            write_scoped(
                pl.run_scoped(lambda *refs: dk_side(refs), *pipeline(k_tiles, k_scratch)), dk_ref.at[bh, steps]
            )
            write_dvec()
            plgpu.wait_smem_to_gmem(0)
            return

        # Two warpgroups, one pass over the column blocks: warpgroup 0 copies every tile once into one shared
        # pipeline and runs dq's loop, warpgroup 1 dk's loop on the same slots. Warpgroup 0 writes r(P) while the
        # first tiles arrive (``loaded.at[3]``) and r(dS) after its loop (``loaded.at[4]``). Each stages its result
        # in the q or k tile once both are done with q and k (the ``done`` barrier); warpgroup 0 writes ``dvec``.
        def scope(*refs):
            refs, done = refs[:-1], refs[-1]

            def finish(x, staging, out_ref):
                plgpu.commit_smem()  # this warpgroup's rows of dvec, for warpgroup 0's copy
                plgpu.barrier_arrive(done)
                plgpu.barrier_wait(done)  # every product reading q and k has completed
                write(x, out_ref, staging)

            def p_written():
                write_p()
                plgpu.barrier_arrive(loaded.at[3])

            @pl.when(wg == 0)
            def _():
                dq = dq_side(refs, layout, prologue=p_written, ds_written=lambda: plgpu.barrier_arrive(loaded.at[4]))
                finish(dq, q_smem, dq_ref.at[bh, steps])
                write_dvec()
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == 1)
            def _():
                dk = dk_side(
                    refs,
                    layout,
                    issues=False,
                    prologue=lambda: plgpu.barrier_wait(loaded.at[3]),
                    ds_ready=lambda: plgpu.barrier_wait(loaded.at[4]),
                )
                finish(dk, k_smem, dk_ref.at[bh, steps])
                plgpu.wait_smem_to_gmem(0)

        layout = (q_tiles, q_scratch + k_scratch)  # the shared pipeline's tiles: dq's loop's, every scratch tile
        pl.run_scoped(scope, *pipeline(*layout, shared=True), plgpu.Barrier(num_arrivals=2), collective_axes="wg")

    # The interpreter's transposed copies (no transposed WGMMA operands there): kᵀ, vᵀ, C_jᵀ, dC_{j+1}ᵀ, r(P)ᵀ, r(dS)ᵀ;
    # with two warpgroups, warpgroup 0 uses the first three and warpgroup 1 the last three.
    transposes = [(DHQK, L), (NV, L), (NV, DHQK), (NV, DHQK), (L, L), (L, L)] if interpret else []
    pl.run_scoped(
        program,
        plgpu.SMEM((L, DHQK), dtype, transforms=operand),
        plgpu.SMEM((L, DHQK), dtype, transforms=operand),
        plgpu.SMEM((VEC_ROWS, L), f32),
        plgpu.SMEM((VEC_ROWS, L), f32),
        plgpu.SMEM((L, L), dtype, transforms=operand),
        plgpu.SMEM((L, L), dtype, transforms=operand),
        plgpu.SMEM((L, L), f32, transforms=_swizzled(min(128, L * 4), 4)),  # dh vᵀ, staged
        plgpu.SMEM((L, L), f32, transforms=_swizzled(min(128, L * 4), 4)),  # P in float32
        plgpu.Barrier(num_arrivals=1, num_barriers=3 + 2 * split),  # q, k, vec loaded; two warpgroups: r(P), r(dS)
        *[plgpu.SMEM(shape, dtype) for shape in transposes],
        **({"collective_axes": "wg"} if split else {}),
    )


def _check(q, k, v, dh, borders, dborders, vec) -> tuple[int, int, int, int, int]:
    """Checks the operands' shapes and dtypes; returns ``(BH, S, DHQK, DHV, NC)``."""
    if q.ndim != 3 or q.shape[1] % CHUNK or q.shape[1] == 0:
        raise ValueError(f"q.shape={q.shape} must be (BH, S, DHQK) with S a positive multiple of {CHUNK}")
    BH, S, DHQK = q.shape
    NC = S // CHUNK
    if k.shape != q.shape:
        raise ValueError(f"k.shape={k.shape} must equal q.shape={q.shape}")
    if v.ndim != 3 or v.shape[:2] != (BH, S):
        raise ValueError(f"v.shape={v.shape} must be (BH, S, DHV) with (BH, S)={(BH, S)}")
    DHV = v.shape[-1]
    expected = {
        "dh": (dh, (BH, S, DHV)),
        "borders": (borders, (BH, NC * DHQK, DHV)),
        "dborders": (dborders, (BH, NC * DHQK, DHV)),
        "vec": (vec, (BH, NC * VEC_ROWS, CHUNK)),
    }
    for name, (x, shape) in expected.items():
        if x.shape != shape:
            raise ValueError(f"{name}.shape={x.shape} must be {shape}")
    for name, x in (("k", k), ("v", v), ("dh", dh), ("borders", borders), ("dborders", dborders)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name}.dtype={x.dtype} must equal q.dtype={q.dtype}")
    if vec.dtype != jnp.float32:
        raise ValueError(f"vec.dtype={vec.dtype} must be float32")
    return BH, S, DHQK, DHV, NC


@finished_when_interpreted
@functools.partial(jax.jit, static_argnames=("block_dhv", "consumers", "interpret"))
def mosaic_chunk_gradients(
    q: jax.Array,  # (BH, S, DHQK), S = NC * 64
    k: jax.Array,  # (BH, S, DHQK)
    v: jax.Array,  # (BH, S, DHV)
    dh: jax.Array,  # (BH, S, DHV)
    borders: jax.Array,  # (BH, NC * DHQK, DHV)
    dborders: jax.Array,  # (BH, NC * DHQK, DHV)
    vec: jax.Array,  # (BH, NC * 8, 64) float32
    *,
    block_dhv: int = 32,
    consumers: int = 1,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Every chunk's gradients of its products from the border states and cotangents (module docstring).

    Args:
        q: Queries (BH, S, DHQK), heads flattened, S a multiple of 64, bf16 or f16.
        k: Keys (BH, S, DHQK), q's dtype.
        v: Values (BH, S, DHV), q's dtype.
        dh: The cotangent of h (BH, S, DHV), q's dtype.
        borders: r(C_j), the memory state before each chunk j, as (BH, NC * DHQK, DHV) in q's dtype.
        dborders: r(dC_{j+1}), the cotangent of the state after each chunk j, (BH, NC * DHQK, DHV) in q's dtype.
        vec: Per chunk the 8 float32 vectors of 64 steps (rows ``ROW`` to ``DDEN_DQN``), (BH, NC * 8, 64).
        block_dhv: Columns of v, dh and the borders per block, 32 or 64.
        consumers: Warpgroups per program, 1 or 2. With 2, dq's loop and dk's loop run at once on one warpgroup
            each (module docstring).
        interpret: Run in Mosaic GPU's interpreter (any backend; slow).

    Returns:
        ``(dq (BH, S, DHQK), dk (BH, S, DHQK), dv (BH, S, DHV))`` in q's dtype and ``dvec`` (BH, NC * 8, 64)
        float32: per chunk the rows ``D_ROW``, ``D_COL``, ``D_INTER``, ``D_GAIN``, ``D_DECAY`` (the chunk's
        ``<dC_{j+1}, C_j>`` in every entry), ``D_QN``, ``D_LOWER`` and a row of 0.

    Raises:
        ValueError: the shapes or dtypes do not fit together, the kernel cannot run them
            (:func:`chunk_gradients_unsupported`), or interpret mode is asked of a JAX without it.
    """
    BH, S, DHQK, DHV, NC = _check(q, k, v, dh, borders, dborders, vec)
    reason = chunk_gradients_unsupported(DHQK, DHV, q.dtype, block_dhv, consumers)
    if reason is not None:
        raise ValueError(f"the Mosaic GPU chunk gradients kernel cannot run this call: {reason}")
    params = require_mosaic_interpreter(consumers) if interpret else None
    body = functools.partial(_gradients_body, block_dhv=block_dhv, consumers=consumers, interpret=interpret)
    mesh = plgpu.Mesh(grid=(BH, NC), grid_names=("bh", "chunk"))
    if consumers > 1:
        mesh = plgpu.Mesh(grid=(BH, NC), grid_names=("bh", "chunk"), num_threads=consumers, thread_name="wg")
    kernel = pl.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((BH, S, DHQK), q.dtype),
            jax.ShapeDtypeStruct((BH, S, DHQK), q.dtype),
            jax.ShapeDtypeStruct((BH, S, DHV), q.dtype),
            jax.ShapeDtypeStruct((BH, NC * VEC_ROWS, CHUNK), jnp.float32),
        ),
        mesh=mesh,
        name="mlstm_chunk_gradients_mosaic",
        **({"interpret": params} if interpret else {}),
    )
    return kernel(q, k, v, dh, borders, dborders, vec)
