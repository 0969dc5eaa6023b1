"""The chunkwise mLSTM forward as a Mosaic GPU kernel for Hopper: chunk tiles on chip, products on the WGMMA units.

The same function as :func:`xlstm_jax.mlstm.chunkwise.chunkwise_fw` (initial states in, last states out, the
``eps`` term, forget-gate resets and ``segment_ids`` document starts), split in two:

1. The gate plan (XLA, :func:`chunk_plan`): everything that depends only on the gates and the normaliser state,
   O(S) per head. The running max ``m_t`` of every step, the border states n and m (an associative scan over
   chunks, :func:`~xlstm_jax.mlstm.chunkwise.border_normalisers`: no loop; where nothing differentiates the plan,
   from 64 chunks, its closed form over blocks of chunks with fewer kernels,
   :func:`~xlstm_jax.mlstm.chunkwise.border_normalisers_blocked`), and per step the factors the kernel
   needs: the row and column halves of the in-chunk gate matrix's log, the break counts that mask it, the weight of the
   border state, ``q̂·n`` of the border normaliser, the lower bound ``exp(-m_t)``, and each step's weight in the
   state at its chunk's end; per chunk, the border state's decay.
2. The kernel (:func:`mosaic_chunkwise`): one program (a CUDA block of ``consumers`` warpgroups) per head and
   block of ``consumers * block_dhv`` columns of c. It walks the head's chunks in order in a TMA pipeline (the
   next chunks' q, k, v tiles load while the current one computes); each warpgroup holds its (DHQK, block_dhv)
   slice of c in registers, in float32, from the initial state to the last state. Per chunk of L = 64 steps::

       P = (q kᵀ) ⊙ D · DHQK^-1/2                      # WGMMA, (L, L); D from the plan, masked causally
       h = (w ⊙ q C + P v) / (max(|rowsum P + q̂n|, exp(-m)) + eps)   # two WGMMAs, (L, block_dhv)
       C = decay · C + kᵀ (g ⊙ v)                      # WGMMA, (DHQK, block_dhv)

   with C rounded to the inputs' dtype only where it enters ``q C`` (as in the XLA form). Every warpgroup of a
   head computes the same (L, L) scores: the price of keeping c on chip with no state written per chunk.

   ``scores="precomputed"`` moves that price out of the kernel: XLA computes every chunk's gated scores and
   its steps' denominators once per head (:func:`normalised_scores`: batched (L, DHQK) x (DHQK, L) products,
   (BH, S, L) bf16 out, 1/8 of h's bytes at DHV=512), and the kernel reads ``P / den`` per chunk as it reads q
   and k, shared by its warpgroups. Per chunk and warpgroup that leaves three products, no exponentials and no
   row sums::

       h = w' ⊙ q C + (P / den) v                      # two WGMMAs, w' = w / den from the readout
       C = decay · C + kᵀ (g ⊙ v)                      # one WGMMA, accumulated onto decay · C

   (at DHQK=256, block_dhv=32 the products a warpgroup issues per chunk drop from 4.5 to 2.4 MFLOP).
   ``scores="kernel"`` computes the same tiles and readout in a Mosaic GPU kernel of their own
   (:mod:`xlstm_jax.kernels.chunkwise_mosaic_scores`: q and k read once, no float32 scores written), which also
   takes the border normaliser's ``q̂·n`` off the gate plan at DHQK up to 256.

   With ``consumers=2`` the two warpgroups of a program share one copy of the q, k and plan tiles in shared
   memory (warpgroup 0 issues their copies) and each has its own v, h, P and C tiles; while one waits on its
   products the other's run. A buffer slot is refilled once both warpgroups have arrived at its "consumed"
   barrier. Shared memory per program (:func:`shared_memory_bytes`) at DHQK=256, block_dhv=32, depth=2, bf16:
   q and k 2·2·64·256·2 B = 128 KiB and the plan 2·8·64·4 B = 4 KiB, shared; per warpgroup v 8 KiB, h 4 KiB,
   C 16 KiB, P 8 KiB, g ⊙ v 4 KiB = 40 KiB; 172 KiB with one warpgroup, 212 KiB with two, which Mosaic GPU lays
   out with its barriers in 174 and 214 KiB (Hopper allows 227). With precomputed scores P is one 8 KiB tile
   per slot, shared, and the plan has 2 rows: 177 KiB with one warpgroup, 209 KiB with two.

The state operand (``c_operand``). With ``"shared"`` each warpgroup rounds C to the inputs' dtype into shared
memory at the end of every chunk, the B operand of the next chunk's ``q C``: a 32 KiB store (DHQK=256, 64
columns) and a fence between one chunk's state update and the next chunk's product. With ``"registers"`` (64
columns per warpgroup, precomputed scores) each warpgroup holds Cᵀ (block_dhv, DHQK) instead, rounded in
registers into the A operand of the transposed products::

    hᵀ = w' ⊙ (Cᵀ q̂ᵀ) + vᵀ (P / den)ᵀ                  # Cᵀ q̂ᵀ first, alone: its bf16 operand is then free
    Cᵀ = decay · Cᵀ + (g ⊙ v)ᵀ k                        # accumulated onto decay · Cᵀ

hᵀ goes into h's tile through a transposed store (the transposed WGMMA register layout: a shuffle within register
pairs), and c0 and c in and out through transposed views of their tiles. With no C tile, two warpgroups of 64
columns fit with two chunks in flight (209 KiB), each running its products while the other waits on its own. On
an H100 at B=8, NH=8, S=8192 the forward took 1.074 ms this way (the default, :func:`forward_tiling`), 1.250 with
one warpgroup and 1.403 with C in shared memory and one warpgroup (BENCHMARKS.md). The backward's border states are
C tiles, so the forward that writes them keeps ``"shared"`` (in the tiling :func:`forward_tiling` picks for it).

Clusters (``cluster`` 2 or 4). A head's column programs all read the same q, k, plan and P tiles per chunk: at
B=8, NH=8, S=8192, DHV=512 and 64 columns a program, its 8 programs read 4.3 GB of q and k from L2 for 0.27 GB
each in HBM. With ``cluster=c`` the grid's programs run in clusters of c consecutive column blocks of one head,
and each shared tile is a TMA multicast: every program of the cluster loads 1/c of it and receives all of it, so
L2 serves each tile once per cluster. A slot is refilled once every warpgroup of the cluster has arrived at its
"consumed" cluster barrier (a program's copy writes into its peers' shared memory), and no program leaves before
all have arrived at a last one. Compiled only: Mosaic GPU's interpreter has no cluster barriers.

Segments (``split``). One program walks a head's chunks in order and one fits an SM, so a few heads leave most
SMs idle (B=1, NH=8, 64 columns: 64 programs). With ``split=s`` each head's chunks are cut into s segments that
the kernel runs as sequences of their own, each from the state before it: the plan, the scores and every output
are per chunk, so a segment is a reshape. The states before the segments come from the recurrence's being affine
in C (:func:`~xlstm_jax.kernels.chunkwise_mosaic_scan.segment_starts`: the state scan kernel sums runs of chunks
side by side, XLA chains them). :func:`auto_split` picks s for a full wave of programs. Under differentiation the
backward's reverse state scan runs in the same segments.

Limits. Hopper (TMA and WGMMA, compute capability 9.0). bf16 or f16 inputs (the WGMMA operand dtypes; float32
inputs would run as TF32 and are left to the XLA form); DHQK a multiple of 64, DHV a multiple of
``consumers * block_dhv`` (block_dhv 32 or 64, consumers 1 or 2), the tiles within Hopper's 227 KiB of shared
memory per block (DHQK=512 fits with one chunk in flight, ``depth=1``: its q and k tiles are 128 KiB per slot).
Non-finite values in k or v make h non-finite in their whole chunk (the XLA form keeps the steps before them
finite). :func:`chunkwise_mosaic_unsupported` says why a call cannot run.

Gradients: a ``custom_vjp``, chosen by ``backward``. A call that is only evaluated runs the kernel. Under
differentiation (``jax.grad``, ``jax.vjp``) ``backward="mosaic"`` (the default) runs this kernel forward and the
Mosaic GPU backward kernels (:mod:`xlstm_jax.kernels.chunkwise_mosaic_bw`: two state scans and a per-chunk
gradient kernel), composed with autodiff of the gate plan, wherever those kernels cover the shape (DHQK up to 256);
``backward="xla"``, and any shape they do not cover, runs the XLA chunkwise form forward and backward (chunk size
``xla_chunk_size``; the two forwards agree to rounding). BENCHMARKS.md compares the two.

Interpret mode. ``interpret=True`` runs the kernel in Mosaic GPU's interpreter on any backend (slow; for tests
on a CPU) where the JAX version has one; two warpgroups (``consumers=2``) need three threads in XLA's CPU pool
(:func:`xlstm_jax.kernels.mosaic.require_mosaic_interpreter`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from xlstm_jax.kernels.mosaic import (
    HEADS_MAJOR,
    LAYOUTS,
    HeadColumns,
    Rows,
    as_array,
    finished_when_interpreted,
    heads_minor_operand,
    require_mosaic_interpreter,
)
from xlstm_jax.kernels.recurrent_step_mosaic import load_ref
from xlstm_jax.mlstm.chunkwise import (
    ChunkedSequence,
    border_normalisers,
    border_normalisers_blocked,
    chunk_sequence,
    chunkwise_fw,
    normalised_weight,
)
from xlstm_jax.mlstm.parallel import (
    block_log_decay,
    block_log_weights,
    block_running_max,
    block_summary,
    block_weights,
)
from xlstm_jax.mlstm.states import cast_states

__all__ = [
    "BACKWARDS",
    "CHUNK",
    "CLUSTERS",
    "C_OPERANDS",
    "ForwardTiling",
    "IN_KERNEL_SCORES_MAX_CHUNKS",
    "SCORES",
    "SPLIT_MIN_CHUNKS",
    "chunk_plan",
    "chunkwise_mosaic_fw",
    "auto_cluster",
    "auto_consumers",
    "auto_depth",
    "auto_scores",
    "auto_split",
    "auto_tiling",
    "chunkwise_mosaic_unsupported",
    "check_split",
    "forward_tiling",
    "mosaic_chunkwise",
    "normalised_scores",
    "shared_memory_bytes",
]

CHUNK = 64  # steps per chunk: the M of the WGMMA tiles of the scores and of h
_ROWS = 64  # the WGMMA layout tiles rows in groups of 64
_PLAN_ROWS = 8  # vectors per chunk in the plan, rows of an (8, L) float32 block
# The plan's rows. The break counts are there twice, read as row and as column vectors: one shared-memory vector
# read in two register layouts defeats JAX 0.11's layout inference.
_ROW, _COL, _BREAKS, _INTER, _QN, _LOWER, _GAIN, _BREAKS_COL = range(_PLAN_ROWS)
# With ``scores="precomputed"`` the kernel reads a readout of two rows per chunk instead (normalised_scores).
_READOUT_ROWS = 2
_W, _G = range(_READOUT_ROWS)  # the border state's weight over the denominator; the step's gain (GAIN above)
# Where the chunk's gated scores are computed (mosaic_chunkwise's ``scores``): by the kernel's warpgroups, or once per
# head before it, by XLA (:func:`normalised_scores`) or by a Mosaic GPU kernel of their own
# (:mod:`xlstm_jax.kernels.chunkwise_mosaic_scores`).
SCORES = ("in_kernel", "precomputed", "kernel")
# Where q C's state operand comes from (``c_operand``): C rounded into shared memory every chunk (the B operand), or
# Cᵀ held in registers (the A operand); module docstring.
C_OPERANDS = ("shared", "registers")
_CLUSTER = "cluster"  # the mesh axis of the programs of a cluster (mosaic_chunkwise's ``cluster``)
CLUSTERS = (1, 2, 4)  # programs per cluster the forward kernel takes
_FOLD_MAX_DHQK = 256  # the largest head size for which the scores kernel computes q̂·n_border (registers)
# chunk_plan's blocked_borders applies from _BLOCKED_MIN_CHUNKS chunks (at 32 it launches more kernels than the scan)
# up to _BLOCKED_MAX_CHUNKS (262,144 steps): its sums over the blocks take (G + 1)³ masks, G = NC / 32.
_BLOCKED_MIN_CHUNKS, _BLOCKED_MAX_CHUNKS = 64, 4096
_SMEM_LIMIT = 227 * 1024  # bytes of shared memory a CUDA block may use on Hopper
_SMEM_RESERVE = 4 * 1024  # kept for the barriers and alignment that Mosaic GPU adds to the tiles (about 2 KiB)


def shared_memory_bytes(
    DHQK: int,
    dtype: Any,
    block_dhv: int,
    depth: int = 2,
    consumers: int = 1,
    scores: str = "in_kernel",
    normaliser: bool = False,
    c_operand: str = "shared",
) -> int:
    """Bytes of shared memory of the kernel's chunk loop (its largest scope): the tiles, not the barriers.

    Per pipeline slot q and k (L, DHQK) and the plan (8, L) float32, shared by the warpgroups; per warpgroup
    ``depth`` v tiles (L, block_dhv), h (L, block_dhv), C rounded (DHQK, block_dhv), P (L, L), g ⊙ v
    (L, block_dhv). With precomputed scores (``"precomputed"``, ``"kernel"``) P arrives per pipeline slot, shared,
    and the plan has 2 rows. With in-kernel scores, ``normaliser`` adds the (2, L) float32 tile that takes each
    chunk's (qn, den) out. With ``c_operand="registers"`` there is no C tile.
    """
    item = jnp.dtype(dtype).itemsize
    precomputed = scores != "in_kernel"
    rows = _READOUT_ROWS if precomputed else _PLAN_ROWS
    p_tile = CHUNK * CHUNK * item
    shared = depth * (2 * CHUNK * DHQK * item + rows * CHUNK * 4 + (p_tile if precomputed else 0))
    own = (depth + 2) * CHUNK * block_dhv * item  # v tiles, h
    own += (DHQK * block_dhv * item if c_operand == "shared" else 0) + (0 if precomputed else p_tile)
    return shared + consumers * own + (2 * CHUNK * 4 if normaliser and not precomputed else 0)


def _column_programs(DHV: int, block_dhv: int, consumers: int) -> int:
    """The kernel's programs per head: one per ``consumers * block_dhv`` columns of c."""
    return DHV // (consumers * block_dhv)


def chunkwise_mosaic_unsupported(
    DHQK: int,
    DHV: int,
    dtype: Any,
    block_dhv: int,
    *,
    depth: int = 2,
    consumers: int = 1,
    scores: str = "in_kernel",
    normaliser: bool = False,
    cluster: int = 1,
    c_operand: str = "shared",
) -> str | None:
    """Why the kernel cannot run this head shape, dtype and tiling, or None if it can (no device check).

    The tiling: ``block_dhv`` columns of c per warpgroup, ``depth`` chunks in flight, ``consumers`` warpgroups per
    program, ``scores`` where the chunk's scores are computed (:data:`SCORES`), ``normaliser`` whether each step's
    (qn, den) leaves the kernel too, ``cluster`` programs per cluster (:data:`CLUSTERS`; they must divide the
    head's ``DHV / (consumers * block_dhv)`` programs), ``c_operand`` where q C's state operand comes from
    (:data:`C_OPERANDS`; ``"registers"`` takes 64 columns, the M of the A operand, and precomputed scores); the
    tiles must fit in a Hopper block's shared memory (:func:`shared_memory_bytes`).
    """
    if scores not in SCORES:
        return f"scores={scores!r} must be one of {SCORES}"
    if c_operand not in C_OPERANDS:
        return f"c_operand={c_operand!r} must be one of {C_OPERANDS}"
    if c_operand == "registers" and (block_dhv != _ROWS or scores == "in_kernel"):
        return (
            f'c_operand="registers" takes block_dhv={_ROWS} (Cᵀ is the A operand, {_ROWS} rows) and precomputed '
            f"scores, got block_dhv={block_dhv}, scores={scores!r}"
        )
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"inputs must be bfloat16 or float16 (the WGMMA operand dtypes), got {jnp.dtype(dtype)}"
    if DHQK % _ROWS:
        return f"DHQK={DHQK} must be a multiple of {_ROWS}"
    if block_dhv not in (32, 64) or DHV % block_dhv:
        return f"block_dhv={block_dhv} must be 32 or 64 and divide DHV={DHV}"
    if consumers not in (1, 2):
        return f"consumers={consumers!r} must be 1 or 2 (warpgroups per program)"
    if DHV % (consumers * block_dhv):
        return (
            f"DHV={DHV} must be a multiple of consumers * block_dhv = {consumers * block_dhv} "
            f"(consumers={consumers}, block_dhv={block_dhv})"
        )
    if not isinstance(depth, int) or depth < 1:
        return f"depth={depth!r} must be a positive integer (chunks in flight)"
    if cluster not in CLUSTERS or isinstance(cluster, bool):
        return f"cluster={cluster!r} must be one of {CLUSTERS} (programs per cluster)"
    if _column_programs(DHV, block_dhv, consumers) % cluster:
        return (
            f"cluster={cluster} must divide the {_column_programs(DHV, block_dhv, consumers)} programs of a head "
            f"(DHV={DHV}, consumers={consumers}, block_dhv={block_dhv})"
        )
    smem = shared_memory_bytes(DHQK, dtype, block_dhv, depth, consumers, scores, normaliser, c_operand)
    if smem + _SMEM_RESERVE > _SMEM_LIMIT:
        detail = ("" if scores == "in_kernel" else f", scores={scores!r}") + (
            "" if c_operand == "shared" else f", c_operand={c_operand!r}"
        )
        return (
            f"the tiles need {smem // 1024} KiB of shared memory at DHQK={DHQK}, block_dhv={block_dhv}, "
            f"depth={depth}, consumers={consumers}{detail}; a Hopper block has {_SMEM_LIMIT // 1024} KiB, "
            f"{_SMEM_RESERVE // 1024} KiB of it kept for barriers"
        )
    return None


BACKWARDS = ("xla", "mosaic")  # what runs under differentiation (chunkwise_mosaic_fw's ``backward``)
_FULL_WAVE = 128  # programs: about one per SM of an H100 or H200 (132 SMs)


def auto_consumers(
    BH: int, DHQK: int, DHV: int, dtype: Any, block_dhv: int = 32, depth: int = 2, scores: str = "in_kernel"
) -> int:
    """The warpgroups per program that ``consumers=None`` picks for ``BH`` heads (batch times heads).

    Two where their grid, ``BH * DHV / (2 * block_dhv)`` programs, still fills the GPU (at least ``_FULL_WAVE``)
    and the tiling fits; one otherwise, so that a small batch keeps its programs spread over every SM. On an
    H200 two warpgroups are 1.3x faster at B·NH=64 and about as fast as one at B·NH=8 (BENCHMARKS.md).
    """
    two = chunkwise_mosaic_unsupported(DHQK, DHV, dtype, block_dhv, depth=depth, consumers=2, scores=scores) is None
    return 2 if two and BH * DHV // (2 * block_dhv) >= _FULL_WAVE else 1


def auto_depth(
    DHQK: int, DHV: int, dtype: Any, block_dhv: int = 32, consumers: int = 1, scores: str = "in_kernel"
) -> int:
    """The chunks in flight that ``depth=None`` picks for a tiling: two (the next chunk's copies overlap this
    chunk's products) where the tiles fit, else one (at DHQK=512, where q and k alone take 128 KiB a slot)."""
    fits = chunkwise_mosaic_unsupported(DHQK, DHV, dtype, block_dhv, depth=2, consumers=consumers, scores=scores)
    return 2 if fits is None else 1


# Sequences of at most this many chunks compute their scores in the kernel when ``scores`` is None
# (:func:`auto_scores`).
IN_KERNEL_SCORES_MAX_CHUNKS = 4


def auto_scores(S: int) -> str:
    """Where ``scores=None`` computes the chunks' gated scores for a sequence of ``S`` steps (:data:`SCORES`).

    ``"in_kernel"`` for at most :data:`IN_KERNEL_SCORES_MAX_CHUNKS` chunks (256 steps), ``"kernel"`` beyond.
    Computing the scores ahead of the chunk kernel costs launches before each call (one scores kernel, its plan
    rows; precomputed in XLA, 4 to 6 kernels per mLSTM layer in xLSTM-7B's chunk programs of 16 to 256 tokens
    compiled for an H200, ``benchmarks/launches.py``), and saves each program recomputing its head's scores, a
    cost that grows with the chunks (at DHQK=256 about 2 MFLOP a chunk, a fraction of a microsecond on an SM). A
    short call (a served prompt's chunk, whose first token waits on it and whose launches the host pays for one by
    one) is better off without them; a long one (training, a long prompt) with them, and with the scores kernel
    rather than XLA's passes: the same chunk kernel after it, forward 1.660 against 1.849 ms at B=8, NH=8, S=8192
    and 0.518 against 0.615 ms at S=2048 on an H100 (64 columns, one warpgroup; BENCHMARKS.md). The limit of 4
    chunks is not timed.
    """
    return "in_kernel" if -(-S // CHUNK) <= IN_KERNEL_SCORES_MAX_CHUNKS else "kernel"


def auto_cluster(DHV: int, block_dhv: int, consumers: int, interpret: bool = False) -> int:
    """The programs per cluster that ``cluster=None`` picks: 2 where they divide a head's ``DHV / (consumers *
    block_dhv)`` programs, else 1; 1 in the interpreter, which has no cluster barriers.

    On an H100 at B=8, NH=8, DHQK=256, DHV=512 (64 columns, one warpgroup, the scores kernel) clusters of two took
    the forward from 1.436 to 1.395 ms at S=8192 and from 0.426 to 0.420 ms at S=2048, and the xLSTM-7B prefill of
    8192 tokens from 189.1 to 187.8 ms; clusters of four were slower (1.609 and 0.469 ms; BENCHMARKS.md).
    """
    if interpret:
        return 1
    return 2 if _column_programs(DHV, block_dhv, consumers) % 2 == 0 else 1


# auto_split cuts a head's chunks into segments of at least this many chunks (4096 steps).
SPLIT_MIN_CHUNKS = 64


def auto_split(BH: int, NC: int, DHV: int, block_dhv: int = 64, consumers: int = 1) -> int:
    """The segments per head that ``split=None`` picks for ``BH`` heads (batch times heads) of ``NC`` chunks.

    The kernel walks each head's chunks in order, one program per column block, so a few heads leave most SMs
    idle: at B=1, NH=8, DHV=512 and 64 columns, 64 programs for 132 SMs. Split into segments, each head runs as
    that many sequences (:func:`mosaic_chunkwise`), for the price of a state scan over every segment but the last
    before the kernel (:func:`~xlstm_jax.kernels.chunkwise_mosaic_scan.segment_starts`). The smallest power of two
    whose grid, ``BH * split`` times the head's column programs, reaches ``_FULL_WAVE``, while it divides NC into
    segments of at least :data:`SPLIT_MIN_CHUNKS`; 1 for a grid that fills the GPU already.
    """
    split, programs = 1, BH * _column_programs(DHV, block_dhv, consumers)
    while programs * split < _FULL_WAVE and NC % (2 * split) == 0 and NC // (2 * split) >= SPLIT_MIN_CHUNKS:
        split *= 2
    return split


def auto_tiling(
    BH: int,
    DHQK: int,
    DHV: int,
    dtype: Any,
    block_dhv: int | None = None,
    consumers: int | None = None,
    depth: int = 2,
    scores: str = "precomputed",
) -> tuple[int, int]:
    """The ``(block_dhv, consumers)`` that None picks for ``BH`` heads (batch times heads), either given kept.

    With precomputed scores, 64 columns and one warpgroup where that grid, ``BH * DHV / 64`` programs, fills the
    GPU (at least ``_FULL_WAVE``) and the tiles fit: the widest products, no scores recomputed, c and its update
    in 128 registers a thread (2.03 ms against 2.41 for 32 columns and two warpgroups at B=8, NH=8, S=8192 on an
    H200; BENCHMARKS.md). Otherwise 32 columns with :func:`auto_consumers`' warpgroups, so that a small batch (the
    7B prefill at batch 1: 8 heads) keeps its programs spread over every SM.
    """
    if block_dhv is None:
        wide = scores != "in_kernel" and consumers in (None, 1) and BH * DHV // 64 >= _FULL_WAVE
        if wide and chunkwise_mosaic_unsupported(DHQK, DHV, dtype, 64, depth=depth, scores=scores) is None:
            return 64, 1
        block_dhv = 32
    if consumers is None:
        consumers = auto_consumers(BH, DHQK, DHV, dtype, block_dhv, depth, scores)
    return block_dhv, consumers


class ForwardTiling(NamedTuple):
    """The forward kernel's tiling, every choice resolved (:func:`forward_tiling`)."""

    block_dhv: int  # columns of c per warpgroup
    consumers: int  # warpgroups per program
    depth: int  # chunks in flight
    cluster: int  # programs per cluster
    split: int  # segments per head
    c_operand: str  # where q C's state operand comes from (C_OPERANDS)


def check_split(split: Any, NC: int, S: int) -> None:
    """Raises ValueError unless ``split`` is None or a positive integer dividing the ``NC`` chunks of ``S`` steps."""
    if split is not None and (isinstance(split, bool) or not isinstance(split, int) or split < 1 or NC % split):
        raise ValueError(
            f"split={split!r} must be None or a positive integer dividing the sequence's {NC} chunks of {CHUNK} "
            f"steps (S={S})"
        )


def forward_tiling(
    BH: int,
    S: int,
    DHQK: int,
    DHV: int,
    dtype: Any,
    scores: str,
    *,
    block_dhv: int | None = None,
    consumers: int | None = None,
    depth: int | None = None,
    cluster: int | None = None,
    split: int | None = None,
    interpret: bool = False,
    c_operand: str | None = None,
) -> ForwardTiling:
    """The tiling :func:`chunkwise_mosaic_fw` runs for ``BH`` heads (batch times heads) of ``S`` steps, each None
    picked. With precomputed scores, first the state in registers (``c_operand="registers"``) with two warpgroups
    of 64 columns and two chunks in flight, where none of that is given otherwise and its grid, after
    :func:`auto_split`'s segments for it, fills the GPU (at least ``_FULL_WAVE`` programs): the fastest forward at
    every shape of BENCHMARKS.md's table, 1.066 against 1.403 ms for C in shared memory (64 columns, one
    warpgroup) at B=8, NH=8, S=8192 on an H100. Otherwise ``split`` by :func:`auto_split` for the widest tiling
    unless a tiling is given (1 with the scores in the kernel), then ``block_dhv`` and ``consumers`` by
    :func:`auto_tiling` for the ``BH * split`` sequences, ``depth`` by :func:`auto_depth`, ``cluster`` by
    :func:`auto_cluster`, and ``c_operand`` ``"registers"`` where that tiling takes it (64 columns, precomputed
    scores), else ``"shared"``. Whether the kernel can run the result is :func:`chunkwise_mosaic_unsupported`'s to
    say.

    Raises:
        ValueError: ``split`` does not divide the sequence's chunks (:func:`check_split`).
    """
    NC = -(-S // CHUNK)
    check_split(split, NC, S)
    free = block_dhv in (None, 64) and consumers in (None, 2) and depth in (None, 2)
    if free and scores != "in_kernel" and c_operand in (None, "registers"):
        wide_split = auto_split(BH, NC, DHV, 64, 2) if split is None else split
        fits = chunkwise_mosaic_unsupported(DHQK, DHV, dtype, 64, consumers=2, scores=scores, c_operand="registers")
        if fits is None and BH * wide_split * _column_programs(DHV, 64, 2) >= _FULL_WAVE:
            cluster = auto_cluster(DHV, 64, 2, interpret) if cluster is None else cluster
            return ForwardTiling(64, 2, 2, cluster, wide_split, "registers")
    if split is None:
        split = 1 if scores == "in_kernel" else auto_split(BH, NC, DHV, block_dhv or 64, consumers or 1)
    tiling_depth = 2 if depth is None else depth
    block_dhv, consumers = auto_tiling(BH * split, DHQK, DHV, dtype, block_dhv, consumers, tiling_depth, scores)
    depth = auto_depth(DHQK, DHV, dtype, block_dhv, consumers, scores) if depth is None else depth
    cluster = auto_cluster(DHV, block_dhv, consumers, interpret) if cluster is None else cluster
    if c_operand is None:
        registers = chunkwise_mosaic_unsupported(
            DHQK, DHV, dtype, block_dhv, depth=depth, consumers=consumers, scores=scores, c_operand="registers"
        )  # fmt: skip
        c_operand = "registers" if registers is None else "shared"
    return ForwardTiling(block_dhv, consumers, depth, cluster, split, c_operand)


def _swizzled(swizzle: int, itemsize: int) -> tuple[Any, Any]:
    """Shared-memory transforms of a tile swizzled in groups of ``swizzle`` bytes (8-row tiles that wide)."""
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


class _Warpgroups:
    """The warpgroups ("consumers") of one kernel program, its thread axis ``"wg"``, each with ``NV`` columns of
    the column block ``vb``. With two, per-warpgroup tiles have a leading axis of 2 and warpgroup 0 issues the
    copies of the tiles they share; one warpgroup leaves every tile and copy as it is."""

    def __init__(self, consumers: int, vb: Any, NV: int):
        self.consumers, self.split, self.NV = consumers, consumers > 1, NV
        self.wg = lax.axis_index("wg") if self.split else 0
        self.columns = pl.ds((vb * consumers + self.wg) * NV, NV) if self.split else pl.ds(vb * NV, NV)

    def own(self, ref: Any) -> Any:
        """This warpgroup's tile of a per-warpgroup allocation."""
        return ref.at[self.wg] if self.split else ref

    def smem(self, shape: tuple[int, ...], dtype: Any, **kwargs: Any) -> Any:
        """A per-warpgroup shared-memory allocation."""
        return plgpu.SMEM((self.consumers, *shape) if self.split else shape, dtype, **kwargs)

    def barrier(self) -> Any:
        """One single-arrival barrier per warpgroup."""
        if self.split:
            return plgpu.Barrier(num_arrivals=1, num_barriers=self.consumers)
        return plgpu.Barrier(num_arrivals=1)

    def leader(self, f: Any) -> None:
        """Runs f on warpgroup 0 only."""
        if self.split:
            pl.when(self.wg == 0)(f)
        else:
            f()

    # A float32 state (rows, NV) goes in and out through a tile of a scope of its own, so that its shared memory is
    # reused by the next scope's. Each scope starts with the warpgroups in step (Pallas puts a block barrier
    # there), so one scope's memory is reused by the next only once every warpgroup has left the first.
    def _state_tile(self, rows: int) -> Any:
        return self.smem((rows, self.NV), jnp.float32, transforms=_swizzled(min(128, self.NV * 4), 4))

    def state_in(self, src: Any, bh: Any, load: Any) -> jax.Array:
        """This warpgroup's columns of head ``bh`` of the state ``src`` (BH, rows, ·) in registers (``load``)."""

        def scoped(tile, loaded):
            tile, loaded = self.own(tile), self.own(loaded)
            plgpu.copy_gmem_to_smem(src.at[bh, :, self.columns], tile, loaded)
            plgpu.barrier_wait(loaded)
            return load(tile)

        return pl.run_scoped(scoped, self._state_tile(src.shape[1]), self.barrier(), collective_axes="wg")

    def state_out(self, x: jax.Array, dst: Any, bh: Any, store: Any = None) -> None:
        """The registers ``x`` to this warpgroup's columns of head ``bh`` of ``dst`` (BH, rows, ·), through
        ``store(tile, x)`` (None: as they are)."""

        def scoped(tile):
            tile = self.own(tile)
            if store is None:
                tile[...] = x
            else:
                store(tile, x)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(tile, dst.at[bh, :, self.columns])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, self._state_tile(dst.shape[1]), collective_axes="wg")


def _load(ref: Any, layout: Any, interpret: bool) -> jax.Array:
    """``ref`` into registers in ``layout`` (the interpreter has no layouts, nor ``plgpu.load``)."""
    return ref[...] if interpret else load_ref(ref, layout, optimized=False)


class _RegisterTiles:
    """Register values of the chunk kernels in the WGMMA layout: loads, layout annotations (JAX 0.11's layout
    inference needs them to settle these kernels), (L, width) broadcasts of row and column vectors, step indices
    and the in-chunk gate matrix. In the interpreter (no layouts) the annotations are no-ops."""

    def __init__(self, interpret: bool):
        self.interpret = interpret
        self.tile = plgpu.Layout.WGMMA
        self.row_layout, self.col_layout = self.tile.reduce(1), self.tile.reduce(0)

    def load(self, ref: Any, layout: Any) -> jax.Array:
        return _load(ref, layout, self.interpret)

    def cast(self, x: jax.Array, layout: Any) -> jax.Array:
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def rows(self, x: jax.Array, width: int) -> jax.Array:
        """A row vector (L,) broadcast along the columns of an (L, width) tile."""
        return self.cast(lax.broadcast_in_dim(x, (CHUNK, width), (0,)), self.tile)

    def columns(self, x: jax.Array) -> jax.Array:
        """A column vector (width,) broadcast along the L rows of an (L, width) tile."""
        return self.cast(lax.broadcast_in_dim(x, (CHUNK, x.shape[0]), (1,)), self.tile)

    def iota(self, dimension: int, width: int = CHUNK) -> jax.Array:
        """(L, width) indices along ``dimension`` (the scores' step indices at the default width), in the WGMMA
        layout."""
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, (CHUNK, width), dimension)
        return plgpu.broadcasted_iota(jnp.int32, (CHUNK, width), dimension, layout=self.tile)

    def gates(self, row: jax.Array, col: jax.Array, breaks_t: jax.Array, breaks_s: jax.Array) -> jax.Array:
        """D (L, L) float32: ``exp(row_t + col_s)`` where s <= t in one document (equal break counts), else 0;
        ``row`` and ``breaks_t`` in the row layout, ``col`` and ``breaks_s`` in the column layout."""
        same = self.rows(breaks_t, CHUNK) == self.columns(breaks_s)
        log_d = self.rows(row, CHUNK) + self.columns(col)
        return self.cast(jnp.where((self.iota(1) <= self.iota(0)) & same, jnp.exp(log_d), 0.0), self.tile)


def _register_operand(x: jax.Array, scratch: Any, interpret: bool) -> Any:
    """Registers ``x`` (the WGMMA layout, the operands' dtype) as a WGMMA A operand: ``x`` itself, or in the
    interpreter (whose products read shared memory only) ``x`` stored in ``scratch``."""
    if not interpret:
        return x
    scratch[...] = x
    return scratch


def _store_transposed(ref: Any, x: jax.Array, interpret: bool) -> None:
    """``xᵀ`` into ``ref``: registers ``x`` (the WGMMA layout) moved to the transposed WGMMA layout (a shuffle
    within register pairs) and stored through ``ref``'s transposed view; the interpreter transposes the value."""
    if interpret:
        ref[...] = x.T
    else:
        ref.transpose((1, 0))[...] = plgpu.layout_cast(x, plgpu.Layout.WGMMA_TRANSPOSED)


def _load_transposed(ref: Any, interpret: bool) -> jax.Array:
    """``refᵀ`` in registers in the WGMMA layout: loaded through ``ref``'s transposed view in the transposed WGMMA
    layout, then moved to the WGMMA layout (the inverse of :func:`_store_transposed`)."""
    if interpret:
        return ref[...].T
    x = load_ref(ref.transpose((1, 0)), plgpu.Layout.WGMMA_TRANSPOSED, optimized=False)
    return plgpu.layout_cast(x, plgpu.Layout.WGMMA)


def _transposed(ref: Any, scratch: Any, interpret: bool) -> Any:
    """``ref``ᵀ as a WGMMA operand: a transposed view, or in the interpreter (which has no transposed operands) a
    transposed copy in ``scratch``."""
    if not interpret:
        return ref.transpose((1, 0))
    scratch[...] = ref[...].T
    return scratch


def _product(a: Any, b: Any, shape: tuple[int, int]) -> jax.Array:
    """``a @ b`` of two shared-memory operands on the WGMMA units, float32 accumulation, into registers."""

    def run(acc):
        plgpu.wgmma(acc, a, b)
        plgpu.wgmma_wait(0)
        return acc[...]

    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _accumulate(products: Any, inits: tuple[jax.Array, ...], interpret: bool) -> tuple[jax.Array, ...]:
    """Runs ``products(accs)`` on WGMMA accumulators that start at ``inits`` (float32, in the WGMMA layout) and
    returns their values once every product has completed: ``pl.run_state`` with initialised accumulators, so an
    accumulator and the value it starts from share registers. The interpreter has no ``run_state``: there the
    accumulators start at zero and ``inits`` are added after (the same sums in another order)."""
    if not interpret:
        return pl.run_state(products)(tuple(plgpu.ACC.init(x) for x in inits))

    def run(*accs):
        products(accs)
        return tuple(acc[...] for acc in accs)

    sums = pl.run_scoped(run, *(plgpu.ACC(x.shape, jnp.float32) for x in inits))
    return tuple(x + y for x, y in zip(inits, sums, strict=True))


def _chunk_body(
    q_ref,  # (BH, S, DHQK) GMEM, S a multiple of L
    k_ref,  # (BH, S, DHQK)
    v_ref,  # (BH, S, DHV)
    plan_ref,  # (BH, NC * 8, L) float32: chunk_plan's vectors; precomputed: (BH, NC * 2, L), the readout
    decay_ref,  # (BH, NC) float32: each chunk's decay of the border state
    *refs,  # c0 (BH, DHQK, DHV) float32 unless zero_state; precomputed: P / den (BH, NC * L, L) in q's dtype; then
    # the outputs h, c and maybe the borders
    eps: float,
    block_dhv: int,
    depth: int,
    consumers: int,
    interpret: bool,
    precomputed: bool,
    borders: bool,
    normaliser: bool,
    cluster: int,
    zero_state: bool,
    segments: int = 1,
    c_operand: str = "shared",
    sequences: tuple[Rows, Rows, Rows, Rows] = (HEADS_MAJOR,) * 4,
):
    # c_operand="registers": each warpgroup holds Cᵀ (NV, DHQK) rather than C, and c0 and c go in and out transposed.
    # The outputs: h (BH / segments, segments * S, DHV) in h's dtype, each head's segments one after another (the
    # caller's layout: XLA's fusions read h without a reshape of its rows); c (BH, DHQK, DHV) float32; with borders,
    # r(C_j) before every chunk (BH, NC * DHQK, DHV) in q's dtype; with normaliser (in-kernel scores), each chunk's
    # (qn, den) (BH, NC * 2, L). BH and S count the segments as sequences of their own. ``sequences``: where a
    # program's rows of q, k, v and h lie (kernels.mosaic.Rows, parts = segments): the segments of heads-major
    # q, k and v are a reshape (one row each), heads-minor ones are read in place; h's are its heads' rows in order.
    c0_ref, refs = (None, refs) if zero_state else (refs[0], refs[1:])
    p_ref, refs = (refs[0], refs[1:]) if precomputed else (None, refs)
    h_ref, c_ref, *rest = refs
    borders_ref = rest.pop(0) if borders else None
    norm_ref = rest.pop(0) if normaliser else None
    f32, dtype = jnp.float32, q_ref.dtype
    q_rows, k_rows, v_rows, h_rows_of = sequences
    S, DHQK = q_rows.steps(q_ref), q_rows.width(q_ref)
    L, NV, NC = CHUNK, block_dhv, S // CHUNK
    rows = _READOUT_ROWS if precomputed else _PLAN_ROWS  # of the plan, per chunk
    scale = 1.0 / math.sqrt(DHQK)
    regs = _RegisterTiles(interpret)
    tile, row_layout, col_layout, load, cast = regs.tile, regs.row_layout, regs.col_layout, regs.load, regs.cast
    bh, vb = lax.axis_index("bh"), lax.axis_index("vb")
    clustered = cluster > 1
    shared_c = c_operand == "shared"

    def load_c(ref):  # the state's tile (DHQK, NV) into registers: C, or with c_operand="registers" Cᵀ
        return load(ref, tile) if shared_c else _load_transposed(ref, interpret)

    if clustered:  # the programs of a cluster: consecutive column blocks of one head
        vb = vb * cluster + lax.axis_index(_CLUSTER)
    # With a cluster, the tiles of the head's q, k, plan and P are multicast: each program of the cluster loads its
    # share and every program receives the whole tile.
    multicast = {"collective_axes": _CLUSTER} if clustered else {}
    itemsize = jnp.dtype(dtype).itemsize
    group = _Warpgroups(consumers, vb, NV)
    split, wg, columns, own, per_warpgroup, leader = (
        group.split, group.wg, group.columns, group.own, group.smem, group.leader
    )  # fmt: skip
    # A slot of the shared tiles is refilled once every warpgroup reading it (those of the cluster) is done with it.
    shared_slots = split or clustered
    consumed_barrier = (
        functools.partial(plgpu.ClusterBarrier, collective_axes=(_CLUSTER,)) if clustered else plgpu.Barrier
    )
    # Indices (times depth) into ``loaded``: q 0, k 1, each warpgroup's v, the plan, and the precomputed P.
    v_barrier, plan_barrier, p_barrier = 2 + wg, 2 + consumers, 3 + consumers
    operands = (0, 1, v_barrier, plan_barrier, *((p_barrier,) if precomputed else ()))

    # One swizzle for every product operand (WGMMA needs the two operands' swizzles equal): the widest that a
    # row of block_dhv columns allows.
    swizzle = min(128, NV * itemsize)
    operand = _swizzled(swizzle, itemsize)

    def accumulated(acc, wait_n):  # an accumulator once at most wait_n products are in flight
        return acc[...] if interpret else plgpu.wgmma_accumulator_load(acc, wait_n=wait_n)

    def body(q_bufs, k_bufs, v_bufs, plan_bufs, h_smem, p_smem, gv_smem, loaded, *rest):
        c16_smem, rest = (own(rest[0]), rest[1:]) if shared_c else (None, rest)
        norm_smem, rest = (rest[0], rest[1:]) if normaliser else (None, rest)
        consumed, rest = (rest[0], rest[1:]) if shared_slots else (None, rest)
        done, scratch = (rest[0], rest[1:]) if clustered else (None, rest)  # scratch: the interpreter's copies
        scratch = tuple(map(own, scratch))
        v_bufs, h_smem, gv_smem = map(own, (v_bufs, h_smem, gv_smem))
        if not precomputed:  # each warpgroup's own P; precomputed, one per pipeline slot, shared
            p_smem = own(p_smem)

        def issue(j, slot, refill=False):
            """Starts the TMA copies of chunk j's tiles into buffer ``slot`` (a refill: once it is consumed)."""
            steps = pl.ds(j * L, L)

            def copy_v():
                v_loaded = loaded.at[v_barrier * depth + slot]
                plgpu.copy_gmem_to_smem(v_rows.window(v_ref, bh, j * L, L, columns), v_bufs.at[slot], v_loaded)

            def copy_shared():
                if refill and shared_slots:
                    plgpu.barrier_wait(consumed.at[slot])  # every warpgroup of the cluster is done with the slot
                q_tile, k_tile = q_rows.window(q_ref, bh, j * L, L), k_rows.window(k_ref, bh, j * L, L)
                plgpu.copy_gmem_to_smem(q_tile, q_bufs.at[slot], loaded.at[slot], **multicast)
                plgpu.copy_gmem_to_smem(k_tile, k_bufs.at[slot], loaded.at[depth + slot], **multicast)
                if not split:
                    copy_v()
                plan_rows = pl.ds(j * rows, rows)
                plan_loaded = loaded.at[plan_barrier * depth + slot]
                plgpu.copy_gmem_to_smem(plan_ref.at[bh, plan_rows], plan_bufs.at[slot], plan_loaded, **multicast)
                if precomputed:
                    p_loaded = loaded.at[p_barrier * depth + slot]
                    plgpu.copy_gmem_to_smem(p_ref.at[bh, steps], p_smem.at[slot], p_loaded, **multicast)

            leader(copy_shared)
            if split:
                copy_v()  # each warpgroup its own columns

        # c0 into its tile before any copy into this scope: the loads of c0 from the last scope's tile (which these
        # tiles reuse) are then ordered before the copies by the fence.
        if shared_c:
            c16_smem[...] = cast(c_init.astype(dtype), tile)
        plgpu.commit_smem()
        for j in range(min(depth, NC)):
            issue(j, j)

        def chunk(j, c):
            slot = lax.rem(j, depth)
            for operand in operands:
                plgpu.barrier_wait(loaded.at[operand * depth + slot])
            if borders_ref is not None:  # r(C_j), committed at the end of the last chunk, out while this one runs
                plgpu.copy_smem_to_gmem(c16_smem, borders_ref.at[bh, pl.ds(j * DHQK, DHQK), columns])
            q_smem, k_smem, v_smem, plan_smem = q_bufs.at[slot], k_bufs.at[slot], v_bufs.at[slot], plan_bufs.at[slot]
            if shared_c:
                k_t = _transposed(k_smem, scratch[0] if interpret else None, interpret)  # (DHQK, L)

            def scores_to_p(scores):
                """The gated scores P (registers) from q kᵀ, and P into shared memory for P v."""
                d = regs.gates(
                    load(plan_smem.at[_ROW], row_layout),
                    load(plan_smem.at[_COL], col_layout),
                    load(plan_smem.at[_BREAKS], row_layout),
                    load(plan_smem.at[_BREAKS_COL], col_layout),
                )
                p = cast(cast(scores, tile) * d * scale, tile)
                p_smem[...] = cast(p.astype(dtype), tile)
                return p

            def gated_values():
                """g ⊙ v into shared memory for the state update kᵀ (g ⊙ v)."""
                gain = load(plan_smem.at[_G if precomputed else _GAIN], row_layout)
                gv = load(v_smem, tile).astype(f32) * cast(lax.broadcast_in_dim(gain, (L, NV), (0,)), tile)
                gv_smem[...] = cast(gv.astype(dtype), tile)

            def normalised(p, inter, intra):
                """``(h, (qn, den))``: h = (w ⊙ q C + P v) / den, den from P's row sums (in-kernel scores)."""
                w = load(plan_smem.at[_INTER], row_layout)
                qn = cast(cast(jnp.sum(p, axis=1), row_layout) + load(plan_smem.at[_QN], row_layout), row_layout)
                den = cast(jnp.maximum(jnp.abs(qn), load(plan_smem.at[_LOWER], row_layout)) + eps, row_layout)
                num = cast(
                    cast(lax.broadcast_in_dim(w, (L, NV), (0,)), tile) * cast(inter, tile) + cast(intra, tile), tile
                )
                return cast(num / cast(lax.broadcast_in_dim(den, (L, NV), (0,)), tile), tile), (qn, den)

            def h_rows(h_ref, j):  # chunk j's rows of this program's columns of h (each head's segments in order)
                return h_rows_of.window(h_ref, bh, j * L, L, columns)

            def write_h(h, qn_den=None, transposed=False):
                """h to its rows and columns (``transposed``: from hᵀ); ``qn_den`` (in-kernel scores, with
                ``normaliser``) to this chunk's rows of the (qn, den) output, from the head's first column block's
                first warpgroup (all compute it)."""
                h = cast(h.astype(dtype), tile)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's h (and qn, den) have left
                if transposed:
                    _store_transposed(h_smem, h, interpret)
                else:
                    h_smem[...] = h
                if norm_ref is None:
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(h_smem, h_rows(h_ref, j))
                    return
                first = jnp.logical_and(vb == 0, wg == 0) if split else vb == 0

                @pl.when(first)
                def _():
                    for r, x in enumerate(qn_den):
                        norm_smem.at[r][...] = cast(x, row_layout)

                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(h_smem, h_rows(h_ref, j))
                pl.when(first)(lambda: plgpu.copy_smem_to_gmem(norm_smem, norm_ref.at[bh, pl.ds(j * 2, 2)]))

            def in_kernel_scores(c):
                # Four products in flight in order: q kᵀ and q C at once; P v and kᵀ (g ⊙ v) once P and g ⊙ v are
                # in shared memory, h computed while the state update's product runs.
                def first(acc_s, acc_inter):
                    plgpu.wgmma(acc_s, q_smem, k_t)
                    plgpu.wgmma(acc_inter, q_smem, c16_smem)
                    plgpu.wgmma_wait(1)  # q kᵀ done
                    p = scores_to_p(acc_s[...])
                    gated_values()
                    plgpu.commit_smem()

                    def second(acc_intra, acc_x):
                        plgpu.wgmma(acc_intra, p_smem, v_smem)
                        plgpu.wgmma(acc_x, k_t, gv_smem)
                        # All but the state update done: h is written while it runs.
                        write_h(*normalised(p, accumulated(acc_inter, 1), accumulated(acc_intra, 1)))
                        return acc_x[...]

                    return pl.run_scoped(second, plgpu.ACC((L, NV), f32), plgpu.ACC((DHQK, NV), f32))

                update = pl.run_scoped(first, plgpu.ACC((L, L), f32), plgpu.ACC((L, NV), f32))
                return cast(decay_ref[bh, j] * c + cast(update, tile), tile)

            def precomputed_scores(c):
                # Three products in flight in order: q C and (P / den) v at once, then the state update (its
                # accumulator starts at decay · C) once g ⊙ v is in shared memory; h = w ⊙ q C + (P / den) v is
                # written while the update runs.
                def products(accs):
                    acc_inter, acc_intra, acc_c = accs
                    plgpu.wgmma(acc_inter, q_smem, c16_smem)
                    plgpu.wgmma(acc_intra, p_smem.at[slot], v_smem)
                    gated_values()
                    plgpu.commit_smem()
                    plgpu.wgmma(acc_c, k_t, gv_smem)
                    inter, intra = accumulated(acc_inter, 1), accumulated(acc_intra, 1)
                    w = load(plan_smem.at[_W], row_layout)
                    write_h(cast(cast(lax.broadcast_in_dim(w, (L, NV), (0,)), tile) * inter + intra, tile))

                zeros = cast(jnp.zeros((L, NV), f32), tile)
                _, _, c = _accumulate(products, (zeros, zeros, cast(decay_ref[bh, j] * c, tile)), interpret)
                return cast(c, tile)

            def registers_state(c):
                # Cᵀ (NV, DHQK) in registers is q C's A operand: hᵀ = w ⊙ Cᵀ q̂ᵀ + vᵀ (P / den)ᵀ and
                # Cᵀ = decay · Cᵀ + (g ⊙ v)ᵀ k, no C tile written per chunk. q̂ C first, on its own: its bf16
                # operand (64 registers a thread) is free before the update's accumulator, which starts at
                # decay · Cᵀ, and vᵀ (P / den)ᵀ's take the registers.
                gated_values()
                plgpu.commit_smem()
                a = _register_operand(cast(c.astype(dtype), tile), scratch[0] if interpret else None, interpret)
                q_t = _transposed(q_smem, scratch[1] if interpret else None, interpret)  # (DHQK, L)
                inter = _product(a, q_t, (NV, L))
                w = load(plan_smem.at[_W], col_layout)
                x = cast(regs.columns(w) * cast(inter, tile), tile)
                v_t = _transposed(v_smem, scratch[2] if interpret else None, interpret)  # (NV, L)
                p_t = _transposed(p_smem.at[slot], scratch[3] if interpret else None, interpret)  # (L, L)
                gv_t = _transposed(gv_smem, scratch[4] if interpret else None, interpret)  # (NV, L)

                def products(accs):
                    acc_h, acc_c = accs
                    plgpu.wgmma(acc_h, v_t, p_t)
                    plgpu.wgmma(acc_c, gv_t, k_smem)
                    write_h(cast(x + accumulated(acc_h, 1), tile), transposed=True)  # while the update runs

                zeros = cast(jnp.zeros((NV, L), f32), tile)
                _, c = _accumulate(products, (zeros, cast(decay_ref[bh, j] * c, tile)), interpret)
                return cast(c, tile)

            if not shared_c:
                c = registers_state(c)
            else:
                c = precomputed_scores(c) if precomputed else in_kernel_scores(c)
                if borders_ref is not None:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # r(C_j) has left c16_smem
                c16_smem[...] = cast(c.astype(dtype), tile)
                plgpu.commit_smem()

            @pl.when(j + depth < NC)
            def _():
                if shared_slots:  # every product of this warpgroup reading this slot has completed
                    plgpu.barrier_arrive(consumed.at[slot])
                issue(j + depth, slot, refill=True)

            return c

        c_last = lax.fori_loop(0, NC, chunk, c_init)
        plgpu.wait_smem_to_gmem(0)
        if clustered:  # no program leaves while another may still signal its barriers
            plgpu.barrier_arrive(done)
            plgpu.barrier_wait(done)
        return c_last

    if zero_state:
        c_init = cast(jnp.zeros((DHQK, NV) if shared_c else (NV, DHQK), f32), tile)
    else:
        c_init = group.state_in(c0_ref, bh, load_c)
    if not interpret:
        scratch = []
    elif shared_c:
        scratch = [per_warpgroup((DHQK, L), dtype)]  # kᵀ
    else:  # Cᵀ as the A operand; q̂ᵀ, vᵀ, (P / den)ᵀ and (g ⊙ v)ᵀ
        scratch = [per_warpgroup(shape, dtype) for shape in ((NV, DHQK), (DHQK, L), (NV, L), (L, L), (NV, L))]
    c_last = pl.run_scoped(
        body,
        plgpu.SMEM((depth, L, DHQK), dtype, transforms=operand),
        plgpu.SMEM((depth, L, DHQK), dtype, transforms=operand),
        per_warpgroup((depth, L, NV), dtype, transforms=operand),
        plgpu.SMEM((depth, rows, L), f32),
        per_warpgroup((L, NV), dtype, transforms=operand),
        plgpu.SMEM((depth, L, L), dtype, transforms=operand)
        if precomputed
        else per_warpgroup((L, L), dtype, transforms=operand),
        per_warpgroup((L, NV), dtype, transforms=operand),
        plgpu.Barrier(num_arrivals=1, num_barriers=(p_barrier + precomputed) * depth),  # q, k, each v, plan[, P]
        *([per_warpgroup((DHQK, NV), dtype, transforms=operand)] if shared_c else []),  # C rounded, q C's B operand
        *([plgpu.SMEM((2, L), f32)] if normaliser else []),  # (qn, den) on their way out
        *([consumed_barrier(num_arrivals=consumers, num_barriers=depth)] if shared_slots else []),
        *([plgpu.ClusterBarrier(collective_axes=(_CLUSTER,), num_arrivals=consumers)] if clustered else []),
        *scratch,
        collective_axes="wg",
    )
    group.state_out(c_last, c_ref, bh, None if shared_c else lambda ref, x: _store_transposed(ref, x, interpret))


def _dot(spec: str, a: jax.Array, b: jax.Array, acc: Any) -> jax.Array:
    """A product of two tiles with ``acc`` accumulation (float32 or float64), at full precision."""
    return jnp.einsum(spec, a, b, preferred_element_type=acc, precision=lax.Precision.HIGHEST)


def _scores(q, k, plan, acc):
    """One chunk's scores from its (L, DHQK) q and k tiles and (8, L) plan rows: ``(S, D, P)``, each (L, L) in ``acc``
    (``S = q kᵀ``, ``D`` the masked gate matrix, ``P = S ⊙ D · DHQK^-1/2``)."""
    L, DHQK = q.shape
    s = _dot("td,sd->ts", q, k, acc)
    t_ids, s_ids = lax.broadcasted_iota(jnp.int32, (L, L), 0), lax.broadcasted_iota(jnp.int32, (L, L), 1)
    mask = (s_ids <= t_ids) & (plan[_BREAKS][:, None] == plan[_BREAKS_COL][None, :])
    # The log masked before exp (not the exp after): the same D, and no 0 · inf in autodiff of the masked entries.
    d = jnp.exp(jnp.where(mask, plan[_ROW][:, None] + plan[_COL][None, :], -jnp.inf))
    return s, d, s * d * (1.0 / math.sqrt(DHQK))


def _normaliser(p, plan, eps):
    """``(qn, den)`` of one chunk, (L,) each, from its gated scores P."""
    qn = jnp.sum(p, axis=1) + plan[_QN]
    return qn, jnp.maximum(jnp.abs(qn), plan[_LOWER]) + eps


def normalised_scores(
    q: jax.Array, k: jax.Array, plan: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
    """Every chunk's gated scores over its steps' denominators, and the readout the kernel needs with them (XLA).

    What the kernel computes per chunk with ``scores="in_kernel"`` (module docstring), once per head instead of
    once per warpgroup: ``P = (q kᵀ) ⊙ D · DHQK^-1/2`` (float32 products of the inputs), each step's denominator
    ``den = max(|rowsum P + q̂·n_border|, exp(-m)) + eps``, and ``h = w' ⊙ q C + (P / den) v`` with
    ``w' = w / den``.

    Args:
        q, k: (BH, S, DHQK), S a multiple of :data:`CHUNK`.
        plan: (BH, NC * 8, L) float32, :func:`chunk_plan`'s rows.

    Returns:
        ``(P / den (BH, S, L) in q's dtype (chunk j's (L, L) block in rows j·L...), readout (BH, NC * 2, L)
        float32, (qn, den))``: the readout's rows per chunk ``w / den`` and the steps' gains; ``qn = rowsum P +
        q̂·n_border`` and den per step, (BH, NC, L) float32 each (what the backward's normaliser gradient reads).
    """
    BH, S, DHQK = q.shape
    L, NC = CHUNK, S // CHUNK

    def one(q, k, plan):  # one chunk: (L, DHQK) tiles and (8, L) rows
        _, _, p = _scores(q, k, plan, jnp.float32)
        qn, den = _normaliser(p, plan, eps)
        return (p / den[:, None]).astype(q.dtype), jnp.stack([plan[_INTER] / den, plan[_GAIN]]), (qn, den)

    chunks = (q.reshape(BH, NC, L, DHQK), k.reshape(BH, NC, L, DHQK), plan.reshape(BH, NC, _PLAN_ROWS, L))
    p, readout, normaliser = jax.vmap(jax.vmap(one))(*chunks)
    return p.reshape(BH, S, L), readout.reshape(BH, NC * _READOUT_ROWS, L), normaliser


@finished_when_interpreted
@functools.partial(
    jax.jit,
    static_argnames=(
        "eps",
        "block_dhv",
        "depth",
        "consumers",
        "interpret",
        "borders",
        "scores",
        "normaliser",
        "cluster",
        "split",
        "c_operand",
        "sequences",
    ),
)
def mosaic_chunkwise(
    q: jax.Array,  # (BH, S, DHQK), S a multiple of CHUNK
    k: jax.Array,  # (BH, S, DHQK)
    v: jax.Array,  # (BH, S, DHV)
    plan: jax.Array,  # (BH, NC * 8, CHUNK) float32
    decay: jax.Array,  # (BH, NC) float32
    c0: jax.Array | None,  # (BH, DHQK, DHV) float32, or None for zeros
    *,
    eps: float,
    block_dhv: int = 32,
    depth: int = 2,
    consumers: int = 1,
    interpret: bool = False,
    borders: bool = False,
    scores: str = "in_kernel",
    normaliser: bool = False,
    n_border: jax.Array | None = None,
    cluster: int = 1,
    split: int = 1,
    c_operand: str = "shared",
    sequences: tuple[Rows, Rows, Rows] | None = None,
) -> tuple[jax.Array, ...]:
    """The kernel on ``BH`` flattened heads, from :func:`chunk_plan`'s plan; the caller checks shapes.

    ``sequences``: None, q, k and v are (BH, S, D); or where their rows lie in heads-minor (B, S, W) arrays
    (:class:`~xlstm_jax.kernels.mosaic.Rows` each, NH windows of D columns, BH = B · NH; q, k and v may be one array,
    a fused projection's output), read in place by every kernel, and h comes back (B, S, NH · DHV). The plan, decay,
    c0 and the other results are per flattened head (b, h) in either layout.

    ``consumers`` warpgroups per program (1 or 2), each with ``block_dhv`` columns of c (module docstring).
    ``borders``: also write the state before every chunk, rounded to q's dtype as it enters ``q C`` (the
    backward's border states; a TMA store of the tile the kernel already holds, per chunk).
    ``scores``: ``"in_kernel"``, every warpgroup computes its chunk's gated scores and denominators;
    ``"precomputed"``, XLA computes them once per head before the kernel (:func:`normalised_scores`), which reads
    ``P / den`` as a tile per chunk; ``"kernel"``, the same from a Mosaic GPU kernel of their own
    (:func:`~xlstm_jax.kernels.chunkwise_mosaic_scores.mosaic_normalised_scores`), which computes each step's
    ``q̂·n_border`` from ``n_border`` (BH, NC, DHQK) float32 where given, in place of the plan's row.
    ``normaliser``: also return the steps' ``(qn, den)`` for the backward, as the scores' pass computed them, or
    with in-kernel scores as the kernel did (the head's first column block writes them).
    ``cluster``: programs per cluster (:data:`CLUSTERS`), consecutive column blocks of one head that share each
    chunk's q, k, plan and P tiles by TMA multicast (module docstring); it must divide the head's column blocks.
    ``split``: segments per head that the kernel runs as sequences of their own, ``split`` times the programs for
    ``1 / split`` of the chunks each, from the states before them
    (:func:`~xlstm_jax.kernels.chunkwise_mosaic_scan.segment_starts`); it must divide the NC chunks. The same
    function: the scores, the plan and every output are per chunk.
    ``c_operand``: where q C's state operand comes from (:data:`C_OPERANDS`, module docstring); ``"registers"``
    writes no borders.

    Returns:
        ``(h (BH, S, DHV) (heads-minor: (B, S, NH · DHV)) in q's dtype, c after the last chunk (BH, DHQK, DHV)
        float32)``, and with ``borders``
        ``r(C_j)`` before every chunk j, (BH, NC * DHQK, DHV) in q's dtype, third; with ``normaliser``,
        ``(qn, den)`` (BH, NC, L) float32 each, last.
    """
    heads_minor = sequences is not None
    q_rows, k_rows, v_rows = sequences if heads_minor else (HEADS_MAJOR,) * 3
    B, S = q.shape[:2]
    BH, DHQK, DHV = q_rows.count(q), q_rows.width(q), v_rows.width(v)
    reason = chunkwise_mosaic_unsupported(
        DHQK, DHV, q.dtype, block_dhv, depth=depth, consumers=consumers, scores=scores,
        normaliser=normaliser, cluster=cluster, c_operand=c_operand,
    )  # fmt: skip
    if reason is not None:
        raise ValueError(f"the Mosaic GPU chunkwise kernel cannot run this shape: {reason}")
    if borders and c_operand != "shared":
        raise ValueError(f'borders=True takes c_operand="shared" (the borders are its C tiles), got {c_operand!r}')
    if interpret and cluster > 1:
        raise ValueError(f"cluster={cluster} cannot run in Mosaic GPU's interpreter (it has no cluster barriers)")
    NC = S // CHUNK
    check_split(split, NC, S)
    precomputed = scores != "in_kernel"
    in_kernel_normaliser = normaliser and not precomputed
    params = require_mosaic_interpreter(consumers) if interpret else None
    body = functools.partial(
        _chunk_body, eps=eps, block_dhv=block_dhv, depth=depth, consumers=consumers, interpret=interpret,
        precomputed=precomputed, borders=borders, normaliser=in_kernel_normaliser, cluster=cluster,
        zero_state=c0 is None and split == 1, segments=split, c_operand=c_operand,
        sequences=(
            *((r._replace(parts=split) for r in (q_rows, k_rows, v_rows)) if heads_minor else (HEADS_MAJOR,) * 3),
            Rows(v_rows.heads, split),  # h: (BH, S, DHV) or (B, S, NH · DHV), each head's segments in order
        ),
    )  # fmt: skip
    if split > 1:
        # Imported here: the scan's module builds on this one's helpers.
        from xlstm_jax.kernels.chunkwise_mosaic_scan import segment_starts

        c0 = segment_starts(
            k, v, plan, decay, c0, split, reverse=False, interpret=interpret, sequences=(k_rows, v_rows),
            gain_rows=(_PLAN_ROWS, _GAIN),  # the plan's gains' row read in place
        )  # fmt: skip
    c0s = () if c0 is None else (c0,)  # without c0 the kernel starts from zeros: none written and read
    # The kernel's rows: the heads' segments, head-major. Every operand but c0 is per step or per chunk along its
    # second axis, chunk-major, so a segment is a reshape; so are the outputs but h, which the kernel writes in the
    # heads' rows: reshaped, its rows would stop XLA fusing the model's head norm into one kernel (benchmarks).
    seqs, seg_chunks = BH * split, NC // split

    def segments(x):
        return x.reshape(seqs, x.shape[1] // split, *x.shape[2:])

    def sequence_segments(x):  # q, k, v: heads-minor ones are read in place
        return x if heads_minor else segments(x)

    def per_head(x):  # the segments back into their heads
        return x.reshape(BH, x.shape[1] * split, *x.shape[2:])

    clusters = {"cluster": (cluster,), "cluster_names": (_CLUSTER,)} if cluster > 1 else {}
    kernel = pl.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((B, S, v_rows.heads * DHV) if heads_minor else v.shape, q.dtype),  # segments in place
            jax.ShapeDtypeStruct((seqs, DHQK, DHV), jnp.float32),
            *([jax.ShapeDtypeStruct((seqs, seg_chunks * DHQK, DHV), q.dtype)] if borders else []),
            *([jax.ShapeDtypeStruct((seqs, seg_chunks * 2, CHUNK), jnp.float32)] if in_kernel_normaliser else []),
        ),
        mesh=plgpu.Mesh(
            grid=(seqs, _column_programs(DHV, block_dhv, consumers) // cluster),
            grid_names=("bh", "vb"),
            num_threads=consumers,
            thread_name="wg",
            **clusters,
        ),
        name="mlstm_chunkwise_mosaic",
        **({"interpret": params} if interpret else {}),
    )

    def run(q, k, v, plan, decay, *p):
        h, c_last, *rest = kernel(
            *map(sequence_segments, (q, k, v)), *map(segments, (plan, decay)), *c0s, *map(segments, p)
        )
        return (h, c_last.reshape(BH, split, DHQK, DHV)[:, -1], *map(per_head, rest))

    if not precomputed:
        out = run(q, k, v, plan, decay)
        if not normaliser:
            return out
        rows = out[-1].reshape(BH, NC, 2, CHUNK)
        return (*out[:-1], (rows[:, :, 0], rows[:, :, 1]))
    if scores == "kernel":
        # Imported here: the scores kernel's module builds on this one's plan rows and helpers.
        from xlstm_jax.kernels.chunkwise_mosaic_scores import mosaic_normalised_scores

        p, readout, qn_den = mosaic_normalised_scores(
            q, k, plan, eps, n_border, sequences=(q_rows, k_rows), interpret=interpret
        )  # fmt: skip
    else:

        def heads_major(x, rows):  # (BH, S, DHQK) rows of a heads-minor window of columns
            return HeadColumns(x, rows.column, rows.heads, DHQK).value().swapaxes(1, 2).reshape(BH, S, DHQK)

        q_major, k_major = (heads_major(x, r) if heads_minor else x for x, r in ((q, q_rows), (k, k_rows)))
        p, readout, qn_den = normalised_scores(q_major, k_major, plan, eps)
    out = run(q, k, v, readout, decay, p)
    return (*out, qn_den) if normaliser else out


def _folds_border_qn(scores: str, DHQK: int) -> bool:
    """Whether the kernel's scores (:data:`SCORES`) take each step's ``q̂·n_border`` off the gate plan: the scores
    kernel does, from its q tiles, where they fit its registers (DHQK up to 256), so that the plan reads no q."""
    return scores == "kernel" and DHQK <= _FOLD_MAX_DHQK


def _key_sums(scores: str, DHQK: int, interpret: bool) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
    """The keys' sums of the gate plan where nothing differentiates it: the Mosaic GPU kernel where the scores kernel
    takes q̂·n off the plan (:func:`_folds_border_qn`: its k tile fits the registers likewise), else XLA's (None)."""
    if not _folds_border_qn(scores, DHQK):
        return None
    # Imported here: the scores kernel's module builds on this one's plan rows and helpers.
    from xlstm_jax.kernels.chunkwise_mosaic_scores import mosaic_key_sums

    return functools.partial(mosaic_key_sums, interpret=interpret)


def chunk_plan(
    x: ChunkedSequence,
    border_qn: bool = True,
    key_sums: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    blocked_borders: bool = False,
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array], jax.Array]:
    """The gate plan of a chunked sequence (module docstring): everything but the products with q, k and v.

    ``border_qn=False`` leaves the row of ``q̂_t·n_border`` 0 (the plan then reads no q), for the scores kernel,
    which computes it from the border normalisers returned fourth. ``key_sums``: None, XLA sums each chunk's
    weighted keys; or at B=1, where XLA's sum reads k at well under the copy rate (below), ``key_sums(k (NH, NC·L,
    DHQK), weights (NH, NC, L) float32) -> (NH, NC, DHQK)`` float32 does
    (:func:`~xlstm_jax.kernels.chunkwise_mosaic_scores.mosaic_key_sums`; not differentiated). ``blocked_borders``
    (where nothing differentiates the plan): from :data:`_BLOCKED_MIN_CHUNKS` chunks (up to
    :data:`_BLOCKED_MAX_CHUNKS`) the border normalisers come
    from :func:`~xlstm_jax.mlstm.chunkwise.border_normalisers_blocked` (compiled for an H200, the forward of 65,536
    steps at batch 1 launches 8 kernels fewer; on an H100 the forward is 1.1 to 1.4% faster at B=8,
    S=8192 and at batches of one and two of 65,536 steps, BENCHMARKS.md), else from the associative scan (fewer
    kernels below; the one autodiff takes).

    Returns:
        ``(plan (B, NH, NC, 8, L), decay (B, NH, NC), (n, m) after the last chunk, n before every chunk
        (B, NH, NC, DHQK))``, float32 (the accumulation dtype); the plan's rows are, per step t and chunk:
        ``F_t - m_t``, ``i_t - F_t`` (-inf at padding), the break count, ``DHQK^-1/2 exp(F_t + m_border - m_t)``
        (0 after a break), ``q̂_t·n_border`` times that, ``exp(-m_t)``, the step's weight in the state at the
        chunk's end, and the break count again.
    """
    F, R, i, valid = x.F, x.R, x.i, x.valid
    acc = F.dtype
    c0, n0, m0 = x.states
    F_L, R_L = F[..., -1], R[..., -1]
    # The chunks' k sums. At B=1 XLA writes k·w transposed in float32 over the (B, NH, NC) axes and sums it in a
    # second pass, which one flat axis of chunks avoids; at B > 1 the flat axis sums slower. On an H100 in one call:
    # at B=1, NH=8, S=65536 0.158 ms flat against 0.469 nested; at B=8, S=8192 0.157 flat against 0.101 nested.
    lead = F.shape[:-1]  # (B, NH, NC)
    if key_sums is not None and lead[0] == 1:
        weights, ml = block_weights(F, F_L, i, valid, R, R_L, x.log_start)
        B, NH, NC, L, DHQK = x.k.shape
        nbar = key_sums(x.k.reshape(B * NH, NC * L, DHQK), weights.reshape(B * NH, NC, L)).reshape(*lead, DHQK)
    else:
        summary = (x.k, F, F_L, i, valid, R, R_L, x.log_start)
        if lead[0] == 1:
            steps_valid = None if valid is None else jnp.broadcast_to(jnp.asarray(valid), F.shape)
            summary = tuple(
                None if a is None else a.reshape(-1, *a.shape[len(lead) :])
                for a in (x.k, F, F_L, i, steps_valid, R, R_L, x.log_start)
            )
        k, F_s, F_Ls, i_s, valid_s, R_s, R_Ls, start_s = summary
        _, nbar, ml = block_summary(k, None, F_s, F_Ls, i_s, x.operand_dtype, valid_s, R_s, R_Ls, start_s)
        nbar, ml = nbar.reshape(*lead, -1), ml.reshape(lead)
    log_decay = block_log_decay(F_L, R_L)
    blocked = blocked_borders and _BLOCKED_MIN_CHUNKS <= F.shape[-2] <= _BLOCKED_MAX_CHUNKS
    borders = border_normalisers_blocked if blocked else border_normalisers
    (n_last, m_last), (n_b, m_b) = borders(log_decay, nbar, ml, n0, m0)
    n_b, m_b = n_b.astype(acc), m_b.astype(acc)
    _, log_w, _ = block_log_weights(F, i, m_b, valid, R, x.log_start)  # (B, NH, NC, L); its (L, L) part unused
    m = block_running_max(F, i, log_w, valid, R, x.log_start)
    m_end = jnp.concatenate([m_b[..., 1:], m_last.astype(acc)[..., None]], axis=-1)  # (B, NH, NC)

    scale = 1.0 / math.sqrt(x.q.shape[-1])
    row = jnp.where(jnp.isfinite(m), F - m, -jnp.inf)
    col = i - F if valid is None else jnp.where(valid, i - F, -jnp.inf)
    inter = scale * normalised_weight(log_w, m)
    # q̂·n of the border normaliser as a product and a sum, which XLA fuses into one pass over the bf16 q (a float32
    # matrix-vector product may first write q in float32 for a library call, and its transpose dq too).
    qn_row = inter * jnp.sum(x.q.astype(acc) * n_b[..., None, :], axis=-1) if border_qn else jnp.zeros_like(inter)
    a = F_L[..., None] - F + i  # each step's log weight at its chunk's end
    a = jnp.where(R_L[..., None] == R, a, -jnp.inf)
    if valid is not None:
        a = jnp.where(valid, a, -jnp.inf)
    gain = normalised_weight(a, m_end[..., None])
    plan = jnp.stack([row, col, R, inter, qn_row, jnp.exp(-m), gain, R], axis=-2)
    decay = normalised_weight(log_decay + m_b, m_end)
    return plan, decay, (n_last, m_last), n_b


def _forward(
    x: ChunkedSequence,
    eps: float,
    block_dhv: int,
    depth: int,
    consumers: int,
    interpret: bool,
    scores: str,
    cluster: int,
    split: int,
    states_given: bool,
    c_operand: str = "shared",
    heads_minor: tuple[Any, Any, Any] | None = None,
):
    """h (B, NH, S, DHV) and the last states (c, n, m) in the accumulation dtype; without ``states_given`` the
    kernel starts from zeros (no zero state written and read).

    ``heads_minor``: the sequence's q, k and v as (B, S, NH, D) arrays or :class:`~xlstm_jax.kernels.mosaic.HeadColumns`
    blocks (``x`` holds heads-major views of them): the kernels read these in place and h comes back (B, S, NH, DHV);
    XLA computes of ``x.q`` and ``x.k`` only what the gate plan reads (nothing at B=1 with the scores kernel and DHQK
    up to 256: :func:`_folds_border_qn`)."""
    B, NH, S, DHQK, DHV = x.dims
    NC, L = x.NC, x.L
    fold = _folds_border_qn(scores, DHQK)
    key_sums = _key_sums(scores, DHQK, interpret)
    sequences = None
    if heads_minor is None:
        q, k, v = (t.reshape(B * NH, NC * L, t.shape[-1]) for t in (x.q, x.k, x.v))
    else:
        # (B, S, W) arrays, each head a window of columns (kernels.mosaic.Rows); padded to whole chunks, an array that
        # holds two of them (a fused projection's output) once
        (q, q_rows), (k, k_rows), (v, v_rows) = map(heads_minor_operand, heads_minor)
        if NC * L > S:
            padded = {id(t): jnp.pad(t, ((0, 0), (0, NC * L - S), (0, 0))) for t in (q, k, v)}
            q, k, v = (padded[id(t)] for t in (q, k, v))
        sequences = (q_rows, k_rows, v_rows)
        if key_sums is not None:
            sums_of = key_sums

            def key_sums(_, weights):  # k read in place, not the heads-major view that chunk_plan passes
                return sums_of(k, weights, sequences=k_rows)

    plan, decay, (n_last, m_last), n_border = chunk_plan(
        x, border_qn=not fold, key_sums=key_sums, blocked_borders=True
    )  # fmt: skip
    c0 = x.states[0].astype(jnp.float32).reshape(B * NH, DHQK, DHV) if states_given else None
    h, c_last = mosaic_chunkwise(
        q,
        k,
        v,
        plan.reshape(B * NH, NC * _PLAN_ROWS, L),
        decay.reshape(B * NH, NC),
        c0,
        eps=eps,
        block_dhv=block_dhv,
        depth=depth,
        consumers=consumers,
        interpret=interpret,
        scores=scores,
        n_border=n_border.reshape(B * NH, NC, DHQK) if fold else None,
        cluster=cluster,
        split=split,
        c_operand=c_operand,
        sequences=sequences,
    )
    h = h[:, :S].reshape(B, S, NH, DHV) if sequences else h.reshape(B, NH, NC * L, DHV)[:, :, :S]
    return h, (c_last.reshape(B, NH, DHQK, DHV), n_last, m_last)


def chunkwise_mosaic_fw(
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
    block_dhv: int | None = None,
    depth: int | None = None,
    consumers: int | None = None,
    interpret: bool = False,
    xla_chunk_size: int = 256,
    backward: str = "mosaic",
    backward_consumers: int = 2,
    scores: str | None = None,
    backward_scan_block_dhv: int | None = None,
    cluster: int | None = None,
    split: int | None = None,
    c_operand: str | None = None,
    layout: str = "BNSD",
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """The mLSTM on a whole sequence, chunkwise, with the products in a Mosaic GPU kernel (module docstring).

    Arguments, results and errors as :func:`xlstm_jax.mlstm.chunkwise.chunkwise_fw` (the kernel's chunk size is
    fixed at :data:`CHUNK`). Differentiable: ``backward`` picks the backward pass (module docstring).

    Args:
        block_dhv: Columns of c per warpgroup, 32 or 64: more columns make wider products (and, with the scores
            in the kernel, recompute them fewer times), fewer hold less of c in registers. None:
            :func:`auto_tiling` picks by the number of heads and ``scores`` (BENCHMARKS.md compares them).
        depth: Chunks in flight in the TMA pipeline. None: :func:`auto_depth`, two where the tiles fit, else one.
        consumers: Warpgroups per program, 1 or 2, each with its own ``block_dhv`` columns of c; two share the
            q and k tiles in shared memory and overlap each other's products (module docstring; BENCHMARKS.md).
            None: :func:`auto_tiling` picks by the number of heads.
        interpret: Run in Mosaic GPU's interpreter (any backend; slow).
        xla_chunk_size: The chunk size of the XLA form that runs under differentiation with ``backward="xla"``.
        backward: What runs under differentiation. ``"mosaic"``: this kernel forward, and the Mosaic GPU backward
            kernels (:func:`xlstm_jax.kernels.chunkwise_mosaic_bw.mosaic_products_vjp`) composed with autodiff of
            the gate plan, where they cover the shape
            (:func:`~xlstm_jax.kernels.chunkwise_mosaic_bw.mosaic_backward_unsupported`: DHQK at most 256), else
            as ``"xla"``. ``"xla"``: the XLA chunkwise form, forward and backward.
        backward_consumers: Warpgroups per program of the backward kernels with ``backward="mosaic"``, 1 or 2
            (each kernel runs one where two do not fit: ``mosaic_products_vjp``). 2, the faster on an H200
            (BENCHMARKS.md).
        scores: Where each chunk's gated scores and denominators are computed (:data:`SCORES`): ``"in_kernel"``, by
            every warpgroup for its columns; ``"precomputed"``, once per head in XLA before the kernel
            (:func:`normalised_scores`), which then reads them; ``"kernel"`` (the faster forward at long S:
            BENCHMARKS.md), the same from a Mosaic GPU kernel of their own that reads q and k once
            (:mod:`xlstm_jax.kernels.chunkwise_mosaic_scores`; the gate plan then reads no q at DHQK up to 256). None
            (the default): :func:`auto_scores` picks by S, in the kernel for at most 4 chunks (256 steps), ``"kernel"``
            beyond.
        cluster: Programs per cluster of the forward kernel, 1, 2 or 4 (:data:`CLUSTERS`): consecutive column
            blocks of a head that share each chunk's q, k and score tiles by TMA multicast, each loading its share,
            so that a head's tiles are read from L2 once per cluster rather than once per program. None:
            :func:`auto_cluster`.
        split: Segments of each head's chunks that the forward kernel runs side by side, each from the state before
            it (:func:`~xlstm_jax.kernels.chunkwise_mosaic_scan.segment_starts`): more programs for a few heads; with
            ``backward="mosaic"`` the backward's reverse state scan too. It must divide the ``ceil(S / 64)``
            chunks. None: :func:`auto_split`, for the tiling's programs (at B·NH=8, DHV=512: 2 from 8192 steps), 1
            with the scores in the kernel.
        backward_scan_block_dhv: With ``backward="mosaic"``, the columns per warpgroup of the backward's reverse
            state scan, 32 or 64 (None: the backward kernels' block,
            :func:`~xlstm_jax.kernels.chunkwise_mosaic_bw.backward_block_dhv`: ``block_dhv`` where their tiles fit,
            else 32); the gradient kernel runs that block.
        layout: Of q, k, v and h (:data:`~xlstm_jax.kernels.mosaic.LAYOUTS`): ``"BNSD"``, (B, NH, S, D) as above;
            ``"BSND"``, heads-minor (B, S, NH, D), as a layer's projections write them: the kernels read and write
            them in place, where heads-major operands cost the caller a transpose of each (the gates, states and
            ``segment_ids`` keep their shapes). Under differentiation the heads-major form runs on transposed views.

    Raises:
        ValueError: as chunkwise_fw, and where the kernel cannot run (:func:`chunkwise_mosaic_unsupported`).
    """
    if backward not in BACKWARDS:
        raise ValueError(f"backward={backward!r} must be one of {BACKWARDS}")
    if scores is not None and scores not in SCORES:
        raise ValueError(f"scores={scores!r} must be one of {SCORES} or None")
    if backward_scan_block_dhv not in (None, 32, 64):
        raise ValueError(f"backward_scan_block_dhv={backward_scan_block_dhv!r} must be None, 32 or 64")
    if backward_consumers not in (1, 2) or isinstance(backward_consumers, bool):
        raise ValueError(f"backward_consumers={backward_consumers!r} must be 1 or 2 (warpgroups per program)")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    if layout == "BSND":
        options = {
            "block_dhv": block_dhv, "depth": depth, "consumers": consumers, "interpret": interpret,
            "xla_chunk_size": xla_chunk_size, "backward": backward, "backward_consumers": backward_consumers,
            "scores": scores, "backward_scan_block_dhv": backward_scan_block_dhv, "cluster": cluster, "split": split,
            "c_operand": c_operand,
        }  # fmt: skip
        states = (c_initial, n_initial, m_initial) if c_initial is not None else None
        h, last = _heads_minor(q, k, v, i, f, states, segment_ids, eps, state_dtype, options)
        return (h, last) if return_last_states else h
    x = chunk_sequence(q, k, v, i, f, c_initial, n_initial, m_initial, eps, state_dtype, CHUNK, segment_ids, True)
    _, _, S, DHQK, DHV = x.dims
    dtype = jnp.result_type(q, k, v)
    given = {"block_dhv": block_dhv, "consumers": consumers, "depth": depth, "cluster": cluster, "split": split}
    BH = x.dims[0] * x.dims[1]
    scores, (block_dhv, consumers, depth, cluster, split, c_operand) = _call_tiling(
        x.dims, dtype, scores, given, interpret, c_operand
    )  # fmt: skip
    # Imported here: the backward module builds on this one's plan and kernel.
    from xlstm_jax.kernels.chunkwise_mosaic_bw import (
        backward_block_dhv,
        mosaic_backward_unsupported,
        mosaic_products_vjp,
        split_cell,
    )

    # Under differentiation the forward writes the border states, C tiles (c_operand="shared"), in the tiling
    # picked for that from the same arguments; the backward's reverse scan runs in its segments.
    grad = forward_tiling(BH, S, DHQK, DHV, dtype, scores, **given, interpret=interpret, c_operand="shared")
    if (
        backward == "mosaic"
        and mosaic_backward_unsupported(DHQK, DHV, dtype, grad.block_dhv, grad.depth, scores) is None
    ):
        forward_tiles = {
            "block_dhv": grad.block_dhv, "depth": grad.depth, "interpret": interpret, "scores": scores,
            "cluster": grad.cluster, "split": grad.split,
        }  # fmt: skip
        backward_block = backward_block_dhv(DHQK, DHV, dtype, grad.block_dhv, grad.depth)
        # the backward kernels' (their reverse scan in the forward's segments)
        tiling = {"block_dhv": backward_block, "depth": grad.depth, "interpret": interpret, "split": grad.split}

        def products(q, k, v, plan, decay, c0, n_border=None):
            return mosaic_chunkwise(
                q, k, v, plan, decay, c0, eps=eps, block_dhv=block_dhv, depth=depth, consumers=consumers,
                interpret=interpret, scores=scores, n_border=n_border, cluster=cluster, split=split,
                c_operand=c_operand,
            )  # fmt: skip

        grad_consumers = grad.consumers
        if chunkwise_mosaic_unsupported(
            DHQK, DHV, dtype, grad.block_dhv, depth=grad.depth, consumers=grad.consumers, scores=scores,
            normaliser=True, cluster=grad.cluster,
        ):  # fmt: skip
            grad_consumers = 1  # the (qn, den) tile may not fit beside two warpgroups' tiles

        def products_for_grad(q, k, v, plan, decay, c0):
            """The residual: the border states and each step's (qn, den) (the backward reads no h: the gradient
            kernel has the normaliser's gradient from its own products)."""
            h, c_last, borders, normaliser = mosaic_chunkwise(
                q, k, v, plan, decay, c0, eps=eps, consumers=grad_consumers, borders=True, normaliser=True,
                **forward_tiles,
            )  # fmt: skip
            return h, c_last, (borders, normaliser)

        def products_vjp(q, k, v, plan, decay, c0, residual, dh, dc_last):
            borders, normaliser = residual
            return mosaic_products_vjp(
                q, k, v, plan, decay, c0, eps, dh, dc_last, borders=borders, normaliser=normaliser,
                consumers=backward_consumers, scan_block_dhv=backward_scan_block_dhv, **tiling,
            )  # fmt: skip

        return split_cell(
            products, products_vjp, q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states, eps,
            state_dtype, segment_ids, products_for_grad, products if _folds_border_qn(scores, DHQK) else None,
            _key_sums(scores, DHQK, interpret),
        )  # fmt: skip
    states_given = c_initial is not None

    # segment_ids is an argument of the custom_vjp, not a closure (a closed-over tracer escapes under jax.checkpoint).
    @jax.custom_vjp
    def run(q, k, v, i, f, states, segment_ids):
        c0, n0, m0 = states if states_given else (None, None, None)
        x = chunk_sequence(q, k, v, i, f, c0, n0, m0, eps, state_dtype, CHUNK, segment_ids, True)
        h, last = _forward(
            x, eps, block_dhv, depth, consumers, interpret, scores, cluster, split, states_given, c_operand
        )  # fmt: skip
        return h.astype(q.dtype), cast_states(last, x.out_dtypes)

    def xla(q, k, v, i, f, states, segment_ids):
        c0, n0, m0 = states if states_given else (None, None, None)
        return chunkwise_fw(
            q, k, v, i, f, c0, n0, m0, True, eps, state_dtype, xla_chunk_size, segment_ids=segment_ids
        )  # fmt: skip

    def run_fwd(q, k, v, i, f, states, segment_ids):
        # The outputs, and the XLA form's pullback as the residual.
        return jax.vjp(lambda *a: xla(*a, segment_ids), q, k, v, i, f, states)

    def run_bwd(pullback, cotangents):
        return (*pullback(cotangents), None)  # document ids are not differentiable

    run.defvjp(run_fwd, run_bwd)
    states = (c_initial, n_initial, m_initial) if states_given else None
    h, last = run(q, k, v, i, f, states, segment_ids)
    return (h, last) if return_last_states else h


def _call_tiling(
    dims: Any, dtype: Any, scores: str | None, given: dict[str, Any], interpret: bool, c_operand: str | None
) -> tuple[str, ForwardTiling]:
    """The scores (:func:`auto_scores` where None) and forward tiling (:func:`forward_tiling`, ``given`` its fields
    that are set) of a :func:`chunkwise_mosaic_fw` call of ``dims`` (B, NH, S, DHQK, DHV).

    Raises:
        ValueError: the kernel cannot run that tiling (:func:`chunkwise_mosaic_unsupported`).
    """
    B, NH, S, DHQK, DHV = dims
    scores = auto_scores(S) if scores is None else scores
    tiling = forward_tiling(B * NH, S, DHQK, DHV, dtype, scores, **given, interpret=interpret, c_operand=c_operand)
    reason = chunkwise_mosaic_unsupported(
        DHQK, DHV, dtype, tiling.block_dhv, depth=tiling.depth, consumers=tiling.consumers, scores=scores,
        cluster=tiling.cluster, c_operand=tiling.c_operand,
    )  # fmt: skip
    if reason is not None:
        raise ValueError(f"chunkwise_mosaic_fw cannot run this call: {reason}")
    return scores, tiling


def _heads_minor(
    q: jax.Array | HeadColumns,  # (B, S, NH, DHQK)
    k: jax.Array | HeadColumns,  # (B, S, NH, DHQK)
    v: jax.Array | HeadColumns,  # (B, S, NH, DHV)
    i: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    f: jax.Array,
    states: tuple[jax.Array, jax.Array, jax.Array] | None,
    segment_ids: jax.Array | None,
    eps: float,
    state_dtype: Any,
    options: dict[str, Any],
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """:func:`chunkwise_mosaic_fw` with ``layout="BSND"``: h (B, S, NH, DHV) and the last states.

    Evaluated, the kernels read q, k and v and write h in place (:func:`_forward`), each an array or a block of
    columns of a wider one (:class:`~xlstm_jax.kernels.mosaic.HeadColumns`); under differentiation the heads-major
    form (its backward kernels) runs on transposed views, whose cotangents come back heads-minor.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4 or t.shape[:3] != q.shape[:3]:
            raise ValueError(
                f'layout="BSND" takes q, k and v as (B, S, NH, D) with one (B, S, NH): got q.shape={q.shape}, '
                f"k.shape={k.shape}, v.shape={v.shape} ({name})"
            )

    def heads_major(t: Any) -> jax.Array:  # (B, S, NH, D) <-> (B, NH, S, D)
        return jnp.swapaxes(as_array(t), 1, 2)

    def heads_major_form(q, k, v, i, f, states, segment_ids):  # the same function, differentiable
        c0, n0, m0 = states if states is not None else (None, None, None)
        h, last = chunkwise_mosaic_fw(
            *map(heads_major, (q, k, v)), i, f, c0, n0, m0, True, eps, state_dtype, segment_ids=segment_ids,
            **options,
        )  # fmt: skip
        return heads_major(h), last

    # segment_ids is an argument of the custom_vjp, not a closure (a closed-over tracer escapes under jax.checkpoint).
    @jax.custom_vjp
    def run(q, k, v, i, f, states, segment_ids):
        c0, n0, m0 = states if states is not None else (None, None, None)
        x = chunk_sequence(
            *map(heads_major, (q, k, v)), i, f, c0, n0, m0, eps, state_dtype, CHUNK, segment_ids, True
        )  # fmt: skip
        dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
        given = {name: options[name] for name in ("block_dhv", "consumers", "depth", "cluster", "split")}
        interpret = options["interpret"]
        scores, (block_dhv, consumers, depth, cluster, split, c_operand) = _call_tiling(
            x.dims, dtype, options["scores"], given, interpret, options["c_operand"]
        )  # fmt: skip
        h, last = _forward(
            x, eps, block_dhv, depth, consumers, interpret, scores, cluster, split, states is not None, c_operand,
            heads_minor=(q, k, v),
        )  # fmt: skip
        return h.astype(q.dtype), cast_states(last, x.out_dtypes)

    def run_fwd(q, k, v, i, f, states, segment_ids):
        return jax.vjp(lambda *a: heads_major_form(*a, segment_ids), q, k, v, i, f, states)

    def run_bwd(pullback, cotangents):
        return (*pullback(cotangents), None)  # document ids are not differentiable

    run.defvjp(run_fwd, run_bwd)
    return run(q, k, v, i, f, states, segment_ids)
