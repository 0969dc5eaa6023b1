"""The mLSTM recurrent form over a whole sequence as one fused Pallas kernel.

Each program owns one head and one block of DHV columns. It keeps its (DHQK, block_dhv) float32 tile of c,
and n and m, on chip for all S time steps, reads q, k, v, i, f once and writes h once (plus, optionally,
the last states).

The recurrence advances ``chunk_size`` steps at a time (:class:`~xlstm_jax.kernels.config.SequenceKernelConfig`).
For a block of L steps the recurrent steps have a closed form (:mod:`xlstm_jax.mlstm.parallel`): the h of
the block from the states before it (:func:`~xlstm_jax.mlstm.parallel.block_readout`), and the states after
it (:func:`~xlstm_jax.mlstm.parallel.block_update`, whose product accumulates into the state tile). The
kernel applies those same functions to one head's (L, ·) blocks, so the work per step becomes matrix
products on the tensor cores instead of a serial chain of vector operations, and the running max ``m`` is
the recurrent one. The ``S % chunk_size`` steps left at the end, and every step with ``chunk_size=1``, run
as literal recurrent steps (:func:`xlstm_jax.mlstm.stabilizer.step_gates`). Forget gates that empty the state,
non-finite keys or values and document starts of packed rows (``segment_ids``; a start inside a block is
exact, :mod:`xlstm_jax.mlstm.segments`) are handled by those same block functions, as in the XLA forms.

Precision: the state, the gates and the stabiliser are float32 whatever the input dtype, and h is stored in
q's dtype. The matrix products follow the chunkwise form's rule (:func:`~xlstm_jax.mlstm.parallel.matmul_dtype`):
float32 inputs give float32 products (no TF32); bfloat16/float16 inputs give products with operands in that
dtype, accumulated in float32, which rounds the gate-weighted scores and the state to it where they enter a
product (the ``bfloat16/float32`` entry of ``tests/numerics.py`` accounts for this).

Gradients: :func:`recurrent_sequence_pallas` has a ``custom_vjp``. Its backward recomputes the forward with
the XLA chunkwise form (:func:`xlstm_jax.mlstm.chunkwise.chunkwise_fw`, the same function) and
differentiates that. There is no backward kernel.

On Hopper (``backend="auto"``) the same algorithm runs as the Mosaic GPU chunkwise kernel
(:func:`xlstm_jax.kernels.chunkwise_mosaic.chunkwise_mosaic_fw`: each program keeps its float32 tile of c on chip
for the whole sequence and advances it 64 steps at a time on the WGMMA units, fed by TMA copies) wherever that
kernel covers the call: bf16 or f16 inputs, DHQK a multiple of 64, no Triton tiling (``config``) given. It
differentiates through its own Mosaic GPU backward kernels. The Triton kernel stays the path for other GPUs, for
float32 inputs and for the head sizes only it covers.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from xlstm_jax.kernels.chunkwise_mosaic import (
    auto_depth,
    auto_scores,
    chunkwise_mosaic_fw,
    chunkwise_mosaic_unsupported,
)
from xlstm_jax.kernels.config import (
    STEP_BACKENDS,
    SequenceKernelConfig,
    check_head_dims,
    check_kernel_dtypes,
    kernel_mode,
)
from xlstm_jax.kernels.mosaic import use_mosaic
from xlstm_jax.mlstm.checks import check_eps, check_sequence_inputs, resolve_state_dtype
from xlstm_jax.mlstm.chunkwise import chunkwise_fw
from xlstm_jax.mlstm.parallel import block_readout, block_update, matmul_dtype
from xlstm_jax.mlstm.recurrent import recurrent_sequence_segments_fw
from xlstm_jax.mlstm.segments import break_gates, check_segment_ids, document_starts, segment_max_bound
from xlstm_jax.mlstm.stabilizer import (
    forget_gate_resets,
    log_forget_gate_masked,
    max_bound,
    normalize_readout,
    step_gates,
)
from xlstm_jax.mlstm.states import cast_states, prepare_states

__all__ = ["recurrent_sequence_pallas"]


# ---------------------------------------------------------------------------------------------------------
# Kernel body: one program = one head (bh), one DHV block (vb); a loop over time inside.
# ---------------------------------------------------------------------------------------------------------
def _last(x: jax.Array) -> jax.Array:
    """``x[-1]`` of a 1-D array, as a masked sum (Triton has no element extraction); exact."""
    idx = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(jnp.where(idx == x.shape[0] - 1, x, 0.0))


def _sequence_kernel(
    q_ref,  # (S, DHQK)
    k_ref,  # (S, DHQK)
    v_ref,  # (S, BV)
    i_ref,  # (S,)
    f_ref,  # (S,)
    *refs,  # [starts (S,)], [c0 (DHQK, BV), n0 (DHQK,), m0 (1,)], h (S, BV), [c_last (DHQK, BV), n_last, m_last]
    eps: float,
    S: int,
    chunk: int,
    has_segments: bool,
    has_initial: bool,
    return_last_states: bool,
):
    f32 = jnp.float32
    if has_segments:
        starts_ref, *refs = refs
    if has_initial:
        c0_ref, n0_ref, m0_ref, *refs = refs
    h_ref, *last_refs = refs
    DHQK, BV = q_ref.shape[1], h_ref.shape[1]
    operand_dtype = matmul_dtype(jnp.result_type(q_ref.dtype, k_ref.dtype, v_ref.dtype), f32)

    if has_initial:
        state = (c0_ref[...].astype(f32), n0_ref[...].astype(f32), m0_ref[0].astype(f32))
    else:
        state = (jnp.zeros((DHQK, BV), f32), jnp.zeros((DHQK,), f32), jnp.zeros((), f32))

    def block(j, carry):  # steps [j L, (j + 1) L) in closed form
        c, n, m = carry
        t = pl.ds(pl.multiple_of(j * chunk, chunk), chunk)
        q, k, v = q_ref[t, :], k_ref[t, :], v_ref[t, :]
        i, f = i_ref[t].astype(f32), f_ref[t].astype(f32)
        # The resets, bounding the running max by m before the block and the block's input gates: a tighter
        # bound than the XLA forms' (whole sequence), equally exact, and no load of a (S,) block, whose size
        # need not be a power of two. A document that starts in the block starts from m = 0.
        bound = max_bound(m, i)
        if has_segments:
            resets = forget_gate_resets(f, i, segment_max_bound(bound))
            log_f = log_forget_gate_masked(f, resets)
            breaks, log_start = break_gates(log_f, resets, starts_ref[t])
        else:
            resets = forget_gate_resets(f, i, bound)
            log_f = log_forget_gate_masked(f, resets)
            breaks, log_start = resets.astype(f32), None
        F = jnp.cumsum(log_f)
        R = jnp.cumsum(breaks)
        h = block_readout(q, k, v, F, i, c, n, m, eps, operand_dtype, R=R, log_start=log_start)
        h_ref[t, :] = h.astype(h_ref.dtype)
        return block_update(c, n, m, k, v, F, _last(F), i, operand_dtype, R=R, R_L=_last(R), log_start=log_start)

    def step(t, carry):  # one recurrent step
        c, n, m = carry
        if has_segments:  # a document start: zero states (a select, as segments.reset_states)
            keep = starts_ref[t] == 0.0
            c, n, m = jnp.where(keep, c, 0.0), jnp.where(keep, n, 0.0), jnp.where(keep, m, 0.0)
        q, k, v = (r[t, :].astype(f32) for r in (q_ref, k_ref, v_ref))
        m, f_act, i_act = step_gates(m, i_ref[t].astype(f32), f_ref[t].astype(f32))
        kk = i_act * k
        c = f_act * c + kk[:, None] * v[None, :]
        n = f_act * n + kk
        q_hat = q * (1.0 / math.sqrt(DHQK))  # exactly q / sqrt(DHQK) for DHQK = 16, 64, 256
        num = jnp.sum(q_hat[:, None] * c, axis=0)  # (BV,)
        h_ref[t, :] = normalize_readout(num, jnp.sum(q_hat * n), m, eps).astype(h_ref.dtype)
        return c, n, m

    num_blocks = S // chunk if chunk > 1 else 0
    if num_blocks:  # (a block larger than S could not even be traced)
        state = jax.lax.fori_loop(0, num_blocks, block, state)
    if num_blocks * chunk < S:
        state = jax.lax.fori_loop(num_blocks * chunk, S, step, state)
    c, n, m = state

    if return_last_states:
        c_last_ref, n_last_ref, m_last_ref = last_refs
        c_last_ref[...] = c

        @pl.when(pl.program_id(1) == 0)
        def _():
            n_last_ref[...] = n
            m_last_ref[0] = m


# ---------------------------------------------------------------------------------------------------------
# pallas_call wrapper: grid and BlockSpecs.
# ---------------------------------------------------------------------------------------------------------
def _sequence_call(
    q,
    k,
    v,
    i,
    f,
    starts,
    c0,
    n0,
    m0,
    *,
    NH: int,
    eps: float,
    config: SequenceKernelConfig,
    interpret: bool,
    return_last_states: bool,
):
    """Runs the kernel on flattened heads.

    Args:
        q, k: (BH, S, DHQK); v: (BH, S, DHV); i, f: (BH, S); starts: (B, S) float32, 1.0 at document starts,
            or None (one document per row; head bh reads row bh // NH); c0 (BH, DHQK, DHV), n0 (BH, DHQK),
            m0 (BH, 1) float32, or all None (zero initial states).
        NH: Heads per batch row.

    Returns:
        ``h (BH, S, DHV)`` in q's dtype, then, with ``return_last_states``, ``c (BH, DHQK, DHV), n (BH, DHQK),
        m (BH, 1)`` in float32.
    """
    BH, S, DHQK = q.shape
    DHV = v.shape[2]
    block_dhv = min(config.block_dhv, DHV)
    grid = (BH, DHV // block_dhv)
    seq_qk = pl.BlockSpec((None, S, DHQK), lambda bh, vb: (bh, 0, 0))
    seq_v = pl.BlockSpec((None, S, block_dhv), lambda bh, vb: (bh, 0, vb))
    seq_gate = pl.BlockSpec((None, S), lambda bh, vb: (bh, 0))
    tile = pl.BlockSpec((None, DHQK, block_dhv), lambda bh, vb: (bh, 0, vb))
    rows = pl.BlockSpec((None, DHQK), lambda bh, vb: (bh, 0))
    head = pl.BlockSpec((None, 1), lambda bh, vb: (bh, 0))
    has_initial = c0 is not None
    has_segments = starts is not None
    args = [q, k, v, i, f]
    in_specs = [seq_qk, seq_qk, seq_v, seq_gate, seq_gate]
    if has_segments:
        args.append(starts)
        in_specs.append(pl.BlockSpec((None, S), lambda bh, vb: (bh // NH, 0)))
    if has_initial:
        args += [c0, n0, m0]
        in_specs += [tile, rows, head]
    out_shape = [jax.ShapeDtypeStruct((BH, S, DHV), q.dtype)]
    out_specs = [seq_v]
    if return_last_states:
        f32 = jnp.float32
        out_shape += [
            jax.ShapeDtypeStruct((BH, DHQK, DHV), f32),
            jax.ShapeDtypeStruct((BH, DHQK), f32),
            jax.ShapeDtypeStruct((BH, 1), f32),
        ]
        out_specs += [tile, rows, head]
    kernel = functools.partial(
        _sequence_kernel,
        eps=eps,
        S=S,
        has_segments=has_segments,
        has_initial=has_initial,
        return_last_states=return_last_states,
        chunk=config.chunk_size,
    )
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="mlstm_recurrent_sequence",
    )(*args)


# ---------------------------------------------------------------------------------------------------------
# Public function, its custom_vjp and the rules.
# ---------------------------------------------------------------------------------------------------------
_F32 = jnp.dtype(jnp.float32)


def recurrent_sequence_pallas(
    queries: jax.Array,  # (B, NH, S, DHQK)
    keys: jax.Array,  # (B, NH, S, DHQK)
    values: jax.Array,  # (B, NH, S, DHV)
    igate_preact: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    fgate_preact: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    c_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    n_initial: jax.Array | None = None,  # (B, NH, DHQK)
    m_initial: jax.Array | None = None,  # (B, NH)
    return_last_states: bool = False,
    eps: float = 1e-6,
    state_dtype: Any = None,
    *,
    config: SequenceKernelConfig | None = None,
    interpret: bool | None = None,
    segment_ids: jax.Array | None = None,  # (B, S) int
    backend: str = "auto",
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """The mLSTM recurrent form on a full sequence in one fused Pallas kernel, with float32 states.

    Same function and arguments as :func:`xlstm_jax.mlstm.recurrent.recurrent_sequence_segments_fw` (without
    ``use_scan``/``mlstm_step_fn``), except that the state is always float32.

    Args:
        queries: (B, NH, S, DHQK), float32, bfloat16 or float16. h is returned in this dtype.
        keys: (B, NH, S, DHQK).
        values: (B, NH, S, DHV).
        igate_preact: (B, NH, S) or (B, NH, S, 1); normalised to (B, NH, S, 1) on entry.
        fgate_preact: (B, NH, S) or (B, NH, S, 1).
        c_initial: (B, NH, DHQK, DHV) or None (zeros). The three initial states come together or not at all;
            they are cast to float32 on entry.
        n_initial: (B, NH, DHQK) or None.
        m_initial: (B, NH) or None.
        return_last_states: Also return the last states, in the dtypes of the initial states (float32
            without initial states).
        eps: Added to the normaliser after the max; a Python number (it is compiled into the kernel).
        state_dtype: None or ``"float32"``: the kernel's state is float32.
        config: Tiling; None for ``SequenceKernelConfig.get_default(DHQK, DHV)``.
        interpret: None: the compiled kernel on a GPU, ``recurrent_sequence_segments_fw`` (float32 states,
            ``use_scan=True``) elsewhere. True: Pallas interpret mode. False: the compiled kernel (raises
            without a GPU).
        segment_ids: Optional (B, S) integer document ids: position t > 0 whose id differs from position t - 1
            starts a document from zero states (c, n and m), also inside a block of steps; only the row's first
            document starts from the initial states (:mod:`xlstm_jax.mlstm.segments`). None: one document per
            row. The last states are those of the row's last document.
        backend: Which kernel (module docstring): ``"auto"``, the Mosaic GPU chunkwise kernel compiled on a GPU
            of compute capability 9.0 or newer where it covers the call and no ``config`` is given, the Triton
            kernel otherwise (also in interpret mode); ``"triton"``; ``"mosaic"`` (compiled on Hopper, or in
            Mosaic GPU's interpreter with ``interpret=True``; an error where it does not apply). In the Mosaic
            kernel a NaN or inf in k or v makes h non-finite for its whole chunk of 64 steps.

    Returns:
        h (B, NH, S, DHV) in queries' dtype, or ``(h, (c_last, n_last, m_last))`` with shapes
        (B, NH, DHQK, DHV), (B, NH, DHQK), (B, NH) if ``return_last_states``.

    Raises:
        ValueError: an unknown backend, or one that cannot run the call; a shape does not match, initial states
            are given partly, DHQK or DHV is not a kernel size
            (``xlstm_jax.kernels.config.kernel_supports_head_dims``; raised on every platform, also where
            ``interpret=None`` would run the XLA form), eps is not positive and finite, or state_dtype is not
            None or float32, or segment_ids is not (B, S).
        TypeError: an input is not float32/bfloat16/float16, eps is traced, or segment_ids is not integer.
        RuntimeError: ``interpret=False`` without a GPU; ``backend="mosaic"`` compiled on a GPU older than Hopper.

    Example:
        >>> h, (c, n, m) = recurrent_sequence_pallas(q, k, v, i, f, return_last_states=True)
    """
    dims, i, f = check_sequence_inputs(queries, keys, values, igate_preact, fgate_preact)
    check_eps(eps)
    if backend not in STEP_BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {STEP_BACKENDS}")
    if isinstance(eps, jax.core.Tracer):
        raise TypeError("eps must be a Python number for the Pallas sequence kernel (it is compiled in), got a tracer")
    resolved = resolve_state_dtype(state_dtype)
    if resolved not in (None, _F32):
        raise ValueError(f"the Pallas sequence kernel keeps its states in float32; got state_dtype={state_dtype!r}")
    check_kernel_dtypes(queries=queries, keys=keys, values=values, igate_preact=i, fgate_preact=f)
    check_head_dims(dims.DHQK, dims.DHV)
    segment_ids = check_segment_ids(segment_ids, dims.B, dims.S)
    mode = kernel_mode(interpret)
    (c0, n0, m0), out_dtypes = prepare_states(c_initial, n_initial, m_initial, dims, _F32, default_dtype=_F32)
    has_initial = c_initial is not None
    if mode == "xla":
        out = recurrent_sequence_segments_fw(
            queries, keys, values, i, f,
            c0 if has_initial else None, n0 if has_initial else None, m0 if has_initial else None,
            return_last_states=return_last_states, eps=eps, state_dtype=_F32, use_scan=True,
            segment_ids=segment_ids,
        )  # fmt: skip
    elif use_mosaic("recurrent_sequence_pallas", backend, mode, _mosaic_unsupported(dims, queries.dtype, config)):
        states = (c0, n0, m0) if has_initial else (None, None, None)
        out = chunkwise_mosaic_fw(
            queries, keys, values, i[..., 0], f[..., 0], *states, return_last_states=return_last_states, eps=eps,
            state_dtype=_F32, segment_ids=segment_ids, interpret=mode == "interpret",
        )  # fmt: skip
    else:
        if config is None:
            config = SequenceKernelConfig.get_default(dims.DHQK, dims.DHV)
        elif not isinstance(config, SequenceKernelConfig):
            raise TypeError(f"config must be a SequenceKernelConfig or None, got {type(config).__name__}")
        initial = (c0, n0, m0) if has_initial else None
        starts = None if segment_ids is None else document_starts(segment_ids).astype(_F32)
        out = _sequence(
            queries, keys, values, i, f, initial, starts, float(eps), bool(return_last_states), config,
            mode == "interpret",
        )  # fmt: skip
    if not return_last_states:
        return out
    h, states = out
    return h, cast_states(states, out_dtypes)


def _mosaic_unsupported(dims: Any, dtype: Any, config: SequenceKernelConfig | None) -> str | None:
    """Why the Mosaic GPU chunkwise kernel does not run this call in place of the Triton kernel, or None."""
    if config is not None:
        return "config is a tiling of the Triton kernel"
    scores = auto_scores(dims.S)  # the scores and depth its call picks (chunkwise_mosaic_fw's defaults)
    depth = auto_depth(dims.DHQK, dims.DHV, dtype, 32, scores=scores)
    return chunkwise_mosaic_unsupported(dims.DHQK, dims.DHV, dtype, 32, depth=depth, scores=scores)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _sequence(q, k, v, i, f, initial, starts, eps, return_last_states, config, interpret):
    """The kernel on (B, NH, ...) arrays; gates (B, NH, S, 1); ``initial`` float32 ``(c0, n0, m0)`` or None;
    ``starts`` (B, S) float32, 1.0 at document starts, or None."""
    B, NH, S, DHQK = q.shape
    DHV = v.shape[3]
    BH = B * NH
    flat = [q.reshape(BH, S, DHQK), k.reshape(BH, S, DHQK), v.reshape(BH, S, DHV), i.reshape(BH, S), f.reshape(BH, S)]
    flat.append(starts)
    if initial is None:
        flat += [None, None, None]
    else:
        c0, n0, m0 = initial
        flat += [c0.reshape(BH, DHQK, DHV), n0.reshape(BH, DHQK), m0.reshape(BH, 1)]
    outs = _sequence_call(
        *flat, NH=NH, eps=eps, config=config, interpret=interpret, return_last_states=return_last_states
    )
    h = outs[0].reshape(B, NH, S, DHV)
    if not return_last_states:
        return h
    c, n, m = outs[1:]
    return h, (c.reshape(B, NH, DHQK, DHV), n.reshape(B, NH, DHQK), m.reshape(B, NH))


def _sequence_fwd(q, k, v, i, f, initial, starts, eps, return_last_states, config, interpret):
    out = _sequence(q, k, v, i, f, initial, starts, eps, return_last_states, config, interpret)
    return out, (q, k, v, i, f, initial, starts)


def _sequence_bwd(eps, return_last_states, config, interpret, residuals, cotangent):
    # Recompute with the XLA chunkwise form (the same function, float32 states as the kernel) and differentiate
    # that: O(S) memory, matrix products, no loop over single steps.
    q, k, v, i, f, initial, starts = residuals
    # Document ids with the same starts: each start opens the next id.
    segment_ids = None if starts is None else jnp.cumsum(starts.astype(jnp.int32), axis=-1)

    def xla_forward(q, k, v, i, f, initial):
        c0, n0, m0 = (None, None, None) if initial is None else initial
        return chunkwise_fw(
            q, k, v, i, f, c0, n0, m0, return_last_states=return_last_states, eps=eps, state_dtype=_F32,
            segment_ids=segment_ids,
        )  # fmt: skip

    _, vjp = jax.vjp(xla_forward, q, k, v, i, f, initial)
    starts_cotangent = None if starts is None else jnp.zeros_like(starts)  # document starts are not differentiable
    return (*vjp(cotangent), starts_cotangent)


_sequence.defvjp(_sequence_fwd, _sequence_bwd)
