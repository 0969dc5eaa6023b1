"""The matrix products of a decode step (a few rows), fused with what surrounds them, as a Pallas kernel.

At decode time a projection multiplies at most a few rows x (M, K), M <= 16, by a weight w (K, N): it is bound
by reading w once, and on an H200 the rest of the layer (norms, gates, residual adds, the gated FFN's
elementwise product) is a dozen small kernels per layer that each cost a launch and a tail (1-4 µs) while the
memory system idles. This kernel streams w once and does that work around the product in the same pass:

* ``norm_weight``: the rows are RMS-normalised first (statistics in float32, normalised values cast back to
  x's dtype, then times the weight in that dtype: the model's ``RMSNorm``); every program recomputes the row
  statistics (M x K values from L2, negligible next to its share of w).
* ``glu``: w is ``[gate | up]`` (K, 2F) and the result is ``silu(x w_gate) * (x w_up)`` (M, F): each program
  owns the same columns of both halves (the gated FFN's hidden layer, no (M, 2F) intermediate).
* ``residual``: the result is ``residual + x w`` (the block's skip connection), rounded like XLA's
  (product cast to the output dtype, then added).
* ``side_weight`` (K, G), ``side_bias`` (G,), ``side_cap``: one more program computes the float32 product of the
  (normalised) rows with a narrow weight (upcast to float32), adds the bias and soft-caps it
  ``cap * tanh(. / cap)``: the mLSTM gate pre-activations, which need float32 and would otherwise be two more
  kernels after the norm.

Grid: one program per ``block_n`` columns (after the side program, program 0), each walking all K rows ``block_k`` at a
time, with ``prefetch`` weight tiles requested ahead by hand. The product is a matrix-unit dot of a 16-row
tile (the smallest): one row is placed in row 0 of a zero tile, 2 to 16 rows are padded to 16. With
``config.fma`` a single row instead multiplies and adds elementwise in float32 into a (block_k, block_n)
accumulator that is summed over its rows once at the end (no matrix unit, no shared-memory staging).

Status: experimental. Correct on the H200, but slower there than XLA's products in every tiling timed so far
(the ``fma`` mode and the current side program not yet timed); ``docs/design.md`` has the measurements.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from xlstm_jax.kernels.config import DecodeMatmulConfig, check_kernel_dtypes, kernel_mode

__all__ = ["decode_matmul_pallas", "decode_matmul_fits"]

_TILE_M = 16  # rows of the smallest matrix-unit tile Triton emits


def _rms_scale(x_ref, eps: float, block_k: int, num_k: int) -> jax.Array:
    """``rsqrt(mean(x², -1) + eps)`` (M, 1) in float32, over all K columns of the rows."""

    def body(j, acc):
        x = x_ref[:, pl.ds(pl.multiple_of(j * block_k, block_k), block_k)].astype(jnp.float32)
        return acc + jnp.sum(x * x, axis=1, keepdims=True)

    ss = jax.lax.fori_loop(0, num_k, body, jnp.zeros((x_ref.shape[0], 1), jnp.float32))
    return jax.lax.rsqrt(ss / (num_k * block_k) + eps)


def _rows(x_ref, nw_ref, scale, cols) -> jax.Array:
    """Rows ``x[:, cols]`` as the product's left operand, normalised when ``nw_ref`` is given."""
    x = x_ref[:, cols]
    if nw_ref is None:
        return x
    return (x.astype(jnp.float32) * scale).astype(x.dtype) * nw_ref[cols].astype(x.dtype)


def _tile(x: jax.Array) -> jax.Array:
    """One row (1, k) as row 0 of a zero (16, k) tile; more rows are already padded to 16."""
    if x.shape[0] == _TILE_M:
        return x
    rows = jax.lax.broadcasted_iota(jnp.int32, (_TILE_M, x.shape[1]), 0)
    return jnp.where(rows == 0, jnp.broadcast_to(x, (_TILE_M, x.shape[1])), jnp.zeros((), x.dtype))


def _untile(acc: jax.Array, m: int) -> jax.Array:
    """The (m, n) result rows of a (16, n) accumulator (row 0 alone is exact: the other rows are zero)."""
    return acc if m == _TILE_M else jnp.sum(acc, axis=0, keepdims=True)


def _pipelined(num: int, ahead: int, load, step, carry):
    """``carry = step(carry, j, load(j))`` for j in range(num), with ``load(j + ahead)`` issued before
    ``step(j)``: the next ``ahead`` tiles are requested by hand and carried (in registers) until used, so that
    several loads are in flight per program whatever Triton's own software pipelining does."""
    ahead = min(ahead, num - 1)
    if ahead <= 0:
        return jax.lax.fori_loop(0, num, lambda j, c: step(c, j, load(j)), carry)

    def body(j, queue_carry):
        queue, c = queue_carry
        return queue[1:] + (load(j + ahead),), step(c, j, queue[0])

    queue = tuple(load(j) for j in range(ahead))
    queue, carry = jax.lax.fori_loop(0, num - ahead, body, (queue, carry))
    for t, tile in enumerate(queue):
        carry = step(carry, num - ahead + t, tile)
    return carry


def _kernel(*refs, glu, has_norm, has_residual, has_side, eps, cap, block_k, num_k, prefetch, fma):
    refs = list(refs)
    x_ref = refs.pop(0)
    w_refs = [refs.pop(0) for _ in range(2 if glu else 1)]
    nw_ref = refs.pop(0) if has_norm else None
    r_ref = refs.pop(0) if has_residual else None
    sw_ref, sb_ref = (refs.pop(0), refs.pop(0)) if has_side else (None, None)
    o_ref = refs.pop(0)
    so_ref = refs.pop(0) if has_side else None
    M = x_ref.shape[0]
    f32 = jnp.float32
    scale = _rms_scale(x_ref, eps, block_k, num_k) if has_norm else None

    def cols(j, size=block_k):  # a static block index stays a Python int (multiple_of takes traced values only)
        return pl.ds(j * size if isinstance(j, int) else pl.multiple_of(j * size, size), size)

    def main():
        def load(j):  # the weight tiles of row block j
            return tuple(w_ref[cols(j), :] for w_ref in w_refs)

        if fma:  # one row: float32 multiply-adds into a (block_k, block_n) accumulator, summed over rows at the end

            def mac(accs, j, tiles):
                a = jnp.transpose(_rows(x_ref, nw_ref, scale, cols(j)).astype(f32))  # (block_k, 1)
                return tuple(acc + a * w.astype(f32) for acc, w in zip(accs, tiles, strict=True))

            acc_rows = block_k
        else:  # a matrix-unit product of the rows as a 16-row tile
            # float32 operands multiply in full float32 (Triton's default would round them to TF32)
            precision = jax.lax.Precision.HIGHEST if jnp.dtype(x_ref.dtype) == f32 else None

            def mac(accs, j, tiles):
                a = _tile(_rows(x_ref, nw_ref, scale, cols(j)))
                return tuple(
                    acc + jnp.dot(a, w, precision=precision, preferred_element_type=f32)
                    for acc, w in zip(accs, tiles, strict=True)
                )

            acc_rows = _TILE_M

        accs = (jnp.zeros((acc_rows, o_ref.shape[1]), f32),) * len(w_refs)
        accs = _pipelined(num_k, prefetch, load, mac, accs)
        ys = [(jnp.sum(acc, axis=0, keepdims=True) if fma else _untile(acc, M)).astype(o_ref.dtype) for acc in accs]
        if glu:  # silu(gate) * up, rounded after each operation as XLA does in o_ref's dtype
            g, u = (y.astype(f32) for y in ys)
            s = jax.nn.sigmoid(g).astype(o_ref.dtype).astype(f32)
            y = (g * s).astype(o_ref.dtype).astype(f32) * u
        else:
            y = ys[0]
        if r_ref is not None:
            y = y.astype(o_ref.dtype).astype(f32) + r_ref[...].astype(f32)
        o_ref[...] = y.astype(o_ref.dtype)

    if not has_side:
        main()
        return

    def side():  # float32 product with the narrow weight, exact (elementwise), a few rows of it at a time
        # One program reads all of the (K, G) weight: tiles of up to 4096 products (32 values per thread at 4
        # warps), requested ahead like the main product's, so that it does not finish long after the others.
        G = sw_ref.shape[1]
        K = block_k * num_k
        size = 1 << (K.bit_length() - 1)  # the largest power of two <= K, halved until it fits and divides K
        while size > 8 and (M * size * G > 4096 or K % size):
            size //= 2

        def mac(acc, j, w):
            x = _rows(x_ref, nw_ref, scale, cols(j, size)).astype(f32)  # (M, size)
            return acc + jnp.sum(x[:, :, None] * w.astype(f32)[None], axis=1)

        load = lambda j: sw_ref[cols(j, size), :]  # noqa: E731
        acc = _pipelined(K // size, max(prefetch, 2), load, mac, jnp.zeros((M, G), f32))
        g = acc + sb_ref[...].astype(f32)[None]
        so_ref[...] = cap * jnp.tanh(g / cap)

    pid = pl.program_id(0)
    pl.when(pid > 0)(main)
    pl.when(pid == 0)(side)


def decode_matmul_fits(K: int, N: int, config: DecodeMatmulConfig, glu: bool = False) -> bool:
    """Whether ``config`` tiles a (K, N) weight (with ``glu``: (K, 2F), N = 2F) exactly (no masked edges)."""
    cols = N // 2 if glu else N
    block_n, block_k = config.blocks(K, cols)
    return cols % block_n == 0 and K % block_k == 0 and (not glu or N % 2 == 0)


def decode_matmul_pallas(
    x: jax.Array,  # (M, K), M <= 16
    w: jax.Array,  # (K, N); with glu (K, 2F)
    *,
    norm_weight: jax.Array | None = None,  # (K,)
    norm_eps: float = 1e-6,
    glu: bool = False,
    residual: jax.Array | None = None,  # (M, N) or (M, F)
    side_weight: jax.Array | None = None,  # (K, G)
    side_bias: jax.Array | None = None,  # (G,)
    side_cap: float | None = None,
    config: DecodeMatmulConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``y = residual + act(norm(x) @ w)`` for a few rows, in one pass over w; optionally the side product.

    Args:
        x: Rows (M, K), 1 <= M <= 16; float32, bfloat16 or float16. The result has x's dtype.
        w: Weight (K, N) in x's dtype; with ``glu``, ``[gate | up]`` (K, 2F).
        norm_weight: RMSNorm weight (K,): x is first replaced by ``RMSNorm(x)`` (float32 statistics).
        norm_eps: RMSNorm epsilon.
        glu: Return ``silu(x w[:, :F]) * (x w[:, F:])`` (M, F).
        residual: Added to the result (M, N) or (M, F), in x's dtype.
        side_weight: Narrow weight (K, G) for the float32 side product ``cap * tanh((norm(x) @ side_weight +
            side_bias) / cap)`` (M, G); needs ``side_bias`` (G,) and ``side_cap``; G a power of two.
        norm_eps, side_cap: Static floats.
        config: Tiling (``DecodeMatmulConfig``); None for the default.
        interpret: None: the compiled kernel on a GPU, the same computation in XLA elsewhere; True: Pallas
            interpret mode; False: the compiled kernel (raises without a GPU).

    Returns:
        ``y`` (M, N) or (M, F) in x's dtype; with ``side_weight``, ``(y, side)`` with ``side`` (M, G) float32.

    Raises:
        ValueError: shapes that do not fit (named in the message), or a tiling that does not divide them.
        TypeError: a dtype the kernel does not read, or a config that is not a ``DecodeMatmulConfig``.
    """
    if x.ndim != 2 or not 1 <= x.shape[0] <= _TILE_M or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"decode_matmul_pallas takes x (M <= {_TILE_M}, K) and w (K, N); got {x.shape=}, {w.shape=}")
    M, K = x.shape
    N = w.shape[1]
    F = N // 2 if glu else N
    if glu and N % 2:
        raise ValueError(f"glu needs an even number of weight columns [gate | up], got {w.shape=}")
    if norm_weight is not None and norm_weight.shape != (K,):
        raise ValueError(f"norm_weight.shape={norm_weight.shape} must be (K,)=({K},) for {x.shape=}")
    if residual is not None and residual.shape != (M, F):
        raise ValueError(f"residual.shape={residual.shape} must be (M, {'F' if glu else 'N'})={(M, F)}")
    has_side = side_weight is not None
    if has_side:
        G = side_weight.shape[-1]
        if side_weight.shape != (K, G) or side_bias is None or side_bias.shape != (G,) or side_cap is None:
            raise ValueError(
                f"the side product needs side_weight (K, G), side_bias (G,) and side_cap; got side_weight.shape="
                f"{side_weight.shape}, side_bias.shape={None if side_bias is None else side_bias.shape}, "
                f"{side_cap=} for K={K}"
            )
        if G & (G - 1):
            raise ValueError(f"side_weight.shape={side_weight.shape}: G must be a power of two")
    elif side_bias is not None or side_cap is not None:
        raise ValueError("side_bias and side_cap need side_weight")
    check_kernel_dtypes(x=x, w=w, residual=residual)
    if jnp.dtype(w.dtype) != jnp.dtype(x.dtype):
        raise TypeError(f"w.dtype={w.dtype} must be x.dtype={x.dtype} (cast the weight to the compute dtype)")
    if config is None:
        config = DecodeMatmulConfig()
    elif not isinstance(config, DecodeMatmulConfig):
        raise TypeError(f"config must be a DecodeMatmulConfig or None, got {type(config).__name__}")
    if not decode_matmul_fits(K, N, config, glu):
        raise ValueError(f"{config} does not tile w.shape={w.shape} exactly (see decode_matmul_fits)")
    mode = kernel_mode(interpret)
    if mode == "xla":
        return _xla(x, w, norm_weight, norm_eps, glu, residual, side_weight, side_bias, side_cap)

    block_n, block_k = config.blocks(K, F)
    num_col_blocks = F // block_n
    rows = M if M == 1 else _TILE_M
    pad = (lambda t: t) if rows == M else (lambda t: jnp.pad(t, ((0, rows - M), (0, 0))))
    # The side program is program 0, so that it starts first: it walks all of its (K, G) weight alone. The
    # column blocks are programs 1.. (its block indices clamped for program 0, which does not write them).
    col = (lambda j: jnp.maximum(j - 1, 0)) if has_side else (lambda j: j)
    inputs: list[Any] = [pad(x), w]
    in_specs = [pl.BlockSpec((rows, K), lambda j: (0, 0)), pl.BlockSpec((K, block_n), lambda j: (0, col(j)))]
    if glu:
        inputs.append(w)
        in_specs.append(pl.BlockSpec((K, block_n), lambda j: (0, col(j) + num_col_blocks)))
    if norm_weight is not None:
        inputs.append(norm_weight)
        in_specs.append(pl.BlockSpec((K,), lambda j: (0,)))
    if residual is not None:
        inputs.append(pad(residual))
        in_specs.append(pl.BlockSpec((rows, block_n), lambda j: (0, col(j))))
    out_shape = [jax.ShapeDtypeStruct((rows, F), x.dtype)]
    out_specs = [pl.BlockSpec((rows, block_n), lambda j: (0, col(j)))]
    if has_side:
        inputs += [side_weight, side_bias]
        in_specs += [pl.BlockSpec((K, G), lambda j: (0, 0)), pl.BlockSpec((G,), lambda j: (0,))]
        out_shape.append(jax.ShapeDtypeStruct((rows, G), jnp.float32))
        out_specs.append(pl.BlockSpec((rows, G), lambda j: (0, 0)))
    kernel = functools.partial(
        _kernel,
        glu=glu,
        has_norm=norm_weight is not None,
        has_residual=residual is not None,
        has_side=has_side,
        eps=float(norm_eps),
        cap=None if side_cap is None else float(side_cap),
        block_k=block_k,
        num_k=K // block_k,
        prefetch=config.prefetch,
        fma=config.fma and M == 1,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(num_col_blocks + has_side,),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=mode == "interpret",
        name="decode_matmul",
    )(*inputs)
    outs = [o[:M] for o in outs]
    return (outs[0], outs[1]) if has_side else outs[0]


def _xla(x, w, norm_weight, norm_eps, glu, residual, side_weight, side_bias, side_cap):
    """The kernel's computation in XLA (the fallback without a GPU), with the same roundings."""
    f32 = jnp.float32
    if norm_weight is not None:
        xf = x.astype(f32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + norm_eps)
        x = xf.astype(x.dtype) * norm_weight.astype(x.dtype)
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(x.dtype).itemsize >= 4 else None
    # The product as the model writes it (``blocks/dense.project``: result in x's dtype), so that
    # benchmarks/decode_matmul.py times the model's HLO. A float32 result then a convert timed 2-3x the
    # model's products there; whether this form is the cause is not yet measured.
    y = jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), precision=precision)
    if glu:
        g, u = jnp.split(y, 2, axis=-1)
        y = jax.nn.silu(g) * u
    if residual is not None:
        y = y + residual
    if side_weight is None:
        return y
    s = jnp.dot(x.astype(f32), side_weight.astype(f32), precision=jax.lax.Precision.HIGHEST) + side_bias.astype(f32)
    return y, side_cap * jnp.tanh(s / side_cap)
