"""The mLSTM recurrent form over a whole sequence as one fused Pallas kernel.

Each program owns one head and one block of DHV columns. It keeps its (DHQK, block_dhv) float32 tile of c,
and n and m, on chip for all S time steps, reads q, k, v, i, f once and writes h once (plus, optionally,
the last states). The inputs of step t+1 are loaded while step t computes, so the load latency is off the
serial path. The math per step is that of :func:`xlstm_jax.mlstm.recurrent.recurrent_step_fw`, with the
stabiliser from :mod:`xlstm_jax.mlstm.stabilizer`.

Precision: the state is float32 whatever the input dtype; q, k, v and the gates are upcast on chip, the
read-out and division run in float32, and h is stored in q's dtype.

Gradients: :func:`recurrent_sequence_pallas` has a ``custom_vjp``. Its backward recomputes the forward with
the XLA recurrent form (``recurrent_sequence_fw(use_scan=True)``) and differentiates that: correct, but as
slow and memory-hungry as the XLA path (it stores every step's state). There is no backward kernel yet.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from xlstm_jax.kernels.config import SequenceKernelConfig, check_head_dims, check_kernel_dtypes, kernel_mode
from xlstm_jax.mlstm.checks import check_eps, check_sequence_inputs, resolve_state_dtype
from xlstm_jax.mlstm.recurrent import recurrent_sequence_fw
from xlstm_jax.mlstm.stabilizer import normalize_readout, step_gates
from xlstm_jax.mlstm.states import cast_states, prepare_states

__all__ = ["recurrent_sequence_pallas"]

_FOLD_BELOW = 2.0**-40  # lazy_forget: fold the scalar forget product into the tile below this


# ---------------------------------------------------------------------------------------------------------
# Kernel body: one program = one head (bh), one DHV block (vb); a loop over time inside.
# ---------------------------------------------------------------------------------------------------------
def _sequence_kernel(
    q_ref,  # (S, DHQK)
    k_ref,  # (S, DHQK)
    v_ref,  # (S, BV)
    i_ref,  # (S,)
    f_ref,  # (S,)
    *refs,  # [c0 (DHQK, BV), n0 (DHQK,), m0 (1,)], h (S, BV), [c_last (DHQK, BV), n_last (DHQK,), m_last (1,)]
    eps: float,
    S: int,
    has_initial: bool,
    return_last_states: bool,
    lazy_forget: bool,
    prefetch: bool,
    unroll: int,
):
    f32 = jnp.float32
    if has_initial:
        c0_ref, n0_ref, m0_ref, *refs = refs
    h_ref, *last_refs = refs
    DHQK, BV = q_ref.shape[1], h_ref.shape[1]
    # 1/sqrt(DHQK) is a power of two for DHQK = 16, 64, 256, so q * scale is then exactly q / sqrt(DHQK).
    scale = 1.0 / math.sqrt(DHQK)

    one = jnp.ones((), f32)
    if has_initial:
        state = (c0_ref[...].astype(f32), n0_ref[...].astype(f32), m0_ref[0].astype(f32), one)
    else:
        state = (jnp.zeros((DHQK, BV), f32), jnp.zeros((DHQK,), f32), jnp.zeros((), f32), one)

    def load(t):
        return q_ref[t, :], k_ref[t, :], v_ref[t, :], i_ref[t], f_ref[t]

    def body(t, carry):
        c, n, m, p, *x = carry  # with lazy_forget the states are p·c and p·n, p a scalar; else p = 1
        if prefetch:  # load step t+1 now, so that it is in flight while step t computes
            x, x_next = x, list(load(jnp.minimum(t + 1, S - 1)))
        else:  # load step t here (Triton's pipeliner may stage it with num_stages > 1)
            x, x_next = load(t), []
        q, k, v, i, f = (a.astype(f32) for a in x)
        m, f_act, i_act = step_gates(m, i, f)
        q_hat = q * scale
        if lazy_forget:
            # c' = f'c + i'kvᵀ = p'(c̃ + (i'/p') kvᵀ) with p' = p f': one FMA per element instead of a
            # multiply and an FMA. p' is folded into the tile only when it gets small, before 1/p' could
            # overflow (at least one of f', i' is 1, so a tiny p' means the new term dominates).
            p = p * f_act
            c, n, p = jax.lax.cond(
                p < _FOLD_BELOW, lambda c, n, p: (c * p, n * p, one), lambda c, n, p: (c, n, p), c, n, p
            )
            kk = (i_act / p) * k
            c = c + kk[:, None] * v[None, :]
            n = n + kk
        else:
            kk = i_act * k
            c = f_act * c + kk[:, None] * v[None, :]
            n = f_act * n + kk
        num = jnp.sum(q_hat[:, None] * c, axis=0)  # (BV,)
        qn = jnp.sum(q_hat * n)
        if lazy_forget:
            num, qn = p * num, p * qn
        h_ref[t, :] = normalize_readout(num, qn, m, eps).astype(h_ref.dtype)
        return c, n, m, p, *x_next

    def steps(j, carry):  # `unroll` steps in straight-line code (the Triton lowering has no scan unroll)
        for u in range(unroll):
            carry = body(j * unroll + u, carry)
        return carry

    carry = (*state, *load(0)) if prefetch else state
    carry = jax.lax.fori_loop(0, S // unroll, steps, carry)
    c, n, m, p, *_ = jax.lax.fori_loop(S // unroll * unroll, S, body, carry)  # the remaining S % unroll steps

    if return_last_states:
        c_last_ref, n_last_ref, m_last_ref = last_refs
        c_last_ref[...] = p * c

        @pl.when(pl.program_id(1) == 0)
        def _():
            n_last_ref[...] = p * n
            m_last_ref[0] = m


# ---------------------------------------------------------------------------------------------------------
# pallas_call wrapper: grid and BlockSpecs.
# ---------------------------------------------------------------------------------------------------------
def _sequence_call(
    q, k, v, i, f, c0, n0, m0, *, eps: float, config: SequenceKernelConfig, interpret: bool, return_last_states: bool
):
    """Runs the kernel on flattened heads.

    Args:
        q, k: (BH, S, DHQK); v: (BH, S, DHV); i, f: (BH, S); c0 (BH, DHQK, DHV), n0 (BH, DHQK), m0 (BH, 1)
            float32, or all None (zero initial states).

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
    args = [q, k, v, i, f]
    in_specs = [seq_qk, seq_qk, seq_v, seq_gate, seq_gate]
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
        has_initial=has_initial,
        return_last_states=return_last_states,
        lazy_forget=config.lazy_forget,
        prefetch=config.prefetch,
        unroll=min(config.unroll, S),
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
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """The mLSTM recurrent form on a full sequence in one fused Pallas kernel, with float32 states.

    Same function and arguments as :func:`xlstm_jax.mlstm.recurrent.recurrent_sequence_fw` (without
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
        interpret: None: the compiled kernel on a GPU, ``recurrent_sequence_fw`` (float32 states,
            ``use_scan=True``) elsewhere. True: Pallas interpret mode. False: the compiled kernel (raises
            without a GPU).

    Returns:
        h (B, NH, S, DHV) in queries' dtype, or ``(h, (c_last, n_last, m_last))`` with shapes
        (B, NH, DHQK, DHV), (B, NH, DHQK), (B, NH) if ``return_last_states``.

    Raises:
        ValueError: a shape does not match, initial states are given partly, DHQK or DHV is unsupported,
            eps is not positive and finite, or state_dtype is not None or float32.
        TypeError: an input is not float32/bfloat16/float16, or eps is traced.
        RuntimeError: ``interpret=False`` without a GPU.

    Example:
        >>> h, (c, n, m) = recurrent_sequence_pallas(q, k, v, i, f, return_last_states=True)
    """
    dims, i, f = check_sequence_inputs(queries, keys, values, igate_preact, fgate_preact)
    check_eps(eps)
    if isinstance(eps, jax.core.Tracer):
        raise TypeError("eps must be a Python number for the Pallas sequence kernel (it is compiled in), got a tracer")
    resolved = resolve_state_dtype(state_dtype)
    if resolved not in (None, _F32):
        raise ValueError(f"the Pallas sequence kernel keeps its states in float32; got state_dtype={state_dtype!r}")
    check_kernel_dtypes(queries=queries, keys=keys, values=values, igate_preact=i, fgate_preact=f)
    check_head_dims(dims.DHQK, dims.DHV)
    mode = kernel_mode(interpret)
    (c0, n0, m0), out_dtypes = prepare_states(c_initial, n_initial, m_initial, dims, _F32, default_dtype=_F32)
    has_initial = c_initial is not None
    if mode == "xla":
        out = recurrent_sequence_fw(
            queries, keys, values, i, f,
            c0 if has_initial else None, n0 if has_initial else None, m0 if has_initial else None,
            return_last_states=return_last_states, eps=eps, state_dtype=_F32, use_scan=True,
        )  # fmt: skip
    else:
        if config is None:
            config = SequenceKernelConfig.get_default(dims.DHQK, dims.DHV)
        elif not isinstance(config, SequenceKernelConfig):
            raise TypeError(f"config must be a SequenceKernelConfig or None, got {type(config).__name__}")
        initial = (c0, n0, m0) if has_initial else None
        out = _sequence(
            queries, keys, values, i, f, initial, float(eps), bool(return_last_states), config, mode == "interpret"
        )
    if not return_last_states:
        return out
    h, states = out
    return h, cast_states(states, out_dtypes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _sequence(q, k, v, i, f, initial, eps, return_last_states, config, interpret):
    """The kernel on (B, NH, ...) arrays; gates (B, NH, S, 1); ``initial`` float32 ``(c0, n0, m0)`` or None."""
    B, NH, S, DHQK = q.shape
    DHV = v.shape[3]
    BH = B * NH
    flat = [q.reshape(BH, S, DHQK), k.reshape(BH, S, DHQK), v.reshape(BH, S, DHV), i.reshape(BH, S), f.reshape(BH, S)]
    if initial is None:
        flat += [None, None, None]
    else:
        c0, n0, m0 = initial
        flat += [c0.reshape(BH, DHQK, DHV), n0.reshape(BH, DHQK), m0.reshape(BH, 1)]
    outs = _sequence_call(*flat, eps=eps, config=config, interpret=interpret, return_last_states=return_last_states)
    h = outs[0].reshape(B, NH, S, DHV)
    if not return_last_states:
        return h
    c, n, m = outs[1:]
    return h, (c.reshape(B, NH, DHQK, DHV), n.reshape(B, NH, DHQK), m.reshape(B, NH))


def _sequence_fwd(q, k, v, i, f, initial, eps, return_last_states, config, interpret):
    out = _sequence(q, k, v, i, f, initial, eps, return_last_states, config, interpret)
    return out, (q, k, v, i, f, initial)


def _sequence_bwd(eps, return_last_states, config, interpret, residuals, cotangent):
    # Recompute with the XLA recurrent form (float32 states, as the kernel) and differentiate that.
    q, k, v, i, f, initial = residuals

    def xla_forward(q, k, v, i, f, initial):
        c0, n0, m0 = (None, None, None) if initial is None else initial
        return recurrent_sequence_fw(
            q, k, v, i, f, c0, n0, m0,
            return_last_states=return_last_states, eps=eps, state_dtype=_F32, use_scan=True,
        )  # fmt: skip

    _, vjp = jax.vjp(xla_forward, q, k, v, i, f, initial)
    return vjp(cotangent)


_sequence.defvjp(_sequence_fwd, _sequence_bwd)
