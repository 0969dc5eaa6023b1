"""The mLSTM layer's read-out after a decode step as one Pallas kernel: per-head LayerNorm and output gate.

``y = sigmoid(o) * (LayerNorm_head(h) * weight)``, one program per head: the head's h (DHV,) has its mean
removed and is divided by its (biased) standard deviation, statistics in float32, the result rounded to the
output dtype, scaled by the weight (no bias) and multiplied by ``sigmoid(o)``, rounding after each operation
in the output dtype (the roundings of the model's ``MultiHeadLayerNorm`` and output gate in XLA).

It follows the step kernel (:mod:`xlstm_jax.kernels.recurrent_step`) in a model's decode step and takes over
the work XLA would otherwise do in several kernels after it:

- h may come as the step's partial sums over P DHQK splits, ``Σ q̂ ⊙ c'`` (P, DHV) and ``Σ q̂·n'`` (P,), which
  the kernel combines exactly as the step's epilogue does (sum, then divide by the normaliser of m').
- o is read in place from a larger array (a model's fused projection), at a column offset.
- With ``states``, the head's n' and m' (fresh buffers written by the step kernel) are copied into the
  layer's slice of the stacked n and m, in place: one program owns each head's slice and the step that read
  the stacks has finished, so there is no race (unlike inside the step kernel), and no copy kernels follow.

Two kernels compute it from the same head math (below): the Triton kernel here (any GPU, and Pallas interpret
mode) and a Mosaic GPU kernel for Hopper (:mod:`xlstm_jax.kernels.head_norm_mosaic`), chosen by
``head_norm_gate_pallas``'s ``backend`` argument.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from xlstm_jax.kernels.config import STEP_BACKENDS, check_kernel_dtypes, kernel_mode
from xlstm_jax.kernels.mosaic import use_mosaic
from xlstm_jax.mlstm.checks import check_eps
from xlstm_jax.mlstm.stabilizer import normalizer

__all__ = ["head_norm_gate_pallas"]


# ---------------------------------------------------------------------------------------------------------
# The head math, shared by the Triton kernel below and the Mosaic GPU kernel (head_norm_mosaic.py): a head's
# vectors come as lists of chunks (one chunk: the whole head).
# ---------------------------------------------------------------------------------------------------------
def combined_head(num: jax.Array, qn: jax.Array, m: jax.Array, eps: float, dtype: Any) -> jax.Array:
    """h from the step's partial sums, exactly as the step's epilogue: ``Σ num / (max(|Σ qn|, exp(-m')) + eps)``
    from the summed numerator ``num`` (a chunk) and the scalars ``qn`` (summed) and m', rounded to ``dtype``.

    h's normaliser (a positive scalar per head) cancels in the LayerNorm up to its eps; it is still applied, so
    that the function is the unfused model's, whatever its eps."""
    return (num / normalizer(qn, m, eps)).astype(dtype)


def read_out_chunks(
    h: Sequence[jax.Array], weight: Sequence[jax.Array], o: Sequence[jax.Array], norm_eps: float, dtype: Any
) -> list[jax.Array]:
    """``sigmoid(o) * (LayerNorm(h) * weight)`` of one head given as matching chunks of h, weight and o.

    h is rounded to ``dtype`` first; the statistics are float32 over the whole head; the normalised value, its
    product with the weight (cast to ``dtype``), ``sigmoid(o)`` and the product of the two are each rounded to
    ``dtype``, as the model's ``MultiHeadLayerNorm`` and output gate in XLA round."""
    f32 = jnp.float32
    size = sum(c.shape[0] for c in h)

    def total(values):  # the sum over the head of chunks of float32 values: added chunkwise, one reduction
        return jnp.sum(functools.reduce(operator.add, values))

    y = [c.astype(dtype).astype(f32) for c in h]
    mean = total(y) / size
    y = [c - mean for c in y]
    scale = jax.lax.rsqrt(total(jnp.square(c) for c in y) / size + norm_eps)
    out = []
    for c, w, o_c in zip(y, weight, o, strict=True):
        c = (c * scale).astype(dtype)
        c = (c.astype(f32) * w.astype(dtype).astype(f32)).astype(dtype)
        gate = jax.nn.sigmoid(o_c.astype(f32)).astype(dtype)
        out.append((gate.astype(f32) * c.astype(f32)).astype(dtype))
    return out


# ---------------------------------------------------------------------------------------------------------
# Kernel body (Triton): one program = one head.
# ---------------------------------------------------------------------------------------------------------
def _head_out_kernel(*refs, combine: bool, with_states: bool, eps: float, norm_eps: float):
    """One head: h from the step's partial sums (or h itself), per-head LayerNorm, times the weight, times
    sigmoid(o); with ``with_states`` the head's n' and m' copied into the layer's slice of the stacks."""
    refs = list(refs)
    num_ref, qn_ref = (refs.pop(0), refs.pop(0)) if combine else (None, None)
    h_ref = None if combine else refs.pop(0)
    m_ref = refs.pop(0) if combine or with_states else None
    if with_states:
        n_ref, o_ref, w_ref, _, _, y_ref, n_out_ref, m_out_ref = refs
        n_out_ref[...] = n_ref[...]  # the step kernel wrote n' and m' to fresh buffers; no one reads the stacks now
        m_out_ref[...] = m_ref[...]
    else:
        o_ref, w_ref, y_ref = refs
    dtype = y_ref.dtype
    if combine:  # the exact combination of the DHQK splits, as the step's epilogue
        h = combined_head(jnp.sum(num_ref[...], axis=0), jnp.sum(qn_ref[...]), m_ref[0], eps, dtype)
    else:
        h = h_ref[...]
    (y_ref[...],) = read_out_chunks([h], [w_ref[...]], [o_ref[...]], norm_eps, dtype)


# ---------------------------------------------------------------------------------------------------------
# pallas_call wrapper.
# ---------------------------------------------------------------------------------------------------------
def _head_out_call(h, qn, m_new, n_new, n, m, layer, o, weight, *, NH, o_offset, eps, norm_eps, interpret):
    """The read-out (B, NH·DHV) in o's dtype from ``h`` (BH, DHV), or with ``qn`` from the partial numerators
    ``h`` (BH, P, DHV) and q̂·n' ``qn`` (BH, P) of P DHQK splits and ``m_new`` (BH, 1). Grid: one program per
    head. o is read in place from ``o`` (B, W) at columns ``o_offset + h·DHV`` (a multiple of DHV). With
    ``n_new`` (BH, DHQK), the step's n' and m' are also written into slice ``layer`` of the stacks n (L, BH,
    DHQK) and m (L, BH, 1), in place (aliased).

    Returns:
        ``(y, n', m')``: y (B, NH·DHV) and the stacks; without ``n_new``, ``(y,)``.
    """
    BH, DHV = h.shape[0], h.shape[-1]
    B = BH // NH
    with_states = n_new is not None
    if qn is None:
        inputs, in_specs = [h], [pl.BlockSpec((None, DHV), lambda bh: (bh, 0))]
    else:
        P = h.shape[1]
        inputs = [h, qn]
        in_specs = [pl.BlockSpec((None, P, DHV), lambda bh: (bh, 0, 0)), pl.BlockSpec((None, P), lambda bh: (bh, 0))]
    if qn is not None or with_states:
        inputs.append(m_new)
        in_specs.append(pl.BlockSpec((None, 1), lambda bh: (bh, 0)))
    if with_states:
        DHQK = n.shape[-1]
        inputs.append(n_new)
        in_specs.append(pl.BlockSpec((None, DHQK), lambda bh: (bh, 0)))
    inputs += [o, weight]
    in_specs += [
        pl.BlockSpec((None, DHV), lambda bh: (bh // NH, o_offset // DHV + bh % NH)),
        pl.BlockSpec((DHV,), lambda bh: (bh % NH,)),
    ]
    out_shape = [jax.ShapeDtypeStruct((B, NH * DHV), o.dtype)]
    out_specs = [pl.BlockSpec((None, DHV), lambda bh: (bh // NH, bh % NH))]
    aliases = {}
    if with_states:
        n_spec = pl.BlockSpec((None, None, DHQK), lambda bh: (layer, bh, 0))
        m_spec = pl.BlockSpec((None, None, 1), lambda bh: (layer, bh, 0))
        inputs += [n, m]
        in_specs += [n_spec, m_spec]
        out_shape += [jax.ShapeDtypeStruct(n.shape, n.dtype), jax.ShapeDtypeStruct(m.shape, m.dtype)]
        out_specs += [n_spec, m_spec]
        aliases = {len(inputs) - 2: 1, len(inputs) - 1: 2}
    kernel = functools.partial(
        _head_out_kernel, combine=qn is not None, with_states=with_states, eps=eps, norm_eps=norm_eps
    )
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(BH,),
        in_specs=in_specs,
        out_specs=out_specs,
        input_output_aliases=aliases,
        compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="mlstm_head_out",
    )(*inputs)


# ---------------------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------------------
def _python_number(name: str, x: Any) -> float:
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"{name} must be a Python number (it is compiled into the kernel), got a tracer")
    check_eps(x)
    return float(x)


def head_norm_gate_pallas(
    h: jax.Array | tuple[jax.Array, jax.Array],  # (BH, DHV); or partial sums (num (BH, P, DHV), qn (BH, P))
    o: jax.Array,  # (B, W): head j of row b at columns o_offset + j·DHV
    weight: jax.Array,  # (NH·DHV,)
    *,
    num_heads: int,
    o_offset: int = 0,
    norm_eps: float = 1e-6,
    m: jax.Array | None = None,  # (BH,) float32: the step's m'
    eps: float = 1e-6,
    states: tuple[jax.Array, jax.Array, jax.Array, int] | None = None,
    interpret: bool = False,
    backend: str = "auto",
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The mLSTM layer's read-out ``sigmoid(o) * (LayerNorm_head(h) * weight)`` of one decode step, one kernel.

    ``BH = B·NH`` heads, head ``bh = b·NH + j`` being head j of batch row b.

    Args:
        h: The step's h (BH, DHV), in the output's dtype or any other (it is rounded to it first, as the XLA
            read-out does); or its partial sums over P DHQK splits, ``(num (BH, P, DHV), qn (BH, P))`` float32
            (``recurrent_step_kernel(..., combine=False)``), combined here as
            ``Σ num / (max(|Σ qn|, exp(-m')) + eps)``.
        o: The output gate pre-activations (B, W): head j of row b at columns ``o_offset + j·DHV`` onwards. The
            output has o's dtype. Read in place where ``o_offset`` is a multiple of DHV, else sliced first.
        weight: The per-head norm's weight (NH·DHV,).
        num_heads: NH.
        o_offset: Where o's columns start in ``o``.
        norm_eps: Added to each head's variance; a Python number.
        m: The step's new max state m' (BH,) float32: needed with partial sums, and with ``states``.
        eps: The cell's eps, for combining partial sums; a Python number.
        states: ``(n' (BH, DHQK), n (L, BH, DHQK), m (L, BH), layer)``: also write the step's n' and m' into
            slice ``layer`` (a Python int) of the stacks n and m, in place (aliased: donate them under
            ``jax.jit``), and return the stacks.
        interpret: True: interpret mode (Pallas interpret mode for the Triton kernel, Mosaic GPU interpret mode for
            the Mosaic one); False: compiled (needs a GPU).
        backend: Which kernel: ``"auto"`` (the Mosaic GPU kernel compiled on a GPU of compute capability 9.0 or
            newer where it covers the head shape, the Triton kernel otherwise, and in interpret mode),
            ``"triton"`` or ``"mosaic"`` (:mod:`xlstm_jax.kernels.head_norm_mosaic`: DHV, and DHQK with
            ``states``, multiples of 128).

    Returns:
        y (B, NH·DHV) in o's dtype; with ``states``, ``(y, (n', m'))`` with the stacks' shapes.

    Raises:
        ValueError: a shape does not match, an eps is not positive and finite, or layer is out of range; an
            unknown backend; ``backend="mosaic"`` for a head shape it does not cover, or in interpret mode with a
            JAX without Mosaic GPU interpret mode.
        TypeError: a dtype is not float32/bfloat16/float16, m or the stacks are not float32, an eps is traced,
            layer is not a Python int, or interpret is not a bool.
        RuntimeError: ``interpret=False`` without a GPU; ``backend="mosaic"`` compiled on a GPU older than Hopper.
    """
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret must be a bool, got {interpret!r}")
    kernel_mode(interpret)  # raises without a GPU for interpret=False
    if backend not in STEP_BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {STEP_BACKENDS}")
    norm_eps, eps = _python_number("norm_eps", norm_eps), _python_number("eps", eps)
    partial = isinstance(h, tuple)
    num, qn = h if partial else (h, None)
    NH = num_heads
    if not (isinstance(NH, int) and NH >= 1):
        raise ValueError(f"num_heads must be a positive int, got {NH!r}")
    if num.ndim != (3 if partial else 2) or (partial and qn.shape != num.shape[:2]):
        want = "(num (BH, P, DHV), qn (BH, P))" if partial else "(BH, DHV)"
        got = f"{tuple(num.shape)}, {tuple(qn.shape)}" if partial else f"{tuple(num.shape)}"
        raise ValueError(f"h must be {want}, got {got}")
    BH, DHV = num.shape[0], num.shape[-1]
    check_kernel_dtypes(h=num, qn=qn, o=o, weight=weight)
    if partial and (num.dtype != jnp.float32 or qn.dtype != jnp.float32):
        raise TypeError(f"partial sums must be float32, got num.dtype={num.dtype}, qn.dtype={qn.dtype}")
    if BH % NH or o.ndim != 2 or o.shape[0] != BH // NH or o_offset < 0 or o_offset + NH * DHV > o.shape[1]:
        raise ValueError(
            f"o.shape={tuple(o.shape)} must be (B, W) with B = BH / NH = {BH}/{NH} and W >= o_offset + NH·DHV = "
            f"{o_offset} + {NH * DHV} (o_offset={o_offset})"
        )
    if weight.shape != (NH * DHV,):
        raise ValueError(f"weight.shape={tuple(weight.shape)} must be (NH·DHV,)=({NH * DHV},)")
    if partial or states is not None:
        if m is None or m.shape != (BH,):
            got = None if m is None else f"m.shape={tuple(m.shape)}"
            raise ValueError(f"m, the step's m' of shape ({BH},), is needed with partial sums or states, got {got}")
        if m.dtype != jnp.float32:
            raise TypeError(f"m must be float32, got m.dtype={m.dtype}")
    n_new = n_stack = m_stack = None
    layer = 0
    if states is not None:
        n_new, n_stack, m_stack, layer = states
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layer must be a Python int (it is compiled into the kernel), got {layer!r}")
        if n_stack.ndim != 3 or n_stack.shape[1] != BH or m_stack.shape != n_stack.shape[:2]:
            raise ValueError(
                f"the stacks must be n (L, BH, DHQK), m (L, BH) with BH={BH}, got n.shape={tuple(n_stack.shape)}, "
                f"m.shape={tuple(m_stack.shape)}"
            )
        if n_new.shape != n_stack.shape[1:]:
            raise ValueError(f"n'.shape={tuple(n_new.shape)} must be (BH, DHQK)={tuple(n_stack.shape[1:])}")
        if not 0 <= layer < n_stack.shape[0]:
            raise ValueError(f"layer={layer} must be in [0, L) for L={n_stack.shape[0]} stacked layers")
        if not all(x.dtype == jnp.float32 for x in (n_new, n_stack, m_stack)):
            raise TypeError(f"the states must be float32, got {n_new.dtype}, {n_stack.dtype}, {m_stack.dtype}")
    from xlstm_jax.kernels import head_norm_mosaic as mosaic  # here: it imports this module's head math

    unsupported = mosaic.mosaic_head_norm_unsupported(DHV, None if n_new is None else n_new.shape[-1])
    if use_mosaic("head_norm_gate_pallas", backend, "interpret" if interpret else "compiled", unsupported):
        if not mosaic.mosaic_reads_o_in_place(o.shape[1], o_offset, DHV):
            o, o_offset = o[:, o_offset : o_offset + NH * DHV], 0
        kw = {"NH": NH, "o_offset": o_offset, "eps": eps, "norm_eps": norm_eps, "interpret": interpret}
        outs = mosaic.mosaic_head_norm(num, qn, m, states, o, weight, **kw)
        return outs[0] if states is None else (outs[0], tuple(outs[1:]))
    if o_offset % DHV:
        o, o_offset = o[:, o_offset : o_offset + NH * DHV], 0
    m_new = None if m is None else m.reshape(BH, 1)
    m_3d = None if m_stack is None else m_stack.reshape(*m_stack.shape, 1)
    kw = {"NH": NH, "o_offset": o_offset, "eps": eps, "norm_eps": norm_eps, "interpret": interpret}
    outs = _head_out_call(num, qn, m_new, n_new, n_stack, m_3d, layer, o, weight, **kw)
    if states is None:
        return outs[0]
    y, n_out, m_out = outs
    return y, (n_out, m_out.reshape(m_stack.shape))
