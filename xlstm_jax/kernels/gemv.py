"""A vector-matrix product ``x (K,) @ w (K, N)`` as a Pallas kernel: the projections of one decoded token.

At batch 1 every projection of a decode step is bound by reading its weight once. XLA's Triton GEMM for
one row tiles the columns 128 wide, which leaves an H200's 132 multiprocessors partly idle for the mLSTM
layer's qkvo product (96 tiles; 85% of the copy bandwidth) and splits the others' rows into many short
pieces (out-proj 72%). Here a program owns ``block_n`` columns and one of ``splits`` row ranges, walks its
rows ``block_k`` at a time with the next row block requested one iteration ahead (by hand), multiplies and
accumulates elementwise in float32, and reduces over rows once at the end. With ``splits > 1`` each program
writes a float32 partial row; XLA sums the partials (a reduction it fuses into the product's consumer).

Grid (N / block_n, splits), column blocks fastest: programs launched together read neighbouring columns of
the same rows, so whole rows of w are streamed contiguously.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from xlstm_jax.kernels.config import GemvConfig, check_kernel_dtypes, kernel_mode

__all__ = ["gemv_fits", "gemv_pallas"]


def _gemv_kernel(x_ref, w_ref, o_ref, *, block_k: int, num_blocks: int):
    f32 = jnp.float32

    def load(j):
        rows = (
            pl.ds(j * block_k, block_k) if isinstance(j, int) else pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        )
        return x_ref[rows], w_ref[rows, :]

    def accumulate(acc, tile):
        x, w = tile
        return acc + x.astype(f32)[:, None] * w.astype(f32)

    def body(j, carry):
        tile, acc = carry
        nxt = load(j + 1)
        return nxt, accumulate(acc, tile)

    acc = jnp.zeros((block_k, o_ref.shape[-1]), f32)
    last = load(0)
    if num_blocks > 1:
        last, acc = jax.lax.fori_loop(0, num_blocks - 1, body, (last, acc))
    o_ref[...] = jnp.sum(accumulate(acc, last), axis=0)


def gemv_fits(K: int, N: int, config: GemvConfig) -> bool:
    """Whether ``config`` tiles a (K, N) weight exactly (the kernel has no masked edges)."""
    block_n, block_k, splits = config.blocks(K, N)
    return N % block_n == 0 and K % (block_k * splits) == 0


def gemv_pallas(
    x: jax.Array,  # (1, K) or (K,)
    w: jax.Array,  # (K, N)
    *,
    out_dtype=None,
    config: GemvConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """``x @ w`` for one row x, accumulated in float32, returned in ``out_dtype`` (default x's dtype).

    Args:
        x: The row, shape (K,) or (1, K); float32, bfloat16 or float16.
        w: The matrix (K, N), same dtype family; read once.
        out_dtype: Dtype of the result.
        config: Tiling (``GemvConfig``); None for the default.
        interpret: None: the compiled kernel on a GPU, ``jnp.dot`` (float32 accumulation) elsewhere; True:
            Pallas interpret mode; False: the compiled kernel (raises without a GPU).

    Returns:
        The product, shaped like x with its last dim N: (N,) or (1, N).

    Raises:
        ValueError: the shapes do not fit (x not one row of length K, or the tiling does not divide
            (K, N): see ``gemv_fits``).
        TypeError: a dtype the kernel does not read, or a config that is not a ``GemvConfig``.
    """
    if x.ndim not in (1, 2) or (x.ndim == 2 and x.shape[0] != 1) or w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"gemv_pallas takes x (K,) or (1, K) and w (K, N), got {x.shape=} and {w.shape=}")
    check_kernel_dtypes(x=x, w=w)
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    if config is None:
        config = GemvConfig()
    elif not isinstance(config, GemvConfig):
        raise TypeError(f"config must be a GemvConfig or None, got {type(config).__name__}")
    K, N = w.shape
    if not gemv_fits(K, N, config):
        raise ValueError(f"{config} does not tile w.shape={w.shape} exactly (see gemv_fits)")
    mode = kernel_mode(interpret)
    if mode == "xla":
        y = jnp.dot(x.reshape(1, K), w, preferred_element_type=jnp.float32)
        return y.astype(out_dtype).reshape(*x.shape[:-1], N)
    block_n, block_k, splits = config.blocks(K, N)
    rows = K // splits
    partials = pl.pallas_call(
        functools.partial(_gemv_kernel, block_k=block_k, num_blocks=rows // block_k),
        out_shape=jax.ShapeDtypeStruct((splits, N), jnp.float32),
        grid=(N // block_n, splits),
        in_specs=[
            pl.BlockSpec((None, rows), lambda j, s: (s, 0)),
            pl.BlockSpec((None, rows, block_n), lambda j, s: (s, 0, j)),
        ],
        out_specs=pl.BlockSpec((None, block_n), lambda j, s: (s, j)),
        compiler_params=pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=mode == "interpret",
        name="gemv",
    )(x.reshape(splits, rows), w.reshape(splits, rows, N))
    return partials.sum(axis=0).astype(out_dtype).reshape(*x.shape[:-1], N)
