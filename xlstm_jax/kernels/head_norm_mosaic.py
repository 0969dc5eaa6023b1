"""The mLSTM layer's read-out after a decode step (:func:`~xlstm_jax.kernels.head_norm_gate_pallas`) as a Mosaic GPU
kernel (Hopper).

The same function as the Triton kernel of :mod:`xlstm_jax.kernels.head_norm` (``head_norm_gate_pallas`` picks
between them with its ``backend`` argument), from the same head math (``combined_head`` and
``read_out_chunks`` there): one program (one warpgroup, 128 threads) per head combines the step's partial sums
(or reads h), normalises the head, scales it by the weight and gates it with ``sigmoid(o)``, o read in place
from a larger array. With states, the head's n' and m' are copied into the layer's slice of the stacked n and
m, in place: the stacks are passed as GMEM references (``jax.new_ref``), which ``pl.kernel`` turns into
input-output aliases (under ``jax.jit`` with the stacks donated, no copy is made). Under ``jax.vmap`` the kernel
runs once per mapped element (``lax.map``), without states only.

Layout. Each head's vectors are read from global memory in chunks of 256 elements (128 where DHV is an odd
multiple of 128; :func:`xlstm_jax.kernels.mosaic.chunk_length`), the same register layout in every dtype, and
the whole head stays in registers.

Limits. DHV must be a multiple of 128 (a warpgroup's row of registers), and with states DHQK too; other heads
take the Triton kernel (``backend="auto"``) or raise (``backend="mosaic"``). The rows of the array holding o
are read in place where they keep 16-byte alignment (the row length W a multiple of 8 and ``o_offset`` a
multiple of DHV), else the caller slices o out first. Compiled it needs a Hopper GPU; on a CPU it runs in
Mosaic GPU interpret mode where JAX has it (:func:`xlstm_jax.kernels.mosaic.mosaic_interpret_params`).
"""

from __future__ import annotations

import functools
import operator

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from xlstm_jax.kernels.head_norm import combined_head, read_out_chunks
from xlstm_jax.kernels.mosaic import WARPGROUP, chunk_length, map_under_vmap, mosaic_interpret_params

__all__ = ["mosaic_head_norm", "mosaic_head_norm_unsupported", "mosaic_reads_o_in_place"]


def mosaic_head_norm_unsupported(DHV: int, DHQK: int | None) -> str | None:
    """Why the Mosaic kernel cannot run heads of DHV values (and, with states, DHQK), or None if it can."""
    if DHV % WARPGROUP:
        return f"DHV={DHV} must be a multiple of {WARPGROUP}"
    if DHQK is not None and DHQK % WARPGROUP:
        return f"DHQK={DHQK} (of the states n') must be a multiple of {WARPGROUP}"
    return None


def mosaic_reads_o_in_place(W: int, o_offset: int, DHV: int) -> bool:
    """Whether the kernel reads o from its (B, W) array at ``o_offset`` in place: every head's chunk then starts
    16-byte aligned (W a multiple of 8, o_offset of DHV)."""
    return W % 8 == 0 and o_offset % DHV == 0


# ---------------------------------------------------------------------------------------------------------
# Kernel body: one program = one head.
# ---------------------------------------------------------------------------------------------------------
def _body(*refs, NH: int, combine: bool, with_states: bool, layer: int, o_offset: int, eps: float, norm_eps: float):
    refs = list(refs)
    num_ref, qn_ref = (refs.pop(0), refs.pop(0)) if combine else (None, None)  # (BH, P, DHV), (BH, P) float32
    h_ref = None if combine else refs.pop(0)  # (BH, DHV)
    m_ref = refs.pop(0) if combine or with_states else None  # (BH,) float32: the step's m'
    n_ref = refs.pop(0) if with_states else None  # (BH, DHQK) float32: the step's n'
    o_ref, w_ref = refs.pop(0), refs.pop(0)  # (B, W), (NH·DHV,)
    n_stack_ref, m_stack_ref = (refs.pop(0), refs.pop(0)) if with_states else (None, None)  # (L, BH, DHQK), (L, BH)
    (y_ref,) = refs  # (B, NH·DHV)
    dtype = y_ref.dtype
    DHV = w_ref.shape[0] // NH
    chunk = chunk_length(DHV)
    starts = range(0, DHV, chunk)
    bh = lax.axis_index("head")
    b, j = bh // NH, bh % NH

    if combine:  # the exact combination of the DHQK splits, as the step's epilogue
        P = qn_ref.shape[1]
        qn = functools.reduce(operator.add, (qn_ref[bh, p] for p in range(P)))
        h = []
        for start in starts:
            num = functools.reduce(operator.add, (num_ref.at[bh, p, pl.ds(start, chunk)][...] for p in range(P)))
            h.append(combined_head(num, qn, m_ref[bh], eps, dtype))
    else:
        h = [h_ref.at[bh, pl.ds(start, chunk)][...] for start in starts]
    weight = [w_ref.at[pl.ds(j * DHV + start, chunk)][...] for start in starts]
    o = [o_ref.at[b, pl.ds(o_offset + j * DHV + start, chunk)][...] for start in starts]
    for start, y in zip(starts, read_out_chunks(h, weight, o, norm_eps, dtype), strict=True):
        y_ref.at[b, pl.ds(j * DHV + start, chunk)][...] = y
    if with_states:  # the step kernel wrote n' and m' to fresh buffers; no one reads the stacks now
        n_stack_ref.at[layer, bh][...] = n_ref.at[bh][...]
        m_stack_ref[layer, bh] = m_ref[bh]


# ---------------------------------------------------------------------------------------------------------
# pl.kernel wrapper.
# ---------------------------------------------------------------------------------------------------------
@functools.partial(
    jax.jit, static_argnames=("NH", "combine", "with_states", "layer", "o_offset", "eps", "norm_eps", "interpret")
)
def _call(*arrays, NH, combine, with_states, layer, o_offset, eps, norm_eps, interpret):
    o, weight = arrays[-4:-2] if with_states else arrays[-2:]
    B = o.shape[0]
    DHV = weight.shape[0] // NH
    body = functools.partial(
        _body,
        NH=NH,
        combine=combine,
        with_states=with_states,
        layer=layer,
        o_offset=o_offset,
        eps=eps,
        norm_eps=norm_eps,
    )
    kernel = pl.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((B, NH * DHV), o.dtype),
        mesh=plgpu.Mesh(grid=(B * NH,), grid_names=("head",)),
        name="mlstm_head_out_mosaic",
        **({"interpret": mosaic_interpret_params()} if interpret else {}),
    )
    if not with_states:
        return map_under_vmap(kernel)(*arrays)

    # The stacks as GMEM references, written in place. (No vmap rule here: a mapped in-place update has none.)
    *inputs, n_stack, m_stack = arrays
    stacks = [jax.new_ref(x, memory_space=plgpu.GMEM) for x in (n_stack, m_stack)]
    y = kernel(*inputs, *stacks)
    return y, *(jax.freeze(x) for x in stacks)


def mosaic_head_norm(
    h: jax.Array,  # (BH, DHV); or the partial numerators (BH, P, DHV) float32 with qn
    qn: jax.Array | None,  # (BH, P) float32
    m: jax.Array | None,  # (BH,) float32: the step's m'
    states: tuple[jax.Array, jax.Array, jax.Array, int] | None,  # n' (BH, DHQK), n (L, BH, DHQK), m (L, BH), layer
    o: jax.Array,  # (B, W)
    weight: jax.Array,  # (NH·DHV,)
    *,
    NH: int,
    o_offset: int,
    eps: float,
    norm_eps: float,
    interpret: bool,
) -> tuple[jax.Array, ...]:
    """The read-out (B, NH·DHV) in o's dtype by the Mosaic kernel, one program per head; with ``states``, also the
    stacks n (L, BH, DHQK) and m (L, BH) with the step's n' and m' written into slice ``layer`` in place.

    The caller checks shapes and dtypes and passes an o that :func:`mosaic_reads_o_in_place` accepts.

    Args:
        h, qn, m: h itself (``qn`` None), or the step's partial sums ``h``, ``qn`` and m' (also needed with
            states).
        states: ``(n', n, m, layer)`` or None.
        o: The output gate pre-activations: head j of row b at columns ``o_offset + j·DHV`` onwards.
        weight: The per-head norm's weight.
        NH: Heads per row.
        o_offset: Where o's columns start.
        eps: The cell's eps (for partial sums); norm_eps: the norm's.
        interpret: Mosaic GPU interpret mode (on any machine, where JAX has it) instead of the compiled kernel.

    Returns:
        ``(y,)``, or ``(y, n, m)`` with states.

    Raises:
        ValueError: a head shape the kernel does not cover (:func:`mosaic_head_norm_unsupported`), or an o it
            cannot read in place.
    """
    DHV = h.shape[-1]
    n_new, n_stack, m_stack, layer = states if states is not None else (None, None, None, 0)
    reason = mosaic_head_norm_unsupported(DHV, None if n_new is None else n_new.shape[-1])
    if reason is None and not mosaic_reads_o_in_place(o.shape[1], o_offset, DHV):
        reason = f"o (B, W={o.shape[1]}) at o_offset={o_offset} is not 16-byte aligned for DHV={DHV}"
    if reason is not None:
        raise ValueError(f"the Mosaic GPU head_norm kernel cannot run this shape: {reason}")
    arrays = [h] + ([qn] if qn is not None else []) + ([m] if qn is not None or n_new is not None else [])
    arrays += ([n_new] if n_new is not None else []) + [o, weight]
    arrays += [n_stack, m_stack] if n_new is not None else []
    out = _call(
        *arrays,
        NH=NH,
        combine=qn is not None,
        with_states=n_new is not None,
        layer=layer,
        o_offset=o_offset,
        eps=eps,
        norm_eps=norm_eps,
        interpret=interpret,
    )
    return out if isinstance(out, tuple) else (out,)
