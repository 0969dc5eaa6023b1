"""The mLSTM decode step as one fused Pallas kernel.

One launch reads the state c, n, m once, updates it and computes h in the same pass (the equations of
:func:`xlstm_jax.mlstm.recurrent.recurrent_step_fw`). c is aliased input to output
(``input_output_aliases``), so under ``jax.jit`` with the state donated it is updated in place.

Tiling (:class:`~xlstm_jax.kernels.config.StepKernelConfig`): the grid is (B·NH, DHV / block_dhv,
dhqk_splits). A program owns the rows of one DHQK split and one block of DHV columns of c. With one split,
it divides by the normaliser itself and writes h. With several (small B·NH, to fill the GPU), each program
writes its partial numerator ``Σ_d q̂_d c'_{d,:}`` and partial ``Σ_d q̂_d n'_d``; a small XLA epilogue sums
the partials and divides. This is exact up to rounding because both are sums over DHQK.

Precision: the state is float32; q, k, v and the gates are upcast to float32 on chip, the read-out runs in
float32 and only h is cast to q's dtype, as in the XLA step.

n and m are written to fresh buffers rather than in place: every DHV block of a head reads them, and a
program that overwrote them could run before another that still has to read them. They are DHV + 1 times
smaller than c.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from xlstm_jax.kernels.config import StepKernelConfig, check_head_dims, check_kernel_dtypes, kernel_mode
from xlstm_jax.mlstm.checks import check_eps, check_step_inputs
from xlstm_jax.mlstm.recurrent import recurrent_step_fw
from xlstm_jax.mlstm.stabilizer import normalize_readout, step_gates

__all__ = ["recurrent_step_pallas"]


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
    n_out_ref,  # (ROWS,) float32
    m_out_ref,  # (1,) float32
    h_ref,  # (BV,) in q's dtype with one split; else the partial numerator (BV,) float32
    qn_ref,  # None with one split; else the partial q̂·n' (1,) float32
    *,
    eps: float,
    DHQK: int,
    rows: int,
    block_dhqk: int,
):
    vb, ks = pl.program_id(1), pl.program_id(2)
    f32 = jnp.float32
    m_new, f_act, i_act = step_gates(m_ref[0], i_ref[0].astype(f32), f_ref[0].astype(f32))
    v = v_ref[...].astype(f32)
    sqrt_dhqk = math.sqrt(DHQK)

    def body(j, carry):
        num, qn = carry
        r = pl.ds(pl.multiple_of(j * block_dhqk, block_dhqk), block_dhqk)
        q_hat = q_ref[r].astype(f32) / sqrt_dhqk
        k = k_ref[r].astype(f32)
        c = f_act * c_ref[r, :] + (i_act * k)[:, None] * v[None, :]
        c_out_ref[r, :] = c
        n = f_act * n_ref[r] + i_act * k

        @pl.when(vb == 0)
        def _():
            n_out_ref[r] = n

        return num + jnp.sum(q_hat[:, None] * c, axis=0), qn + jnp.sum(q_hat * n)

    init = (jnp.zeros(v.shape, f32), jnp.zeros((), f32))
    num, qn = jax.lax.fori_loop(0, rows // block_dhqk, body, init)

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
def _step_call(c, n, m, q, k, v, i, f, *, eps: float, config: StepKernelConfig, interpret: bool):
    """Runs the kernel on flattened heads: c (BH, DHQK, DHV), n/q/k (BH, DHQK), v (BH, DHV), m/i/f (BH, 1).

    Returns:
        ``h (BH, DHV), c' (BH, DHQK, DHV), n' (BH, DHQK), m' (BH, 1)``.
    """
    BH, DHQK, DHV = c.shape
    block_dhv, splits, block_dhqk = config.splits(BH, DHQK, DHV)
    rows = DHQK // splits
    grid = (BH, DHV // block_dhv, splits)
    tile = pl.BlockSpec((None, rows, block_dhv), lambda bh, vb, ks: (bh, ks, vb))
    rows_spec = pl.BlockSpec((None, rows), lambda bh, vb, ks: (bh, ks))
    cols_spec = pl.BlockSpec((None, block_dhv), lambda bh, vb, ks: (bh, vb))
    head_spec = pl.BlockSpec((None, 1), lambda bh, vb, ks: (bh, 0))
    f32 = jnp.float32
    out_shape = [
        jax.ShapeDtypeStruct(c.shape, f32),
        jax.ShapeDtypeStruct(n.shape, f32),
        jax.ShapeDtypeStruct(m.shape, f32),
    ]
    out_specs = [tile, rows_spec, head_spec]
    if splits == 1:
        out_shape.append(jax.ShapeDtypeStruct((BH, DHV), q.dtype))
        out_specs.append(cols_spec)
    else:
        out_shape += [jax.ShapeDtypeStruct((BH, splits, DHV), f32), jax.ShapeDtypeStruct((BH, splits), f32)]
        out_specs += [
            pl.BlockSpec((None, None, block_dhv), lambda bh, vb, ks: (bh, ks, vb)),
            pl.BlockSpec((None, 1), lambda bh, vb, ks: (bh, ks)),
        ]
    kernel = functools.partial(_step_kernel, eps=eps, DHQK=DHQK, rows=rows, block_dhqk=block_dhqk)
    if splits == 1:
        kernel = functools.partial(kernel, qn_ref=None)
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=[tile, rows_spec, head_spec, rows_spec, rows_spec, cols_spec, head_spec, head_spec],
        out_specs=out_specs,
        input_output_aliases={0: 0},
        compiler_params=pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="mlstm_recurrent_step",
    )(c, n, m, q, k, v, i, f)
    c_new, n_new, m_new = outs[:3]
    if splits == 1:
        return outs[3], c_new, n_new, m_new
    num, qn = outs[3].sum(axis=1), outs[4].sum(axis=1)  # exact combination of the DHQK splits
    h = normalize_readout(num, qn, m_new[:, 0], eps).astype(q.dtype)
    return h, c_new, n_new, m_new


# ---------------------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------------------
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
        config: Tiling; None for ``StepKernelConfig.get_default(DHQK, DHV)``.
        interpret: None: the compiled kernel on a GPU, ``recurrent_step_fw`` elsewhere. True: Pallas
            interpret mode. False: the compiled kernel (raises without a GPU).

    Returns:
        ``h (B, NH, DHV)`` in q's dtype and ``(c', n', m')`` with the shapes of (c, n, m), float32.

    Raises:
        ValueError: a shape does not match, DHQK or DHV is not a supported power of two, or eps is not a
            positive finite number.
        TypeError: the states are not float32, an input is not float32/bfloat16/float16, or eps is traced.
        RuntimeError: ``interpret=False`` without a GPU.

    Example:
        >>> step = functools.partial(recurrent_step_pallas, interpret=True)
        >>> h = recurrent_sequence_fw(q, k, v, i, f, mlstm_step_fn=step, state_dtype="float32")
    """
    i, f = check_step_inputs(c, n, m, q, k, v, i, f)
    check_eps(eps)
    if isinstance(eps, jax.core.Tracer):
        raise TypeError("eps must be a Python number for the Pallas step kernel (it is compiled in), got a tracer")
    if c.dtype != jnp.float32:
        raise TypeError(f"the Pallas step kernel keeps its states in float32, got {c.dtype=}")
    check_kernel_dtypes(q=q, k=k, v=v, i=i, f=f)
    B, NH, DHQK, DHV = c.shape
    check_head_dims(DHQK, DHV)
    mode = kernel_mode(interpret)
    if mode == "xla":
        return recurrent_step_fw(c=c, n=n, m=m, q=q, k=k, v=v, i=i, f=f, eps=eps)
    if config is None:
        config = StepKernelConfig.get_default(DHQK, DHV)
    elif not isinstance(config, StepKernelConfig):
        raise TypeError(f"config must be a StepKernelConfig or None, got {type(config).__name__}")
    BH = B * NH
    h, c_new, n_new, m_new = _step_call(
        c.reshape(BH, DHQK, DHV),
        n.reshape(BH, DHQK),
        m.reshape(BH, 1),
        q.reshape(BH, DHQK),
        k.reshape(BH, DHQK),
        v.reshape(BH, DHV),
        i.reshape(BH, 1),
        f.reshape(BH, 1),
        eps=float(eps),
        config=config,
        interpret=mode == "interpret",
    )
    return h.reshape(B, NH, DHV), (c_new.reshape(c.shape), n_new.reshape(n.shape), m_new.reshape(m.shape))
