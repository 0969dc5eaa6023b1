"""The residual add, the RMSNorm after it and the mLSTM gate product, as one Pallas kernel for decoding.

In a decode step of xLSTM-7B at batch 1 the matrix products read every weight once, near the copy ceiling;
what else costs time is a dozen small kernels per block, each paying a launch and a tail however little it
computes (BENCHMARKS.md, the language model). Between two products the model adds the residual, normalises
(a reduction kernel, then a scaling kernel) and, before the mLSTM layer, multiplies by the (D, 2 NH) gate
weight in float32 (a reduction kernel of its own). This kernel does all of that in one launch::

    s = x + residual (+ residual ...)            (rounded to x's dtype after each add, as XLA adds)
    y = RMSNorm(s) * weight                       (float32 statistics; the model's ``RMSNorm``)
    g = cap * tanh((y @ side_weight + side_bias) / cap)   (optional, float32: the mLSTM gates)

Grid ``(M, 1 + G)``: program ``(r, 0)`` writes row r of ``s`` and ``y``; program ``(r, 1 + j)`` recomputes row
r's norm (its row is a few KB, read from L2) and writes gate ``j`` of row r, reading column j of the gate
weight. All programs run at once, so the gate product costs one program's latency, not a serial walk over
the (D, G) weight.

Two kernels compute it from the same row math (below): the Triton kernel here (any GPU, and Pallas interpret
mode) and a Mosaic GPU kernel for Hopper (:mod:`xlstm_jax.kernels.add_rms_norm_mosaic`), chosen by
``add_rms_norm_pallas``'s ``backend`` argument.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from xlstm_jax.kernels.config import STEP_BACKENDS, check_kernel_dtypes, kernel_mode
from xlstm_jax.kernels.mosaic import use_mosaic

__all__ = ["add_rms_norm_pallas", "rms_norm"]

_MAX_BLOCK = 4096  # row elements per loop iteration (a 4096-wide row in one pass: 32 values a thread at 4 warps)
_NUM_WARPS = 4


def _block(K: int) -> int:
    """The largest power of two that divides K, at most ``_MAX_BLOCK`` (Triton tiles are powers of two)."""
    return min(K & -K, _MAX_BLOCK)


# ---------------------------------------------------------------------------------------------------------
# The row math, shared by the Triton kernel below and the Mosaic GPU kernel (add_rms_norm_mosaic.py): each
# function takes a piece of a row (the whole row, or one chunk of it), or the statistic of a whole row.
# ---------------------------------------------------------------------------------------------------------
def residual_sum(x: jax.Array, residuals: Sequence[jax.Array]) -> jax.Array:
    """``x + residuals[0] + ...``, rounded to x's dtype after each add as the model's adds are."""
    f32, dtype = jnp.float32, x.dtype
    for r in residuals:
        x = (x.astype(f32) + r.astype(f32)).astype(dtype)
    return x


def rms_scale(sum_sq: jax.Array, K: int, eps: float) -> jax.Array:
    """``rsqrt(mean(s²) + eps)`` from a row's float32 sum of squares ``sum_sq`` over its K elements."""
    return jax.lax.rsqrt(sum_sq / K + eps)


def normed_row(s: jax.Array, weight: jax.Array, scale: jax.Array) -> jax.Array:
    """``RMSNorm(s) * weight``: normalised in float32, cast to s's dtype, times the weight in s's dtype."""
    f32, dtype = jnp.float32, s.dtype
    y = (s.astype(f32) * scale).astype(dtype)
    return (y.astype(f32) * weight.astype(dtype).astype(f32)).astype(dtype)


def capped_gate(acc: jax.Array, bias: jax.Array, cap: float) -> jax.Array:
    """``cap * tanh((acc + bias) / cap)`` in float32: a gate from its float32 product sum ``acc``."""
    g = acc + bias.astype(jnp.float32)
    return cap * jnp.tanh(g / cap)


# ---------------------------------------------------------------------------------------------------------
# Kernel body (Triton): program (r, 0) writes row r's s and y, program (r, 1 + j) its gate j.
# ---------------------------------------------------------------------------------------------------------
def _kernel(
    *refs, residuals: int, return_sum: bool, has_side: bool, eps: float, cap: float | None, block: int, num: int
):
    refs = list(refs)
    x_ref = refs.pop(0)
    r_refs = [refs.pop(0) for _ in range(residuals)]
    nw_ref = refs.pop(0)
    sw_ref, sb_ref = (refs.pop(0), refs.pop(0)) if has_side else (None, None)
    s_ref = refs.pop(0) if return_sum else None
    y_ref = refs.pop(0)
    g_ref = refs.pop(0) if has_side else None
    f32 = jnp.float32
    K = num * block

    def chunk(j):  # elements [j * block, (j + 1) * block) of the row
        return pl.ds(j * block if isinstance(j, int) else pl.multiple_of(j * block, block), block)

    def run(gate: bool) -> None:  # gate: this program writes gate column (program_id(1) - 1) of its row
        def load(j):  # every input of chunk j, requested together (one memory round trip, not one per use)
            c = chunk(j)
            return x_ref[c], [r_ref[c] for r_ref in r_refs], nw_ref[c], (sw_ref[c] if gate else None)

        def finish(acc):  # the gate from its float32 sum: bias, soft cap
            g_ref[...] = capped_gate(acc, sb_ref[...], cap)

        if num == 1:  # the whole row at once (K <= 4096, e.g. xLSTM-7B): loaded once, every output from registers
            x, rs, nw, w = load(0)
            s = residual_sum(x, rs)
            y = normed_row(s, nw, rms_scale(jnp.sum(jnp.square(s.astype(f32))), K, eps))
            if gate:
                finish(jnp.sum(y.astype(f32) * w.astype(f32)))
                return
            if s_ref is not None:
                s_ref[...] = s
            y_ref[...] = y
            return

        # Longer rows: one pass for the statistic, one for the outputs (the row's chunks come again from L2).
        def stat(j, acc):
            x, rs, _, _ = load(j)
            return acc + jnp.sum(jnp.square(residual_sum(x, rs).astype(f32)))

        scale = rms_scale(jax.lax.fori_loop(0, num, stat, jnp.zeros((), f32)), K, eps)

        def out(j, acc):
            x, rs, nw, w = load(j)
            s = residual_sum(x, rs)
            y = normed_row(s, nw, scale)
            if gate:
                return acc + jnp.sum(y.astype(f32) * w.astype(f32))
            if s_ref is not None:
                s_ref[chunk(j)] = s
            y_ref[chunk(j)] = y
            return acc

        acc = jax.lax.fori_loop(0, num, out, jnp.zeros((), f32))
        if gate:
            finish(acc)

    if not has_side:
        run(gate=False)
        return
    column = pl.program_id(1)
    pl.when(column == 0)(lambda: run(gate=False))
    pl.when(column > 0)(lambda: run(gate=True))


# ---------------------------------------------------------------------------------------------------------
# pallas_call wrapper (Triton).
# ---------------------------------------------------------------------------------------------------------
def _triton_call(x, residuals, weight, side, *, eps, write_sum, cap, interpret):
    """``[s], y, [g]`` by the Triton kernel: grid (M, 1 + G), s only with ``write_sum``, g only with ``side``
    (the transposed gate weight (G, K) and the bias (G,))."""
    M, K = x.shape
    G = 0 if side is None else side[0].shape[0]
    row = pl.BlockSpec((None, K), lambda r, j: (r, 0))
    inputs = [x, *residuals, weight]
    in_specs = [row] * (1 + len(residuals)) + [pl.BlockSpec((K,), lambda r, j: (0,))]
    out_shape = [jax.ShapeDtypeStruct((M, K), x.dtype)] * (1 + write_sum)
    out_specs = [row] * len(out_shape)
    if side is not None:  # program (r, 1 + j) reads column j of the gate weight and writes gate j of row r
        gate = lambda j: jnp.maximum(j - 1, 0)  # noqa: E731 (program (r, 0) reads no gate column)
        inputs += list(side)
        in_specs += [pl.BlockSpec((None, K), lambda r, j: (gate(j), 0)), pl.BlockSpec((None,), lambda r, j: (gate(j),))]
        out_shape.append(jax.ShapeDtypeStruct((M, G), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None), lambda r, j: (r, gate(j))))
    kernel = functools.partial(
        _kernel,
        residuals=len(residuals),
        return_sum=write_sum,
        has_side=side is not None,
        eps=eps,
        cap=cap,
        block=_block(K),
        num=K // _block(K),
    )
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(M, 1 + G),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=pl_triton.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="add_rms_norm",
    )(*inputs)


# ---------------------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------------------
def add_rms_norm_pallas(
    x: jax.Array,  # (M, K)
    weight: jax.Array,  # (K,)
    residuals: Sequence[jax.Array] = (),  # each (M, K)
    *,
    eps: float = 1e-6,
    return_sum: bool = True,
    side_weight: jax.Array | None = None,  # (K, G)
    side_bias: jax.Array | None = None,  # (G,)
    side_cap: float | None = None,
    interpret: bool | None = None,
    backend: str = "auto",
) -> tuple[jax.Array | None, jax.Array, jax.Array | None]:
    """``s = x + residuals``, ``y = RMSNorm(s) * weight`` and optionally the soft-capped gate product, in one kernel.

    Args:
        x: Rows (M, K); float32, bfloat16 or float16.
        weight: RMSNorm weight (K,), cast to x's dtype (as the model's ``RMSNorm`` does).
        residuals: Arrays (M, K) in x's dtype added to x in order, the sum rounded to x's dtype after each add
            (as separate adds round); empty: s is x.
        eps: RMSNorm epsilon (static).
        return_sum: Return s (otherwise it is not written).
        side_weight: Gate weight (K, G): also return ``g = cap * tanh((y @ side_weight + side_bias) / cap)``
            (M, G) in float32 (both operands upcast, as the model's float32 gate product); needs ``side_bias``
            (G,) and ``side_cap`` (static).
        interpret: None: the compiled kernel on a GPU, the same computation in XLA elsewhere; True: interpret
            mode (Pallas interpret mode for the Triton kernel, Mosaic GPU interpret mode for the Mosaic one);
            False: the compiled kernel (raises without a GPU).
        backend: Which kernel: ``"auto"`` (the Mosaic GPU kernel compiled on a GPU of compute capability 9.0 or
            newer where it covers K, the Triton kernel otherwise, and in interpret mode), ``"triton"`` or
            ``"mosaic"`` (:mod:`xlstm_jax.kernels.add_rms_norm_mosaic`: K a multiple of 128, at most 8192).
            The XLA computation (``interpret=None`` without a GPU) ignores it.

    Returns:
        ``(s, y, g)``: s (M, K) in x's dtype or None without ``return_sum`` (x itself without residuals), y (M, K)
        in x's dtype, g (M, G) float32 or None without ``side_weight``.

    Raises:
        ValueError: shapes that do not fit, named in the message; an unknown backend; ``backend="mosaic"`` for a
            K it does not cover, or in interpret mode with a JAX without Mosaic GPU interpret mode.
        TypeError: a dtype the kernel does not read, or residuals not in x's dtype.
        RuntimeError: ``interpret=False`` without a GPU; ``backend="mosaic"`` compiled on a GPU older than Hopper.

    The kernels are for decoding and have no gradient rule (the XLA fallback, ``interpret=None`` off a GPU, is
    differentiable). Under ``jax.vmap`` the Triton kernel gets a grid axis; the Mosaic kernel runs once per
    mapped element (``lax.map``).
    """
    if x.ndim != 2:
        raise ValueError(f"add_rms_norm_pallas takes rows x (M, K), got x.shape={tuple(x.shape)}")
    M, K = x.shape
    residuals = tuple(residuals)
    if weight.shape != (K,):
        raise ValueError(f"weight.shape={tuple(weight.shape)} must be (K,)=({K},) for x.shape={tuple(x.shape)}")
    for n, r in enumerate(residuals):
        if r.shape != x.shape:
            raise ValueError(f"residuals[{n}].shape={tuple(r.shape)} must be x.shape={tuple(x.shape)}")
        check_kernel_dtypes(**{f"residuals[{n}]": r})
        if r.dtype != x.dtype:
            raise TypeError(f"residuals[{n}].dtype={r.dtype} must be x.dtype={x.dtype}")
    has_side = side_weight is not None
    if has_side:
        G = side_weight.shape[-1]
        if side_weight.shape != (K, G) or side_bias is None or side_bias.shape != (G,) or side_cap is None:
            raise ValueError(
                f"the gate product needs side_weight (K, G), side_bias (G,) and side_cap; got side_weight.shape="
                f"{tuple(side_weight.shape)}, side_bias.shape={None if side_bias is None else tuple(side_bias.shape)}"
                f", side_cap={side_cap} for K={K}"
            )
    elif side_bias is not None or side_cap is not None:
        raise ValueError("side_bias and side_cap need side_weight")
    check_kernel_dtypes(x=x, weight=weight, side_weight=side_weight, side_bias=side_bias)
    if backend not in STEP_BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {STEP_BACKENDS}")
    mode = kernel_mode(interpret)
    if mode == "xla":
        s, y, g = _xla(x, weight, residuals, eps, side_weight, side_bias, side_cap)
        return (s if return_sum else None), y, g

    write_sum = return_sum and bool(residuals)
    # The gate weight transposed (G, K), so that a program's column is contiguous. Inside a decode loop the
    # weight is loop-invariant and XLA hoists the transpose out of the loop.
    side = (side_weight.T, side_bias) if has_side else None
    kw = {"eps": float(eps), "write_sum": write_sum, "cap": None if side_cap is None else float(side_cap)}
    from xlstm_jax.kernels import add_rms_norm_mosaic as mosaic  # here: it imports this module's row math

    if use_mosaic("add_rms_norm_pallas", backend, mode, mosaic.mosaic_add_rms_norm_unsupported(K)):
        outs = mosaic.mosaic_add_rms_norm(x, residuals, weight, side, interpret=mode == "interpret", **kw)
    else:
        outs = _triton_call(x, residuals, weight, side, interpret=mode == "interpret", **kw)
    outs = list(outs)
    s = outs.pop(0) if write_sum else (x if return_sum else None)
    y = outs.pop(0)
    return s, y, (outs.pop(0) if has_side else None)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, float32_stats: bool = True) -> jax.Array:
    """``x * rsqrt(mean(x², -1) + eps) * weight`` in XLA: statistics in float32 (or x's dtype), the normalised
    values cast back to x's dtype, then times the weight in x's dtype (``transformers``' xLSTM order). With
    ``float32_stats`` the statistics are float32 or x's dtype if wider (never narrowed)."""
    y = x.astype(jnp.promote_types(x.dtype, jnp.float32)) if float32_stats else x
    y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * weight.astype(x.dtype)


def _xla(x, weight, residuals, eps, side_weight, side_bias, side_cap):
    """The kernel's computation in XLA (the fallback without a GPU): the model's adds, ``RMSNorm`` and gates."""
    f32 = jnp.float32
    s = x
    for r in residuals:
        s = s + r
    y = rms_norm(s, weight, eps)
    if side_weight is None:
        return s, y, None
    g = jnp.dot(y.astype(f32), side_weight.astype(f32), precision=jax.lax.Precision.HIGHEST)
    g = g + side_bias.astype(f32)
    return s, y, side_cap * jnp.tanh(g / side_cap)
