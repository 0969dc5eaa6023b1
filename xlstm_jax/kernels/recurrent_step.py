"""The mLSTM decode step as one fused Pallas kernel.

One launch reads the state c, n, m once, updates it and computes h in the same pass (the equations of
:func:`xlstm_jax.mlstm.recurrent.recurrent_step_fw`). c is aliased input to output
(``input_output_aliases``), so under ``jax.jit`` with the state donated it is updated in place.

Tiling (:class:`~xlstm_jax.kernels.config.StepKernelConfig`): a program owns the rows of one DHQK split and
one block of DHV columns of one head. The grid is (DHV / block_dhv, dhqk_splits, B·NH), DHV blocks fastest,
so that the programs launched together cover contiguous memory (``grid_order="tiles"``; ``"heads"`` puts
the heads fastest, as before: 2-6% slower at B >= 32 on an H200). A program walks its rows ``block_dhqk``
at a time; with ``prefetch`` it requests its first row block before the gate math and each next block one
iteration ahead, and it accumulates ``q̂ ⊙ c'`` elementwise, reducing over rows once at the end. With one
split, it divides by the normaliser itself and writes h. With several (small B·NH, to fill the GPU), each
program writes its partial numerator ``Σ_d q̂_d c'_{d,:}`` and partial ``Σ_d q̂_d n'_d``; a small XLA
epilogue sums the partials and divides. This is exact up to rounding because both are sums over DHQK.

Precision: the state is float32; q, k, v and the gates are upcast to float32 on chip, the read-out runs in
float32 and only h is cast to q's dtype, as in the XLA step.

n and m are written to fresh buffers rather than in place: every DHV block of a head reads them, and even
within one program Triton keeps copies of a vector's elements in several warps, so a warp could overwrite n
before another has read it (seen on an H200: wrong h with one program per head and n, m aliased). They are
DHV + 1 times smaller than c.

On Hopper GPUs, large grids run a second kernel for the same function instead, written in Mosaic GPU
(:mod:`xlstm_jax.kernels.recurrent_step_mosaic`; ``StepKernelConfig.backend``, chosen in
:func:`_mosaic_tiling`): it streams c through shared memory with the TMA engine, 1.05x the copy floor at
B=128 on an H200 against this kernel's 1.12x.

Two entry points share both kernels: :func:`recurrent_step_pallas` on one layer's states, and
:func:`recurrent_step_pallas_stacked`, a model's decode step on one layer of states stacked over the layers
(c's slice stepped in place, q, k, v read from the fused projection).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from xlstm_jax.kernels.config import StepKernelConfig, check_head_dims, check_kernel_dtypes, kernel_mode
from xlstm_jax.kernels.recurrent_step_mosaic import device_supports_mosaic, mosaic_step, mosaic_step_unsupported
from xlstm_jax.mlstm.checks import check_eps, check_stacked_states, check_step_inputs
from xlstm_jax.mlstm.recurrent import recurrent_step_fw, recurrent_step_stacked_fw, split_gates, split_qkv
from xlstm_jax.mlstm.stabilizer import normalize_readout, step_gates

__all__ = ["recurrent_step_pallas", "recurrent_step_pallas_stacked"]


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
    prefetch: bool,
    evict_first: bool,
    vb_axis: int,
    ks_axis: int,
):
    vb, ks = pl.program_id(vb_axis), pl.program_id(ks_axis)
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
        c = pl_triton.load(c_ref.at[r, :], eviction_policy="evict_first") if evict_first else c_ref[r, :]
        return c, n_ref[r], q_ref[r], k_ref[r]

    # With prefetch, the first row block is requested before the gate math, so that its latency overlaps
    # the loads of m, i, f instead of following them.
    first = load(0) if prefetch else None
    m_new, f_act, i_act = step_gates(m_ref[0], i_ref[0].astype(f32), f_ref[0].astype(f32))
    v = v_ref[...].astype(f32)

    def update(j, tile, acc, acc_n):
        """Updates row block j; accumulates q̂ ⊙ c' and q̂ ⊙ n' elementwise (reduced once, after the loop)."""
        c, n, q, k = tile
        r = row_block(j)
        ik = i_act * k.astype(f32)
        c = f_act * c + ik[:, None] * v[None, :]
        if evict_first:
            pl_triton.store(c_out_ref.at[r, :], c, eviction_policy="evict_first")
        else:
            c_out_ref[r, :] = c
        n = f_act * n + ik

        @pl.when(vb == 0)
        def _():
            n_out_ref[r] = n

        q_hat = q.astype(f32) * scale
        return acc + q_hat[:, None] * c, acc_n + q_hat * n

    acc0 = (jnp.zeros((block_dhqk, v.shape[0]), f32), jnp.zeros((block_dhqk,), f32))
    if prefetch:
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
    else:
        acc, acc_n = jax.lax.fori_loop(0, num_blocks, lambda j, a: update(j, load(j), *a), acc0)
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


def _head_out_kernel(*refs, combine: bool, eps: float, norm_eps: float):
    """One head of the layer's read-out: h from the step's partial sums (or h itself), per-head LayerNorm,
    times the weight, times sigmoid(o) (the roundings of ``xlstm_jax.mlstm.head_norm.head_norm_gate``); and
    the head's new n and m copied into the layer's slice of the stacks (in place)."""
    refs = list(refs)
    num_ref, qn_ref = (refs.pop(0), refs.pop(0)) if combine else (None, None)
    h_ref = None if combine else refs.pop(0)
    m_ref, n_ref, o_ref, w_ref, _, _, y_ref, n_out_ref, m_out_ref = refs
    f32, dtype = jnp.float32, y_ref.dtype
    n_out_ref[...] = n_ref[...]  # the step kernel wrote n' and m' to fresh buffers; no one reads the stacks now
    m_out_ref[...] = m_ref[...]
    # h's normaliser (a positive scalar per head) cancels in the LayerNorm up to its eps; it is still applied,
    # so that the function is the unfused model's, whatever its eps.
    if combine:  # the exact combination of the DHQK splits, as _step_call's epilogue
        h = normalize_readout(jnp.sum(num_ref[...], axis=0), jnp.sum(qn_ref[...]), m_ref[0], eps).astype(dtype)
    else:
        h = h_ref[...]
    y = h.astype(f32)
    y = y - jnp.mean(y)
    y = (y * jax.lax.rsqrt(jnp.mean(jnp.square(y)) + norm_eps)).astype(dtype)
    y = (y.astype(f32) * w_ref[...].astype(dtype).astype(f32)).astype(dtype)
    gate = jax.nn.sigmoid(o_ref[...].astype(f32)).astype(dtype)
    y_ref[...] = (gate.astype(f32) * y.astype(f32)).astype(dtype)


def _head_out_call(h, qn, m_new, n_new, n, m, layer, qkv, weight, *, NH, o_offset, eps, norm_eps, interpret):
    """The layer's output (B, NH·DHV) in qkv's dtype from the step's read-out: ``h`` (BH, DHV), or with ``qn``
    the partial numerators (BH, P, DHV) and q̂·n' (BH, P) of P DHQK splits. Grid: one program per head. o is
    read in place from ``qkv`` (B, W) at columns ``o_offset + h·DHV`` (a multiple of DHV). The step's new
    ``n_new`` (BH, DHQK) and ``m_new`` (BH, 1) are also written into slice ``layer`` of the stacks n (L, BH,
    DHQK) and m (L, BH, 1), in place: one program per head owns its slice, and the step that read the stacks
    has finished, so there is no race (unlike inside the step kernel), and no copy kernels after it.

    Returns:
        ``(y, n', m')``: y (B, NH·DHV) and the stacks.
    """
    BH, DHV, DHQK = h.shape[0], h.shape[-1], n.shape[-1]
    B = BH // NH
    if qn is None:
        inputs, in_specs = [h], [pl.BlockSpec((None, DHV), lambda bh: (bh, 0))]
    else:
        P = h.shape[1]
        inputs = [h, qn]
        in_specs = [pl.BlockSpec((None, P, DHV), lambda bh: (bh, 0, 0)), pl.BlockSpec((None, P), lambda bh: (bh, 0))]
    n_spec = pl.BlockSpec((None, None, DHQK), lambda bh: (layer, bh, 0))
    m_spec = pl.BlockSpec((None, None, 1), lambda bh: (layer, bh, 0))
    inputs += [m_new, n_new, qkv, weight, n, m]
    in_specs += [
        pl.BlockSpec((None, 1), lambda bh: (bh, 0)),
        pl.BlockSpec((None, DHQK), lambda bh: (bh, 0)),
        pl.BlockSpec((None, DHV), lambda bh: (bh // NH, o_offset // DHV + bh % NH)),
        pl.BlockSpec((DHV,), lambda bh: (bh % NH,)),
        n_spec,
        m_spec,
    ]
    return pl.pallas_call(
        functools.partial(_head_out_kernel, combine=qn is not None, eps=eps, norm_eps=norm_eps),
        out_shape=[
            jax.ShapeDtypeStruct((B, NH * DHV), qkv.dtype),
            jax.ShapeDtypeStruct(n.shape, n.dtype),
            jax.ShapeDtypeStruct(m.shape, m.dtype),
        ],
        grid=(BH,),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, DHV), lambda bh: (bh // NH, bh % NH)), n_spec, m_spec],
        input_output_aliases={len(inputs) - 2: 1, len(inputs) - 1: 2},
        compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="mlstm_head_out",
    )(*inputs)


# ---------------------------------------------------------------------------------------------------------
# pallas_call wrapper: grid, BlockSpecs, aliasing.
# ---------------------------------------------------------------------------------------------------------
def _fused_blocks_fit(fused: tuple, rows: int, block_dhv: int) -> bool:
    """Whether the kernel can read q, k, v in place from a fused projection (offsets on block boundaries)."""
    _, q_off, k_off, v_off = fused
    return q_off % rows == 0 and k_off % rows == 0 and v_off % block_dhv == 0


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
    fused: tuple | None = None,
    fused_gates: int | None = None,
    head_out: tuple | None = None,
):
    """Runs the kernel on layer ``layer`` of stacked, flattened states: c (L, BH, DHQK, DHV), n (L, BH, DHQK),
    m (L, BH, 1); and on q/k (BH, DHQK), v (BH, DHV), i/f (BH, 1).

    With ``fused = (NH, q_offset, k_offset, v_offset)``, q, k and v are one array, a model's fused projection
    (B, W): head h of batch element b reads its q at columns ``q_offset + h·DHQK`` onwards, and so on. The
    kernel then reads them in place, where slicing them out first would cost a copy kernel each. The offsets
    must be multiples of the blocks that read them (:func:`_fused_blocks_fit`). With ``fused_gates = NH``, i and
    f are one array (B·2·NH, 1), a model's gate projection (B, 2·NH) flattened: batch element b's i gates
    first, then its f gates; the kernel reads both in place. With ``head_out = (qkv, weight, norm_eps, NH,
    o_offset)`` the returned "h" is the layer's read-out (B, NH·DHV) of :func:`_head_out_call`, computed by a
    second kernel from the partial sums (instead of the XLA epilogue below), and n', m' are the whole stacks
    with the layer's slice updated (by that kernel).

    c is updated in place (aliased): a program prefetches only rows it has not yet written, and the update is
    elementwise on one tile, so loads and stores share its layout (no other program touches the tile; on the
    H200 the stepped c has always matched the XLA step's bit for bit, in every tiling benchmarked). n and m
    are written to fresh buffers for this layer only, (BH, DHQK) and (BH, 1): several programs read a head's
    n and m, and Triton spreads a vector over the warps of a program with copies in several warps, so even
    within one program a warp could overwrite an element that another warp has yet to read (seen on an
    H200: in-place n and m gave wrong h with one program per head).

    Returns:
        ``h (BH, DHV), c' (L, BH, DHQK, DHV), n' (BH, DHQK), m' (BH, 1)``.
    """
    _, BH, DHQK, DHV = c.shape
    block_dhv, splits, block_dhqk = config.splits(BH, DHQK, DHV)
    rows = DHQK // splits
    if config.grid_order == "tiles":
        # DHV blocks fastest, then DHQK splits, then heads: programs launched together cover contiguous memory.
        grid = (DHV // block_dhv, splits, BH)

        def idx(fn):
            return lambda vb, ks, bh: fn(bh, vb, ks)

        vb_axis, ks_axis = 0, 1
    else:  # "heads": heads fastest (programs launched together are a head's size apart in memory)
        grid = (BH, DHV // block_dhv, splits)

        def idx(fn):
            return fn

        vb_axis, ks_axis = 1, 2
    tile = pl.BlockSpec((None, None, rows, block_dhv), idx(lambda bh, vb, ks: (layer, bh, ks, vb)))
    n_spec = pl.BlockSpec((None, None, rows), idx(lambda bh, vb, ks: (layer, bh, ks)))
    m_spec = pl.BlockSpec((None, None, 1), idx(lambda bh, vb, ks: (layer, bh, 0)))
    rows_spec = pl.BlockSpec((None, rows), idx(lambda bh, vb, ks: (bh, ks)))
    cols_spec = pl.BlockSpec((None, block_dhv), idx(lambda bh, vb, ks: (bh, vb)))
    head_spec = pl.BlockSpec((None, 1), idx(lambda bh, vb, ks: (bh, 0)))
    q_spec = k_spec = rows_spec
    v_spec = cols_spec
    i_spec = f_spec = head_spec
    if fused_gates is not None:
        G = fused_gates  # head bh = b·NH + h reads row 2·NH·b + h (i) and 2·NH·b + NH + h (f)
        i_spec = pl.BlockSpec((None, 1), idx(lambda bh, vb, ks: (bh + (bh // G) * G, 0)))
        f_spec = pl.BlockSpec((None, 1), idx(lambda bh, vb, ks: (bh + (bh // G) * G + G, 0)))
    if fused is not None:
        NH, q_off, k_off, v_off = fused
        if not _fused_blocks_fit(fused, rows, block_dhv):
            raise ValueError(
                f"fused projection offsets {fused[1:]} are not multiples of the blocks ({rows}, {block_dhv})"
            )

        def fused_spec(size, offset, dh, axis):
            return pl.BlockSpec(
                (None, size),
                idx(lambda bh, vb, ks: (bh // NH, offset // size + (bh % NH) * (dh // size) + (vb, ks)[axis])),
            )

        q_spec, k_spec = fused_spec(rows, q_off, DHQK, 1), fused_spec(rows, k_off, DHQK, 1)
        v_spec = fused_spec(block_dhv, v_off, DHV, 0)
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
    kernel = functools.partial(
        _step_kernel,
        eps=eps,
        DHQK=DHQK,
        rows=rows,
        block_dhqk=block_dhqk,
        prefetch=config.prefetch,
        evict_first=config.evict_first,
        vb_axis=vb_axis,
        ks_axis=ks_axis,
    )
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
    if head_out is not None:  # n' and m' go into the stacks (returned in place of the layer's n' and m')
        qkv, weight, norm_eps, NH, o_offset = head_out
        qn = None if splits == 1 else outs[4]
        kw = {"NH": NH, "o_offset": o_offset, "eps": eps, "norm_eps": norm_eps, "interpret": interpret}
        y, n_stack, m_stack = _head_out_call(outs[3], qn, m_new, n_new, n, m, layer, qkv, weight, **kw)
        return y, c_new, n_stack, m_stack
    if splits == 1:
        return outs[3], c_new, n_new, m_new
    num, qn = outs[3].sum(axis=1), outs[4].sum(axis=1)  # exact combination of the DHQK splits
    h = normalize_readout(num, qn, m_new[:, 0], eps).astype(q.dtype)
    return h, c_new, n_new, m_new


# ---------------------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------------------
def _check_kernel_call(c, q, k, v, i, f, eps, config, interpret) -> tuple[str, StepKernelConfig]:
    """The checks shared by both entry points (after the shape checks); returns the mode and the config."""
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


def _flat_inputs(q, k, v, i, f):
    BH = q.shape[0] * q.shape[1]
    return q.reshape(BH, -1), k.reshape(BH, -1), v.reshape(BH, -1), i.reshape(BH, 1), f.reshape(BH, 1)


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
    mode, config = _check_kernel_call(c, q, k, v, i, f, eps, config, interpret)
    if mode == "xla":
        return recurrent_step_fw(c=c, n=n, m=m, q=q, k=k, v=v, i=i, f=f, eps=eps)
    B, NH, DHQK, DHV = c.shape
    BH = B * NH
    mosaic = _mosaic_tiling(config, mode, BH, DHQK, DHV)
    if mosaic is not None:
        q2, k2, v2, i2, f2 = _flat_inputs(q, k, v, i, f)
        h, c_new, n_new, m_new = mosaic_step(
            c.reshape(1, BH, DHQK, DHV), n.reshape(1, BH, DHQK), m.reshape(1, BH), q2, k2, v2, i2, f2,
            eps=float(eps), block_dhqk=mosaic[0], block_dhv=mosaic[1], depth=config.pipeline_depth,
        )  # fmt: skip
        return h.reshape(B, NH, DHV), (c_new.reshape(c.shape), n_new.reshape(n.shape), m_new.reshape(m.shape))
    h, c_new, n_new, m_new = _step_call(
        c.reshape(1, BH, DHQK, DHV),
        n.reshape(1, BH, DHQK),
        m.reshape(1, BH, 1),
        0,
        *_flat_inputs(q, k, v, i, f),
        eps=float(eps),
        config=config,
        interpret=mode == "interpret",
    )
    return h.reshape(B, NH, DHV), (c_new.reshape(c.shape), n_new.reshape(n.shape), m_new.reshape(m.shape))


def recurrent_step_pallas_stacked(
    c: jax.Array,  # (L, B, NH, DHQK, DHV) float32
    n: jax.Array,  # (L, B, NH, DHQK) float32
    m: jax.Array,  # (L, B, NH) float32
    layer: int,
    qkv: jax.Array,  # (B, W): columns [q (NH·DHQK) | k (NH·DHQK) | v (NH·DHV) | any others]
    i: jax.Array,  # (B, NH, 1) or (B, NH); with f None: (B, 2 NH)
    f: jax.Array | None,  # (B, NH, 1) or (B, NH)
    eps: float = 1e-6,
    *,
    config: StepKernelConfig | None = None,
    interpret: bool | None = None,
    head_norm: tuple[jax.Array, float] | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """The step of :func:`recurrent_step_pallas` as a model's decode step: on layer ``layer`` of states stacked
    over L layers, with q, k, v read from the layer's fused input projection.

    The kernel (Triton, or the Mosaic one where ``config.backend`` selects it, as for
    :func:`recurrent_step_pallas`) reads and writes the layer's slice of the stacked c in place (n and m,
    DHV times smaller, go through a slice update after the kernel: see ``_step_call``), so a donated stack is
    never copied; slicing the layer's c out and writing it back would copy it twice (4.2 MB per layer and
    token at batch 1 for xLSTM-7B). It reads q, k and v in place from ``qkv`` where their offsets fall on its
    block boundaries (always for xLSTM shapes), which saves a copy kernel for each.

    Args:
        c: Memory states of shape (L, B, NH, DHQK, DHV), float32; aliased to the returned stack.
        n: Normaliser states of shape (L, B, NH, DHQK), float32.
        m: Max states of shape (L, B, NH), float32.
        layer: Which layer to step, a Python int in [0, L) (compiled into the kernel's index maps).
        qkv: The fused projection (B, W), W >= NH·(2·DHQK + DHV): q, k, v of all heads side by side (head
            h's q at columns ``h·DHQK`` onwards, k after all of q, v after all of k); further columns (such as
            an output gate) are ignored. h is returned in its dtype.
        i, f, eps, config, interpret: As for :func:`recurrent_step_pallas`; or ``f=None`` and ``i`` both gates
            side by side (B, 2·NH), i then f (the layer's gate projection), which the kernel reads in place.
        head_norm: ``(weight (NH·DHV,), eps)``: return the mLSTM layer's read-out ``sigmoid(o) *
            (LayerNorm_head(h) * weight)`` (B, NH·DHV) in qkv's dtype in place of h, o being the NH·DHV columns
            of qkv after v (``xlstm_jax.mlstm.head_norm.head_norm_gate``). A second kernel computes it from the
            step's partial sums, one program per head, instead of XLA's epilogue, norm and gating kernels.

    Returns:
        ``h (B, NH, DHV)`` (with ``head_norm`` the read-out (B, NH·DHV)) and the stacks ``(c', n', m')`` with
        layer ``layer`` stepped, the others unchanged.

    Raises:
        ValueError: a shape does not match or layer is out of range; as :func:`recurrent_step_pallas`.
        TypeError: layer is not a Python int; as :func:`recurrent_step_pallas`.
        RuntimeError: ``interpret=False`` without a GPU.
    """
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise TypeError(f"layer must be a Python int (it is compiled into the kernel), got {layer!r}")
    check_stacked_states(c, n, m, layer)
    L, B, NH, DHQK, DHV = c.shape
    q, k, v = split_qkv(qkv, NH, DHQK, DHV, head_norm is not None)  # checks qkv (and o); free under jit
    gates = None
    if f is None:  # both gates in one array: split for the checks and the fallback; the kernel reads it in place
        gates = i
        i, f = split_gates(gates, B, NH)
    layer_states = (jax.ShapeDtypeStruct(c.shape[1:], c.dtype), jax.ShapeDtypeStruct(n.shape[1:], n.dtype))
    m_layer = jax.ShapeDtypeStruct((*m.shape[1:], 1), m.dtype)
    i, f = check_step_inputs(*layer_states, m_layer, q, k, v, i, f)
    mode, config = _check_kernel_call(c, q, k, v, i, f, eps, config, interpret)
    if mode == "xla":
        return recurrent_step_stacked_fw(c, n, m, layer, qkv, i, f, eps=eps, head_norm=head_norm)
    BH = B * NH
    mosaic = _mosaic_tiling(config, mode, BH, DHQK, DHV)
    if mosaic is not None:
        qkv_args, gate_args = (qkv, (q, k, v)), (i, f, gates)
        h, c_new, n_new, m_new = _stacked_mosaic(c, n, m, layer, qkv_args, gate_args, eps, config, mosaic, head_norm)
        return _stacked_outputs(h, c_new, n_new, m_new, c, n, m, layer, head_norm)
    block_dhv, splits, _ = config.splits(BH, DHQK, DHV)
    rows = DHQK // splits
    fused = (NH, 0, NH * DHQK, 2 * NH * DHQK)
    if _fused_blocks_fit(fused, rows, block_dhv):
        q_in = k_in = v_in = qkv
    else:
        fused = None
        q_in, k_in, v_in = q.reshape(BH, DHQK), k.reshape(BH, DHQK), v.reshape(BH, DHV)
    h, c_new, n_new, m_new = _step_call(
        c.reshape(L, BH, DHQK, DHV),
        n.reshape(L, BH, DHQK),
        m.reshape(L, BH, 1),
        layer,
        q_in,
        k_in,
        v_in,
        *((i.reshape(BH, 1), f.reshape(BH, 1)) if gates is None else (gates.reshape(2 * BH, 1),) * 2),
        eps=float(eps),
        config=config,
        interpret=mode == "interpret",
        fused=fused,
        fused_gates=None if gates is None else NH,
        head_out=None if head_norm is None else _head_out_args(qkv, head_norm, NH, DHQK, DHV),
    )
    return _stacked_outputs(h, c_new, n_new, m_new, c, n, m, layer, head_norm)


def _stacked_outputs(h, c_new, n_new, m_new, c, n, m, layer, head_norm):
    """The stacked step's return value from a kernel's: with ``head_norm``, the read-out and the stacks (the
    read-out kernel wrote n' and m' into them); else h and the layer's n', m' set into the stacks."""
    if head_norm is not None:
        return h, (c_new.reshape(c.shape), n_new.reshape(n.shape), m_new.reshape(m.shape))
    n_new = n.at[layer].set(n_new.reshape(n.shape[1:]))
    m_new = m.at[layer].set(m_new.reshape(m.shape[1:]))
    return h.reshape(*c.shape[1:3], -1), (c_new.reshape(c.shape), n_new, m_new)


def _stacked_mosaic(c, n, m, layer, qkv_args, gate_args, eps, config, tiling, head_norm):
    """The stacked step by the Mosaic kernel (``tiling = (block_dhqk, block_dhv)``), then (with ``head_norm``)
    the read-out kernel.

    With ``qkv_args = (qkv, (q, k, v))`` the kernel reads q, k and v in place from the fused projection
    ``qkv`` when its rows are 16-byte aligned (the TMA engine's rule; true of models' projections), else from
    the sliced q, k, v; with ``gate_args = (i, f, gates)`` it reads the gates in place, from the gate
    projection ``gates`` when there is one.

    Returns:
        As ``_step_call``: ``(h (BH, DHV) or the read-out, c' (the stack), n', m')``.
    """
    L, B, NH, DHQK, DHV = c.shape
    BH = B * NH
    qkv, qkv_split = qkv_args
    kw = {
        "eps": float(eps),
        "layer": layer,
        "block_dhqk": tiling[0],
        "block_dhv": tiling[1],
        "depth": config.pipeline_depth,
    }
    if qkv.shape[1] * qkv.dtype.itemsize % 16 == 0:
        sources = (qkv, qkv, qkv)
        kw |= {"qkv_heads": NH, "qkv_offsets": (0, NH * DHQK, 2 * NH * DHQK)}
    else:
        sources = tuple(x.reshape(BH, -1) for x in qkv_split)
    i, f, gates = gate_args
    if gates is None:
        sources += (i.reshape(BH, 1), f.reshape(BH, 1))
    else:
        sources += (gates, gates)
        kw |= {"gate_heads": NH, "gate_offsets": (0, NH)}
    states = (c.reshape(L, BH, DHQK, DHV), n.reshape(L, BH, DHQK), m.reshape(L, BH))
    h, c_new, n_new, m_new = mosaic_step(*states, *sources, **kw)
    if head_norm is None:
        return h, c_new, n_new, m_new
    qkv_o, weight, norm_eps, _, o_offset = _head_out_args(qkv, head_norm, NH, DHQK, DHV)
    y, n_stack, m_stack = _head_out_call(
        h, None, m_new.reshape(BH, 1), n_new, states[1], m.reshape(L, BH, 1), layer, qkv_o, weight,
        NH=NH, o_offset=o_offset, eps=float(eps), norm_eps=norm_eps, interpret=False,
    )  # fmt: skip
    return y, c_new, n_stack, m_stack


def _head_out_args(qkv, head_norm, NH, DHQK, DHV) -> tuple:
    """``_step_call``'s head_out: o read in place from qkv when its offset is a multiple of DHV, else sliced."""
    weight, norm_eps = head_norm
    if isinstance(norm_eps, jax.core.Tracer):
        raise TypeError("head_norm's eps must be a Python number (it is compiled into the kernel), got a tracer")
    if weight.shape != (NH * DHV,):
        raise ValueError(f"head_norm weight.shape={tuple(weight.shape)} must be (NH·DHV,)=({NH * DHV},)")
    offset = NH * (2 * DHQK + DHV)
    if offset % DHV:
        qkv, offset = qkv[:, offset : offset + NH * DHV], 0
    return qkv, weight, float(norm_eps), NH, offset
