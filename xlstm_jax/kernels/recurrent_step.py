"""The mLSTM decode step as one fused Pallas kernel.

One launch reads the state c, n, m once, updates it and computes h in the same pass (the equations of
:func:`xlstm_jax.mlstm.recurrent.recurrent_step_fw`). c is aliased input to output
(``input_output_aliases``), so under ``jax.jit`` with the state donated it is updated in place.

Tiling (:class:`~xlstm_jax.kernels.config.StepKernelConfig`): a program owns the rows of one DHQK split and
one block of DHV columns of one head. The grid is (DHV / block_dhv, dhqk_splits, B·NH), DHV blocks fastest,
so that the programs launched together cover contiguous memory. A program walks its rows ``block_dhqk`` at a
time: it requests its first row block before the gate math and each next block one iteration ahead, and it
accumulates ``q̂ ⊙ c'`` elementwise, reducing over rows once at the end. With one split, it divides by the
normaliser itself and writes h. With several (small B·NH, to fill the GPU), each program writes its partial
numerator ``Σ_d q̂_d c'_{d,:}`` and partial ``Σ_d q̂_d n'_d``; a small XLA epilogue sums the partials and
divides. This is exact up to rounding because both are sums over DHQK.

Precision: the state is float32; q, k, v and the gates are upcast to float32 on chip, the read-out runs in
float32 and only h is cast to q's dtype, as in the XLA step.

n and m are written to fresh buffers rather than in place: every DHV block of a head reads them, and even
within one program Triton keeps copies of a vector's elements in several warps, so a warp could overwrite n
before another has read it (seen on an H200: wrong h with one program per head and n, m aliased). They are
DHV + 1 times smaller than c.

On Hopper GPUs, large grids run a second kernel for the same function instead, written in Mosaic GPU
(:mod:`xlstm_jax.kernels.recurrent_step_mosaic`; ``StepKernelConfig.backend``, chosen in
:func:`_mosaic_tiling`): it streams c through shared memory with the TMA engine (BENCHMARKS.md compares them).

Two public functions share both kernels: :func:`recurrent_step_pallas` on one layer's states (B, NH, ...),
and :func:`recurrent_step_kernel` on one layer of states stacked over L layers and flattened over the heads
(L, B·NH, ...), stepped in place, with q, k, v and the gates read where they lie in larger arrays (such as a
model's fused projections), and optionally h's unnormalised partial sums returned for a read-out kernel to
combine (:mod:`xlstm_jax.kernels.head_norm`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from xlstm_jax.kernels.config import StepKernelConfig, check_head_dims, check_kernel_dtypes, kernel_mode
from xlstm_jax.kernels.recurrent_step_mosaic import device_supports_mosaic, mosaic_step, mosaic_step_unsupported
from xlstm_jax.mlstm.checks import check_eps, check_step_inputs
from xlstm_jax.mlstm.recurrent import recurrent_step_fw
from xlstm_jax.mlstm.stabilizer import normalize_readout, step_gates

__all__ = ["check_step_kernel_call", "recurrent_step_kernel", "recurrent_step_pallas"]

_TMA_ROW_BYTES = 16  # the TMA engine copies rows whose length in bytes is a multiple of 16


# ---------------------------------------------------------------------------------------------------------
# Kernel body: one program = one head (bh), one DHV block (vb), one DHQK split (ks).
# ---------------------------------------------------------------------------------------------------------
def _step_kernel(
    c_ref,  # (ROWS, BV) float32: this program's tile of c; ROWS = DHQK / dhqk_splits
    n_ref,  # (ROWS,) float32
    m_ref,  # (1,) float32
    q_ref,  # (ROWS,)
    k_ref,  # (ROWS,)
    v_ref,  # (BV,)
    i_ref,  # (1,)
    f_ref,  # (1,)
    c_out_ref,  # (ROWS, BV) float32, the same buffer as c_ref
    n_out_ref,  # (ROWS,) float32, a fresh buffer
    m_out_ref,  # (1,) float32, a fresh buffer
    h_ref,  # (BV,) in q's dtype with one split; else the partial numerator (BV,) float32
    qn_ref,  # None with one split; else the partial q̂·n' (1,) float32
    *,
    eps: float,
    DHQK: int,
    rows: int,
    block_dhqk: int,
):
    vb, ks = pl.program_id(0), pl.program_id(1)
    f32 = jnp.float32
    num_blocks = rows // block_dhqk
    scale = 1.0 / math.sqrt(DHQK)

    def row_block(j):
        if isinstance(j, int):
            return pl.ds(j * block_dhqk, block_dhqk)
        return pl.ds(pl.multiple_of(j * block_dhqk, block_dhqk), block_dhqk)

    def load(j):
        """Row block j of c (streamed: read once) and of n, q, k."""
        r = row_block(j)
        return c_ref[r, :], n_ref[r], q_ref[r], k_ref[r]

    # The first row block is requested before the gate math, so that its latency overlaps the loads of m, i, f
    # instead of following them.
    first = load(0)
    m_new, f_act, i_act = step_gates(m_ref[0], i_ref[0].astype(f32), f_ref[0].astype(f32))
    v = v_ref[...].astype(f32)

    def update(j, tile, acc, acc_n):
        """Updates row block j; accumulates q̂ ⊙ c' and q̂ ⊙ n' elementwise (reduced once, after the loop)."""
        c, n, q, k = tile
        r = row_block(j)
        ik = i_act * k.astype(f32)
        c = f_act * c + ik[:, None] * v[None, :]
        c_out_ref[r, :] = c
        n = f_act * n + ik

        @pl.when(vb == 0)
        def _():
            n_out_ref[r] = n

        q_hat = q.astype(f32) * scale
        return acc + q_hat[:, None] * c, acc_n + q_hat * n

    acc0 = (jnp.zeros((block_dhqk, v.shape[0]), f32), jnp.zeros((block_dhqk,), f32))

    # Software pipelining by hand: row block j + 1 is requested before block j is updated.
    def body(j, carry):
        tile, acc, acc_n = carry
        nxt = load(j + 1)
        acc, acc_n = update(j, tile, acc, acc_n)
        return nxt, acc, acc_n

    last, acc = first, acc0
    if num_blocks > 1:
        last, *acc = jax.lax.fori_loop(0, num_blocks - 1, body, (first, *acc0))
    acc, acc_n = update(num_blocks - 1, last, *acc)
    num, qn = jnp.sum(acc, axis=0), jnp.sum(acc_n)

    @pl.when((vb == 0) & (ks == 0))
    def _():
        m_out_ref[0] = m_new

    if qn_ref is None:
        h_ref[...] = normalize_readout(num, qn, m_new, eps).astype(h_ref.dtype)
    else:
        h_ref[...] = num

        @pl.when(vb == 0)
        def _():
            qn_ref[0] = qn


# ---------------------------------------------------------------------------------------------------------
# pallas_call wrapper: grid, BlockSpecs, aliasing.
# ---------------------------------------------------------------------------------------------------------
def _step_call(
    c,
    n,
    m,
    layer,
    q,
    k,
    v,
    i,
    f,
    *,
    eps: float,
    config: StepKernelConfig,
    interpret: bool,
    qkv_heads: int = 1,
    qkv_offsets: tuple[int, int, int] = (0, 0, 0),
    gate_heads: int = 1,
    gate_offsets: tuple[int, int] = (0, 0),
    combine: bool = True,
):
    """Runs the kernel on layer ``layer`` of stacked, flattened states: c (L, BH, DHQK, DHV), n (L, BH, DHQK),
    m (L, BH, 1).

    Inputs are read where they lie (:func:`recurrent_step_kernel`): head bh's q in row ``bh // qkv_heads`` of q
    at columns ``q_offset + (bh % qkv_heads)·DHQK`` onwards, k and v likewise, its gates at
    ``i[bh // gate_heads, i_offset + bh % gate_heads]`` and f likewise. With the defaults that is q, k (BH,
    DHQK), v (BH, DHV) and i, f (BH, 1). q, k and v offsets must be multiples of the blocks that read them
    (:func:`_blocks_fit`). The gate sources (R, W) are read as their flattened (R·W, 1) view.

    c is updated in place (aliased): a program prefetches only rows it has not yet written, and the update is
    elementwise on one tile, so loads and stores share its layout (no other program touches the tile; on the
    H200 the stepped c has always matched the XLA step's bit for bit, in every tiling benchmarked). n and m
    are written to fresh buffers for this layer only, (BH, DHQK) and (BH, 1): several programs read a head's
    n and m, and Triton spreads a vector over the warps of a program with copies in several warps, so even
    within one program a warp could overwrite an element that another warp has yet to read (seen on an
    H200: in-place n and m gave wrong h with one program per head).

    Returns:
        ``h (BH, DHV), c' (L, BH, DHQK, DHV), n' (BH, DHQK), m' (BH, 1)``; with ``combine=False`` and several
        DHQK splits P, ``h`` is the pair of partial sums ``(num (BH, P, DHV), qn (BH, P))``, float32.
    """
    _, BH, DHQK, DHV = c.shape
    block_dhv, splits, block_dhqk = config.splits(BH, DHQK, DHV)
    rows = DHQK // splits
    if not _blocks_fit(qkv_offsets, rows, block_dhv):
        raise ValueError(f"q, k, v offsets {qkv_offsets} are not multiples of the blocks ({rows}, {block_dhv})")
    # DHV blocks fastest, then DHQK splits, then heads: programs launched together cover contiguous memory.
    grid = (DHV // block_dhv, splits, BH)

    def idx(fn):
        return lambda vb, ks, bh: fn(bh, vb, ks)

    tile = pl.BlockSpec((None, None, rows, block_dhv), idx(lambda bh, vb, ks: (layer, bh, ks, vb)))
    n_spec = pl.BlockSpec((None, None, rows), idx(lambda bh, vb, ks: (layer, bh, ks)))
    m_spec = pl.BlockSpec((None, None, 1), idx(lambda bh, vb, ks: (layer, bh, 0)))
    rows_spec = pl.BlockSpec((None, rows), idx(lambda bh, vb, ks: (bh, ks)))
    cols_spec = pl.BlockSpec((None, block_dhv), idx(lambda bh, vb, ks: (bh, vb)))
    head_spec = pl.BlockSpec((None, 1), idx(lambda bh, vb, ks: (bh, 0)))
    q_spec = k_spec = rows_spec
    v_spec = cols_spec
    i_spec = f_spec = head_spec
    if (gate_heads, i.shape[1], f.shape[1]) != (1, 1, 1):
        G, W = gate_heads, i.shape[1]

        def gate_spec(offset):
            def row(bh):  # row (bh // G)·W + offset + bh % G of the flattened source
                r = bh + (bh // G) * (W - G)
                return r + offset if offset else r

            return pl.BlockSpec((None, 1), idx(lambda bh, vb, ks: (row(bh), 0)))

        i_spec, f_spec = gate_spec(gate_offsets[0]), gate_spec(gate_offsets[1])
        i, f = i.reshape(-1, 1), f.reshape(-1, 1)
    if qkv_heads != 1 or any(qkv_offsets):
        NH = qkv_heads

        def source_spec(size, offset, dh, axis):
            return pl.BlockSpec(
                (None, size),
                idx(lambda bh, vb, ks: (bh // NH, offset // size + (bh % NH) * (dh // size) + (vb, ks)[axis])),
            )

        q_off, k_off, v_off = qkv_offsets
        q_spec, k_spec = source_spec(rows, q_off, DHQK, 1), source_spec(rows, k_off, DHQK, 1)
        v_spec = source_spec(block_dhv, v_off, DHV, 0)
    f32 = jnp.float32
    out_shape = [
        jax.ShapeDtypeStruct(c.shape, f32),
        jax.ShapeDtypeStruct(n.shape[1:], f32),
        jax.ShapeDtypeStruct(m.shape[1:], f32),
    ]
    out_specs = [tile, rows_spec, head_spec]
    if splits == 1:
        out_shape.append(jax.ShapeDtypeStruct((BH, DHV), q.dtype))
        out_specs.append(cols_spec)
    else:
        out_shape += [jax.ShapeDtypeStruct((BH, splits, DHV), f32), jax.ShapeDtypeStruct((BH, splits), f32)]
        out_specs += [
            pl.BlockSpec((None, None, block_dhv), idx(lambda bh, vb, ks: (bh, ks, vb))),
            pl.BlockSpec((None, 1), idx(lambda bh, vb, ks: (bh, ks))),
        ]
    kernel = functools.partial(_step_kernel, eps=eps, DHQK=DHQK, rows=rows, block_dhqk=block_dhqk)
    if splits == 1:
        kernel = functools.partial(kernel, qn_ref=None)
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=[tile, n_spec, m_spec, q_spec, k_spec, v_spec, i_spec, f_spec],
        out_specs=out_specs,
        input_output_aliases={0: 0},
        compiler_params=pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="mlstm_recurrent_step",
    )(c, n, m, q, k, v, i, f)
    c_new, n_new, m_new = outs[:3]
    if splits == 1:
        return outs[3], c_new, n_new, m_new
    if not combine:
        return (outs[3], outs[4]), c_new, n_new, m_new
    num, qn = outs[3].sum(axis=1), outs[4].sum(axis=1)  # exact combination of the DHQK splits
    h = normalize_readout(num, qn, m_new[:, 0], eps).astype(q.dtype)
    return h, c_new, n_new, m_new


def _blocks_fit(offsets: tuple[int, int, int], rows: int, block_dhv: int) -> bool:
    """Whether the Triton kernel can read q, k, v in place at these offsets (on its block boundaries)."""
    q_off, k_off, v_off = offsets
    return q_off % rows == 0 and k_off % rows == 0 and v_off % block_dhv == 0


# ---------------------------------------------------------------------------------------------------------
# The choice of kernel, and the public functions.
# ---------------------------------------------------------------------------------------------------------
def check_step_kernel_call(
    c: jax.Array,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    i: jax.Array,
    f: jax.Array,
    eps: float,
    config: StepKernelConfig | None,
    interpret: bool | None,
) -> tuple[str, StepKernelConfig]:
    """What the step kernel demands of a call beyond shapes, checked alike on every platform: float32 states
    (c), inputs it reads, head dims it covers (from c's last two), eps a Python number, a config.

    A caller that runs an XLA form where no kernel runs checks this first, so that a call that fails on a GPU
    fails on a CPU too.

    Returns:
        ``(mode, config)``: :func:`~xlstm_jax.kernels.config.kernel_mode` of ``interpret`` and the config
        (``get_default`` for None).

    Raises:
        ValueError, TypeError, RuntimeError: as :func:`recurrent_step_pallas`.
    """
    check_eps(eps)
    if isinstance(eps, jax.core.Tracer):
        raise TypeError("eps must be a Python number for the Pallas step kernel (it is compiled in), got a tracer")
    if c.dtype != jnp.float32:
        raise TypeError(f"the Pallas step kernel keeps its states in float32, got {c.dtype=}")
    check_kernel_dtypes(q=q, k=k, v=v, i=i, f=f)
    DHQK, DHV = c.shape[-2:]
    check_head_dims(DHQK, DHV)
    mode = kernel_mode(interpret)
    if config is None:
        config = StepKernelConfig.get_default(DHQK, DHV)
    elif not isinstance(config, StepKernelConfig):
        raise TypeError(f"config must be a StepKernelConfig or None, got {type(config).__name__}")
    return mode, config


def _mosaic_tiling(config: StepKernelConfig, mode: str, BH: int, DHQK: int, DHV: int) -> tuple[int, int] | None:
    """``(block_dhqk, block_dhv)`` of the Mosaic kernel if ``config.backend`` selects it here, else None.

    Raises:
        ValueError: ``backend="mosaic"`` outside compiled mode, or with a tiling the kernel cannot run.
        RuntimeError: ``backend="mosaic"`` on a device that is not a Hopper (or newer) GPU.
    """
    if config.backend == "triton":
        return None
    block_dhqk, block_dhv = min(config.block_dhqk or 64, DHQK), min(config.block_dhv, DHV)
    reason = mosaic_step_unsupported(DHQK, DHV, block_dhqk, block_dhv)
    if config.backend == "auto":
        programs = BH * (DHV // block_dhv)
        usable = mode == "compiled" and reason is None and programs >= config.mosaic_min_programs
        return (block_dhqk, block_dhv) if usable and device_supports_mosaic() else None
    if mode != "compiled":
        raise ValueError(
            f"backend='mosaic' runs compiled only (Mosaic GPU has no interpret mode in the supported JAX "
            f"versions), but this call runs in {mode!r} mode; use backend='auto' or 'triton'"
        )
    if not device_supports_mosaic():
        raise RuntimeError(
            f"backend='mosaic' needs a GPU of compute capability 9.0 or newer (TMA), got {jax.devices()[0]}"
        )
    if reason is not None:
        raise ValueError(f"backend='mosaic' cannot tile this head shape: {reason}")
    return block_dhqk, block_dhv


def _run_step(c, n, m, q, k, v, i, f, *, L, BH, layer, eps, config, mode, layout, combine):
    """Steps layer ``layer`` with the kernel ``config`` selects here: the Mosaic one or the Triton one.

    The states may have any shapes that reshape to (L, BH, DHQK, DHV), (L, BH, DHQK) and (L, BH); ``layout`` is
    ``(qkv_heads, qkv_offsets, gate_heads, gate_offsets)`` of the sources (:func:`recurrent_step_kernel`). Where
    a kernel cannot read q, k and v in place (the Triton kernel: offsets off its block boundaries; the Mosaic
    kernel: rows that are not 16-byte aligned), their columns are sliced out first.

    Returns:
        ``(h, c' (L, BH, DHQK, DHV), n' (BH, DHQK), m')`` with m' (BH,) from the Mosaic kernel and (BH, 1) from
        the Triton one; h as ``_step_call``'s.
    """
    DHQK, DHV = c.shape[-2:]
    qkv_heads, qkv_offsets, gate_heads, gate_offsets = layout
    mosaic = _mosaic_tiling(config, mode, BH, DHQK, DHV)
    if mosaic is not None:
        fits = all(x.shape[1] * x.dtype.itemsize % _TMA_ROW_BYTES == 0 for x in (q, k, v))
    else:
        block_dhv, splits, _ = config.splits(BH, DHQK, DHV)
        fits = _blocks_fit(qkv_offsets, DHQK // splits, block_dhv)
    if not fits:
        q, k, v = (
            x[:, off : off + qkv_heads * dh].reshape(BH, dh)
            for x, off, dh in zip((q, k, v), qkv_offsets, (DHQK, DHQK, DHV), strict=True)
        )
        qkv_heads, qkv_offsets = 1, (0, 0, 0)
    if mosaic is not None:
        kw: dict[str, Any] = {"eps": eps, "block_dhqk": mosaic[0], "block_dhv": mosaic[1]}
        kw |= {"depth": config.pipeline_depth, "layer": layer}
        if (qkv_heads, qkv_offsets) != (1, (0, 0, 0)):
            kw |= {"qkv_heads": qkv_heads, "qkv_offsets": qkv_offsets}
        if (gate_heads, gate_offsets) != (1, (0, 0)):
            kw |= {"gate_heads": gate_heads, "gate_offsets": gate_offsets}
        states = (c.reshape(L, BH, DHQK, DHV), n.reshape(L, BH, DHQK), m.reshape(L, BH))
        return mosaic_step(*states, q, k, v, i, f, **kw)
    return _step_call(
        c.reshape(L, BH, DHQK, DHV),
        n.reshape(L, BH, DHQK),
        m.reshape(L, BH, 1),
        layer,
        q,
        k,
        v,
        i,
        f,
        eps=eps,
        config=config,
        interpret=mode == "interpret",
        qkv_heads=qkv_heads,
        qkv_offsets=qkv_offsets,
        gate_heads=gate_heads,
        gate_offsets=gate_offsets,
        combine=combine,
    )


def recurrent_step_pallas(
    c: jax.Array,  # (B, NH, DHQK, DHV) float32
    n: jax.Array,  # (B, NH, DHQK) float32
    m: jax.Array,  # (B, NH, 1) float32
    q: jax.Array,  # (B, NH, DHQK)
    k: jax.Array,  # (B, NH, DHQK)
    v: jax.Array,  # (B, NH, DHV)
    i: jax.Array,  # (B, NH, 1) or (B, NH)
    f: jax.Array,  # (B, NH, 1) or (B, NH)
    eps: float = 1e-6,
    *,
    config: StepKernelConfig | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """One mLSTM step in a fused Pallas kernel; a drop-in for ``recurrent_step_fw`` with float32 states.

    Computes, per batch element and head, ``m' = max(logsigmoid(f) + m, i)``, ``c' = f' c + i' k vᵀ``,
    ``n' = f' n + i' k`` and ``h = (q̂ᵀc') / (max(|q̂ᵀn'|, exp(-m')) + eps)`` with ``q̂ = q / sqrt(DHQK)``.

    Args:
        c: Memory state of shape (B, NH, DHQK, DHV), float32. Aliased to the returned c': donate it under
            ``jax.jit`` (``donate_argnums``) to update it in place.
        n: Normaliser state of shape (B, NH, DHQK), float32.
        m: Max state of shape (B, NH, 1), float32.
        q: Queries of shape (B, NH, DHQK), float32, bfloat16 or float16. h is returned in q's dtype.
        k: Keys of shape (B, NH, DHQK).
        v: Values of shape (B, NH, DHV).
        i: Input gate pre-activation of shape (B, NH, 1) or (B, NH).
        f: Forget gate pre-activation of shape (B, NH, 1) or (B, NH).
        eps: Added to the normaliser after the max; a Python number (it is compiled into the kernel).
        config: Tiling and backend; None for ``StepKernelConfig.get_default(DHQK, DHV)`` (``backend="auto"``:
            the Mosaic GPU kernel on Hopper GPUs for grids of at least ``mosaic_min_programs`` programs, the
            Triton kernel otherwise).
        interpret: None: the compiled kernel on a GPU, ``recurrent_step_fw`` elsewhere. True: Pallas
            interpret mode (Triton kernel only). False: the compiled kernel (raises without a GPU).

    Returns:
        ``h (B, NH, DHV)`` in q's dtype and ``(c', n', m')`` with the shapes of (c, n, m), float32.

    Raises:
        ValueError: a shape does not match, DHQK or DHV is not a supported power of two, or eps is not a
            positive finite number; ``backend="mosaic"`` in interpret mode or with a tiling it cannot run.
        TypeError: the states are not float32, an input is not float32/bfloat16/float16, or eps is traced.
        RuntimeError: ``interpret=False`` without a GPU; ``backend="mosaic"`` on a GPU older than Hopper.

    Example:
        >>> step = functools.partial(recurrent_step_pallas, interpret=True)
        >>> h = recurrent_sequence_fw(q, k, v, i, f, mlstm_step_fn=step, state_dtype="float32")
    """
    i, f = check_step_inputs(c, n, m, q, k, v, i, f)
    mode, config = check_step_kernel_call(c, q, k, v, i, f, eps, config, interpret)
    if mode == "xla":
        return recurrent_step_fw(c=c, n=n, m=m, q=q, k=k, v=v, i=i, f=f, eps=eps)
    B, NH, DHQK, DHV = c.shape
    BH = B * NH
    flat = (q.reshape(BH, -1), k.reshape(BH, -1), v.reshape(BH, -1), i.reshape(BH, 1), f.reshape(BH, 1))
    kw = {"config": config, "mode": mode, "layout": (1, (0, 0, 0), 1, (0, 0)), "combine": True}
    h, c_new, n_new, m_new = _run_step(c, n, m, *flat, L=1, BH=BH, layer=0, eps=float(eps), **kw)
    return h.reshape(B, NH, DHV), (c_new.reshape(c.shape), n_new.reshape(n.shape), m_new.reshape(m.shape))


def _check_source(name: str, x: Any, heads: int, offset: int, width: int, BH: int) -> None:
    """Raises unless ``x`` (R, W) holds ``width`` columns per head at ``offset + (bh % heads)·width`` of row
    ``bh // heads`` for BH heads."""
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"{name} must be a 2-D source (R, W), got {name}.shape={tuple(getattr(x, 'shape', ()))}")
    if not (isinstance(offset, int) and offset >= 0):
        raise ValueError(f"{name}'s offset must be a non-negative int, got {offset!r}")
    R, W = x.shape
    if R * heads != BH or offset + heads * width > W:
        raise ValueError(
            f"{name}.shape={(R, W)} cannot hold {heads} heads per row of {width} columns from column {offset} for "
            f"B·NH={BH} heads: need R·heads = {BH} and W >= {offset + heads * width}"
        )


def recurrent_step_kernel(
    c: jax.Array,  # (L, BH, DHQK, DHV) float32
    n: jax.Array,  # (L, BH, DHQK) float32
    m: jax.Array,  # (L, BH) float32
    q: jax.Array,  # (R, W): see qkv_heads
    k: jax.Array,  # (R, W)
    v: jax.Array,  # (R, W)
    i: jax.Array,  # (R', W'): see gate_heads
    f: jax.Array,  # (R', W')
    *,
    layer: int,
    eps: float = 1e-6,
    qkv_heads: int = 1,
    qkv_offsets: tuple[int, int, int] = (0, 0, 0),
    gate_heads: int = 1,
    gate_offsets: tuple[int, int] = (0, 0),
    config: StepKernelConfig | None = None,
    interpret: bool = False,
    combine: bool = True,
) -> tuple[jax.Array | tuple[jax.Array, jax.Array], jax.Array, jax.Array, jax.Array]:
    """The step of :func:`recurrent_step_pallas` on layer ``layer`` of ``BH`` flattened heads stacked over L
    layers, with the inputs read where they lie.

    The kernel (Triton, or Mosaic where ``config.backend`` selects it, as for :func:`recurrent_step_pallas`)
    reads and writes the layer's slice of c in place, so a donated stack is never copied (slicing the layer out
    and writing it back would copy it twice). n' and m' of the layer are returned as fresh arrays (see the
    module docstring); the caller writes them where they belong.

    Head ``bh`` finds its q in row ``bh // qkv_heads`` of ``q`` at columns ``q_offset + (bh % qkv_heads)·DHQK``
    onwards (k and v likewise, v with DHV columns), and its input gate at ``i[bh // gate_heads, i_offset + bh %
    gate_heads]`` (f likewise). With the defaults, q, k are (BH, DHQK), v (BH, DHV) and i, f (BH, 1); a fused
    projection (B, W) holding the q, k and v of NH heads side by side has ``qkv_heads = NH``. The kernels read
    the sources in place where they can (offsets on the Triton kernel's block boundaries; rows 16-byte aligned
    for the Mosaic kernel's TMA copies), else q, k and v are sliced out first (one copy each).

    Args:
        c: Memory states (L, BH, DHQK, DHV), float32; aliased to the returned stack (donate it under ``jax.jit``).
        n: Normaliser states (L, BH, DHQK), float32.
        m: Max states (L, BH), float32.
        q, k, v: The sources of q, k, v, 2-D (above), float32, bfloat16 or float16; h is in q's dtype.
        i, f: The sources of the gate pre-activations, 2-D (above).
        layer: Which layer to step, a Python int in [0, L) (the Triton kernel compiles it into its index maps).
        eps: As for :func:`recurrent_step_pallas`.
        qkv_heads, qkv_offsets, gate_heads, gate_offsets: Where the inputs lie (above).
        config: As for :func:`recurrent_step_pallas`.
        interpret: True: Pallas interpret mode (Triton kernel only). False: the compiled kernel (needs a GPU).
            There is no XLA fallback here: a caller without a kernel to run computes the step itself.
        combine: False: where the Triton kernel splits DHQK over P programs, return h's partial sums
            ``(num (BH, P, DHV), qn (BH, P))``, float32, for a read-out kernel to combine
            (:func:`xlstm_jax.kernels.head_norm.head_norm_gate_pallas`), instead of combining them in XLA.

    Returns:
        ``(h (BH, DHV) or its partial sums, c' (L, BH, DHQK, DHV), n' (BH, DHQK), m' (BH,))``: the whole stack
        c' with the layer stepped; n', m' of the layer only.

    Raises:
        ValueError: a shape does not match, layer is out of range, a source cannot hold its heads, or as
            :func:`recurrent_step_pallas`.
        TypeError: layer is not a Python int, interpret is not a bool, or as :func:`recurrent_step_pallas`.
        RuntimeError: ``interpret=False`` without a GPU; ``backend="mosaic"`` on a GPU older than Hopper.
    """
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise TypeError(f"layer must be a Python int (it is compiled into the kernel), got {layer!r}")
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret must be a bool (the caller runs the XLA step without a kernel), got {interpret!r}")
    if c.ndim != 4 or n.shape != c.shape[:3] or m.shape != c.shape[:2]:
        raise ValueError(
            "stacked flattened states must be c (L, BH, DHQK, DHV), n (L, BH, DHQK), m (L, BH), got "
            f"c.shape={tuple(c.shape)}, n.shape={tuple(n.shape)}, m.shape={tuple(m.shape)}"
        )
    L, BH, DHQK, DHV = c.shape
    if not 0 <= layer < L:
        raise ValueError(f"layer={layer} must be in [0, L) for L={L} stacked layers (c.shape={tuple(c.shape)})")
    if not (c.dtype == n.dtype == m.dtype):
        raise TypeError(f"the states must share one dtype, got {c.dtype=}, {n.dtype=}, {m.dtype=}")
    for name, heads in (("qkv_heads", qkv_heads), ("gate_heads", gate_heads)):
        if not (isinstance(heads, int) and heads >= 1):
            raise ValueError(f"{name} must be a positive int, got {heads!r}")
    if len(qkv_offsets) != 3 or len(gate_offsets) != 2:
        raise ValueError(f"qkv_offsets must be 3 ints and gate_offsets 2, got {qkv_offsets!r}, {gate_offsets!r}")
    for name, x, off, width in zip("qkv", (q, k, v), qkv_offsets, (DHQK, DHQK, DHV), strict=True):
        _check_source(name, x, qkv_heads, off, width, BH)
    for name, x, off in zip("if", (i, f), gate_offsets, strict=True):
        _check_source(name, x, gate_heads, off, 1, BH)
    if i.shape != f.shape:
        raise ValueError(
            f"the gate sources must have one shape, got i.shape={tuple(i.shape)}, f.shape={tuple(f.shape)}"
        )
    mode, config = check_step_kernel_call(c, q, k, v, i, f, eps, config, interpret)
    layout = (qkv_heads, tuple(qkv_offsets), gate_heads, tuple(gate_offsets))
    kw = {"config": config, "mode": mode, "layout": layout, "combine": combine}
    h, c_new, n_new, m_new = _run_step(c, n, m, q, k, v, i, f, L=L, BH=BH, layer=layer, eps=float(eps), **kw)
    return h, c_new, n_new, m_new.reshape(BH)
