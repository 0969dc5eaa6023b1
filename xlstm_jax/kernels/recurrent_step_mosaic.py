"""The mLSTM decode step as a Mosaic GPU kernel: c streamed through shared memory by the TMA engine (Hopper).

The same function as the Triton kernel of :mod:`xlstm_jax.kernels.recurrent_step` (``recurrent_step_pallas``
picks between them: ``StepKernelConfig.backend``). It exists because on an H200 it moves the state faster
from B=32 on (NH=8, DHQK=256, DHV=512; BENCHMARKS.md, the decode step): a Triton kernel that only copies the
state in the step's 64x64 tiles already stays above the copy floor, and the TMA engine's bulk copies, two row
blocks in flight per program, get closer.

Layout. One program (a CUDA block of one warpgroup, 128 threads) owns one head and one block of
``block_dhv`` columns of c. It walks the head's DHQK rows ``block_dhqk`` at a time in a pipeline
(``plgpu.emit_pipeline``): the TMA engine copies the next row blocks of c, q, k, n into shared memory
(``depth`` blocks in flight) while the warpgroup updates the current one in registers and the TMA engine
writes the updated block back into c, in place. The c tile lives in registers in the WGMMA layout, so that
row vectors (k, q, n) and column vectors (v) broadcast onto it without shuffles, and the partial sums
``Σ_rows q̂ ⊙ c'`` and ``Σ q̂ ⊙ n'`` are kept elementwise and reduced once after the pipeline.

Stacked states. The kernel steps one layer of states stacked over a model's layers (the layer index is an
operand, so all layers share one kernel), and reads q, k, v and the gates where they lie, such as a model's
fused projection (:func:`mosaic_step`'s ``qkv_heads``, ``gate_heads`` and offsets): a model's decode step
needs no slicing copies around it.

In place. c is passed as a GMEM reference (``jax.new_ref``) and written through it, which ``pl.kernel``
turns into an input-output alias: under ``jax.jit`` with c donated, no copy of c is made. n' and m' go to
fresh buffers, written by the head's first column block only: every program of a head reads n and m, so
writing them in place would race with the head's other programs (as in the Triton kernel).

Limits. Needs a Hopper GPU (TMA, compute capability 9.0) and a JAX with ``pl.kernel`` and
``plgpu.Mesh`` (0.10 or newer). Its ``emit_pipeline`` does not run in JAX's Mosaic GPU interpreter, so CI
checks that the kernel lowers (for CUDA, on the CPU); its numbers are checked compiled on an H200 by the same
tests as the Triton kernel. ``block_dhqk`` must be a multiple of 64 (the WGMMA layout's
rows) and ``block_dhv`` a multiple of 32 (128-byte swizzled float32 rows).
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from xlstm_jax.mlstm.stabilizer import log_forget_gate_no_log1p, normalizer, step_gates

__all__ = ["MOSAIC_MIN_COMPUTE_CAPABILITY", "device_supports_mosaic", "mosaic_step", "mosaic_step_unsupported"]

MOSAIC_MIN_COMPUTE_CAPABILITY = (9, 0)  # TMA bulk tensor copies and the WGMMA register layout
_ROWS = 64  # the WGMMA layout tiles rows in groups of 64
_SWIZZLE_COLUMNS = 32  # 128-byte swizzle of float32 rows: conflict-free shared-memory loads and stores

# ``plgpu.load`` takes the index positionally in JAX 0.10 and deprecates it in 0.11 (index the ref instead).
_LOAD_INDEX = inspect.signature(plgpu.load).parameters.get("idx")
_LOAD_TAKES_INDEX = _LOAD_INDEX is not None and _LOAD_INDEX.default is inspect.Parameter.empty


def load_ref(ref, layout, *, optimized: bool = True) -> jax.Array:
    """The whole of ``ref`` loaded into registers in ``layout``."""
    if _LOAD_TAKES_INDEX:
        return plgpu.load(ref, (), layout=layout, optimized=optimized)
    return plgpu.load(ref, layout=layout, optimized=optimized)


def mosaic_step_unsupported(DHQK: int, DHV: int, block_dhqk: int, block_dhv: int) -> str | None:
    """Why the Mosaic kernel cannot run this head shape and tiling, or None if it can (no device check)."""
    if block_dhqk % _ROWS or DHQK % block_dhqk:
        return f"block_dhqk={block_dhqk} must be a multiple of {_ROWS} that divides DHQK={DHQK}"
    if block_dhv % _SWIZZLE_COLUMNS or DHV % block_dhv:
        return f"block_dhv={block_dhv} must be a multiple of {_SWIZZLE_COLUMNS} that divides DHV={DHV}"
    return None


def device_supports_mosaic() -> bool:
    """Whether JAX's first device is a GPU of compute capability 9.0 or newer."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or not capability:
        return False
    return tuple(int(x) for x in str(capability).split(".")[:2]) >= MOSAIC_MIN_COMPUTE_CAPABILITY


def _step_body(
    layer_ref,  # (1,) int32: which layer to step
    c_ref,  # (L, BH, DHQK, DHV) float32 in GMEM: that layer is read and written in place
    n_ref,  # (L, BH, DHQK) float32
    m_ref,  # (L, BH) float32
    q_ref,  # (R, W): head bh's q at row bh // qkv_heads, columns q_offset + (bh % qkv_heads)·DHQK onwards
    k_ref,  # (R, W): likewise at k_offset
    v_ref,  # (R, W): likewise at v_offset, DHV columns
    i_ref,  # (R, W): head bh's i at row bh // gate_heads, column i_offset + bh % gate_heads
    f_ref,  # (R, W): likewise at f_offset
    h_ref,  # (BH, DHV) in q's dtype
    n_out_ref,  # (BH, DHQK) float32, a fresh buffer
    m_out_ref,  # (BH,) float32, a fresh buffer
    *,
    eps: float,
    qkv_heads: int,
    qkv_offsets: tuple[int, int, int],
    gate_heads: int,
    gate_offsets: tuple[int, int],
    block_dhqk: int,
    block_dhv: int,
    depth: int,
):
    f32 = jnp.float32
    DHQK = c_ref.shape[2]
    rows, cols = block_dhqk, block_dhv
    scale = 1.0 / math.sqrt(DHQK)
    tile_layout = plgpu.Layout.WGMMA
    row_layout, col_layout = tile_layout.reduce(1), tile_layout.reduce(0)  # (rows,) and (cols,) vectors
    bh, vb = lax.axis_index("bh"), lax.axis_index("vb")
    layer = layer_ref[0]

    def head_columns(ref, offset, size):
        """This head's ``size`` columns of a q, k or v source."""
        return ref.at[bh // qkv_heads, pl.ds(offset + (bh % qkv_heads) * size, size)]

    def gate(ref, offset):
        return ref[bh // gate_heads, offset + bh % gate_heads].astype(f32)

    q_offset, k_offset, v_offset = qkv_offsets
    i, f = gate(i_ref, gate_offsets[0]), gate(f_ref, gate_offsets[1])
    m_new, f_act, i_act = step_gates(m_ref[layer, bh], i, f, log_forget=log_forget_gate_no_log1p)
    v_head = head_columns(v_ref, v_offset, c_ref.shape[3])
    v = load_ref(v_head.at[pl.ds(vb * cols, cols)], col_layout, optimized=False).astype(f32)
    v_tile = lax.broadcast_in_dim(v, (rows, cols), (1,))

    def update(index, c_smem, q_smem, k_smem, n_smem, c_out_smem, partial_sums):
        """Row block ``index``: c' into shared memory (the pipeline writes it to c), n' (first column block)."""
        acc, acc_n = partial_sums
        (j,) = index
        k = load_ref(k_smem, row_layout, optimized=False).astype(f32)
        q_hat = load_ref(q_smem, row_layout, optimized=False).astype(f32) * scale
        ik = i_act * k
        c_new = f_act * load_ref(c_smem, tile_layout) + lax.broadcast_in_dim(ik, (rows, cols), (0,)) * v_tile
        c_out_smem[...] = c_new
        n_new = f_act * load_ref(n_smem, row_layout, optimized=False) + ik

        @pl.when(vb == 0)
        def _():
            n_out_ref[bh, pl.ds(j * rows, rows)] = n_new

        return acc + lax.broadcast_in_dim(q_hat, (rows, cols), (0,)) * c_new, acc_n + q_hat * n_new

    swizzled = (plgpu.TilingTransform((8, _SWIZZLE_COLUMNS)), plgpu.SwizzleTransform(4 * _SWIZZLE_COLUMNS))
    tile = plgpu.BlockSpec((rows, cols), lambda j: (j, vb), transforms=swizzled)
    row_block = pl.BlockSpec((rows,), lambda j: (j,))
    zeros = (
        plgpu.layout_cast(jnp.zeros((rows, cols), f32), tile_layout),
        plgpu.layout_cast(jnp.zeros((rows,), f32), row_layout),
    )
    c_head = c_ref.at[layer, bh]
    acc, acc_n = plgpu.emit_pipeline(
        update,
        grid=(DHQK // rows,),
        in_specs=[tile, row_block, row_block, row_block],
        out_specs=[tile],
        max_concurrent_steps=depth,
        init_carry=zeros,
    )(c_head, head_columns(q_ref, q_offset, DHQK), head_columns(k_ref, k_offset, DHQK), n_ref.at[layer, bh], c_head)
    num = jnp.sum(acc, axis=0)
    h_ref[bh, pl.ds(vb * cols, cols)] = (num / normalizer(jnp.sum(acc_n, axis=0), m_new, eps)).astype(h_ref.dtype)

    @pl.when(vb == 0)
    def _():
        m_out_ref[bh] = m_new


_STATIC = ("eps", "qkv_heads", "qkv_offsets", "gate_heads", "gate_offsets", "block_dhqk", "block_dhv", "depth")


@functools.partial(jax.jit, static_argnames=_STATIC)
def mosaic_step(
    c: jax.Array,  # (L, BH, DHQK, DHV) float32
    n: jax.Array,  # (L, BH, DHQK) float32
    m: jax.Array,  # (L, BH) float32
    q: jax.Array,  # (R, W): see qkv_heads
    k: jax.Array,  # (R, W)
    v: jax.Array,  # (R, W)
    i: jax.Array,  # (R, W): see gate_heads
    f: jax.Array,  # (R, W)
    *,
    eps: float,
    layer: int | jax.Array = 0,
    qkv_heads: int = 1,
    qkv_offsets: tuple[int, int, int] = (0, 0, 0),
    gate_heads: int = 1,
    gate_offsets: tuple[int, int] = (0, 0),
    block_dhqk: int = 64,
    block_dhv: int = 64,
    depth: int = 2,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One step of layer ``layer`` of ``BH = B·NH`` flattened heads stacked over L layers; c is stepped in place.

    The caller checks shapes and dtypes. Jitted (a GMEM reference exists only inside ``jax.jit``): inlined
    into a caller's jit, where a donated c is updated in place; called eagerly, c is copied first (JAX cannot
    donate it).

    Inputs are read where they lie, so that a model's decode step needs no slicing copies: head ``bh`` finds
    its q in row ``bh // qkv_heads`` of ``q`` at columns ``q_offset + (bh % qkv_heads)·DHQK`` onwards (k and v
    likewise, v with DHV columns), and its input gate at ``i[bh // gate_heads, i_offset + bh % gate_heads]``
    (f likewise). One layer's arrays are (BH, DHQK) q, k, (BH, DHV) v and (BH, 1) gates with the defaults; a
    model's fused projection (B, W) has ``qkv_heads = NH`` and offsets ``(0, NH·DHQK, 2·NH·DHQK)``, its gate
    projection (B, 2·NH) ``gate_heads = NH`` and offsets ``(0, NH)``. The TMA engine reads q and k, so their
    rows must be 16-byte aligned (the row length in bytes a multiple of 16).

    Args:
        c, n, m: The stacked states: c (L, BH, DHQK, DHV), n (L, BH, DHQK), m (L, BH), float32.
        q, k, v, i, f: The inputs' sources, 2-D, as above.
        eps: Added to the normaliser; a Python float.
        layer: Which layer to step, in [0, L) (unchecked). An operand of the kernel, not compiled into it, so
            that the L layers of a model run the same kernel (one compilation instead of L: the 32-layer
            xLSTM-7B decode compiles about 4x faster).
        qkv_heads, qkv_offsets, gate_heads, gate_offsets: Where the inputs lie, as above.
        block_dhqk: Rows of c per pipeline step (a multiple of 64).
        block_dhv: Columns of c per program (a multiple of 32).
        depth: Row blocks in flight per program (``emit_pipeline``'s ``max_concurrent_steps``).

    Returns:
        ``(h (BH, DHV) in q's dtype, c' (the whole stack), n' (BH, DHQK), m' (BH,))``: n' and m' of the layer.

    Raises:
        ValueError: the tiling does not fit the head shape (:func:`mosaic_step_unsupported`).
    """
    _, BH, DHQK, DHV = c.shape
    reason = mosaic_step_unsupported(DHQK, DHV, block_dhqk, block_dhv)
    if reason is not None:
        raise ValueError(f"the Mosaic GPU step kernel cannot run this shape: {reason}")
    body = functools.partial(
        _step_body,
        eps=eps,
        qkv_heads=qkv_heads,
        qkv_offsets=qkv_offsets,
        gate_heads=gate_heads,
        gate_offsets=gate_offsets,
        block_dhqk=block_dhqk,
        block_dhv=block_dhv,
        depth=depth,
    )
    f32 = jnp.float32
    kernel = pl.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((BH, DHV), q.dtype),
            jax.ShapeDtypeStruct((BH, DHQK), f32),
            jax.ShapeDtypeStruct((BH,), f32),
        ),
        mesh=plgpu.Mesh(grid=(BH, DHV // block_dhv), grid_names=("bh", "vb")),
        name="mlstm_recurrent_step_mosaic",
    )
    c_ref = jax.new_ref(c, memory_space=plgpu.GMEM)
    h, n_new, m_new = kernel(jnp.asarray(layer, jnp.int32).reshape(1), c_ref, n, m, q, k, v, i, f)
    return h, jax.freeze(c_ref), n_new, m_new
