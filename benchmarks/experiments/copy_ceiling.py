"""Probe: how fast can a kernel move the decode step's state on this GPU? Copies of c, by access pattern.

Run on a GPU from the repository root::

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/experiments/copy_ceiling.py [--batch 32,128]

The decode step must read and write c (B·NH·DHQK·DHV float32) once; the fastest conceivable step is a copy.
Each variant scales c by 1.0001 in place (or, ``tma``, copies it unchanged) inside one jitted ``fori_loop``
of 64 steps over a donated buffer, and the profiler gives the kernel's median device time per step, against
the floor (bytes read + written at 4.27 TB/s). The variants:

* ``xla``: XLA's own elementwise loop (on an H200: a grid of 128-thread blocks, one 16-byte vector per thread).
* ``triton-RxC-wW``: a Pallas (Triton) kernel, one (R, C) tile of c per program, W warps
  (``benchmarks.step_trace.copy_pallas``); R·C / (32·W) floats per thread.
* ``tma-...``: a Mosaic GPU kernel in which each program copies ``tiles`` tiles of c through shared memory
  with the TMA engine, all of them in flight at once (``slots`` = ``tiles``), as the Mosaic step kernel does:
  ``strided`` tiles are a 64x64 block of one head's rows and columns (the step kernel's layout), ``contig``
  tiles are contiguous in memory (c viewed as (N, 64) or (N, 256)); ``reg`` passes the tile through
  registers (WGMMA layout) and scales it, ``tma`` stores the shared-memory tile straight back.

What it showed (seventh session, BENCHMARKS.md): only kernels whose programs each move 2-4 KiB reach XLA's
copy (1.00x at B=128, 1.035x at B=32); 16-64 KiB programs, Triton or TMA, take 1.07-1.08x at B=32. A step
kernel, whose programs must each reduce a head's rows for h, cannot be built from 2-4 KiB programs.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from benchmarks.kernels import COPY_TBPS, STEP_SHAPE, step_bytes
from benchmarks.step_trace import copy_pallas, run_loop

F32 = jnp.float32
SCALE = 1.0001


def tma_copy(x, a, *, tile: tuple[int, int], tiles: int, swizzle: bool, registers: bool):
    """x (R, C) in place, scaled by a[0] (``registers``) or copied; program (p, cb) owns ``tiles`` consecutive
    row tiles of column block cb, all requested at once."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from xlstm_jax.kernels.recurrent_step_mosaic import load_ref

    R, C = x.shape
    tr, tc = tile
    transforms = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)) if swizzle else ()

    def body(x_ref, a_ref):
        p, cb = lax.axis_index("p"), lax.axis_index("cb")

        def scoped(buf, barrier):
            def block(t):
                return x_ref.at[pl.ds((p * tiles + t) * tr, tr), pl.ds(cb * tc, tc)]

            for t in range(tiles):
                plgpu.copy_gmem_to_smem(block(t), buf.at[t], barrier.at[t])
            for t in range(tiles):
                plgpu.barrier_wait(barrier.at[t])
                if registers:
                    buf.at[t][...] = load_ref(buf.at[t], plgpu.Layout.WGMMA) * a_ref[0]
                    plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(buf.at[t], block(t))
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            plgpu.SMEM((tiles, tr, tc), F32, transforms=transforms),
            plgpu.Barrier(num_arrivals=1, num_barriers=tiles),
        )

    x_ref = jax.new_ref(x, memory_space=plgpu.GMEM)
    mesh = plgpu.Mesh(grid=(R // (tr * tiles), C // tc), grid_names=("p", "cb"))
    pl.kernel(body, out_type=(), mesh=mesh, name="tma_copy")(x_ref, a)
    return jax.freeze(x_ref)


def variants(a):
    """name: (view of c (BH, DHQK, DHV) as a function of BH, copy function, scales?)."""
    NH, DHQK, DHV = STEP_SHAPE
    heads = lambda BH: (BH, DHQK, DHV)  # noqa: E731
    v = {"xla": (heads, lambda c: c * a[0], True)}
    for rows, cols, warps in [(1, 512, 4), (2, 512, 4), (4, 512, 4), (8, 512, 4), (32, 512, 8), (64, 64, 4)]:
        fn = functools.partial(copy_pallas, a=a, rows=rows, cols=cols, warps=warps)
        v[f"triton-{rows}x{cols}-w{warps}"] = (heads, fn, True)
    rows_view = lambda BH: (BH * DHQK, DHV)  # noqa: E731
    flat = lambda width: lambda BH: (BH * DHQK * DHV // width, width)  # noqa: E731
    for name, view, tile, tiles, swizzle, registers in [
        ("strided-64x64-reg", rows_view, (64, 64), 4, True, True),
        ("strided-64x64-tma", rows_view, (64, 64), 4, True, False),
        ("contig-64x64-reg", flat(64), (64, 64), 4, True, True),
        ("contig-64x256-tma", flat(256), (64, 256), 2, False, False),
    ]:
        fn = functools.partial(tma_copy, a=a, tile=tile, tiles=tiles, swizzle=swizzle, registers=registers)
        v[f"tma-{name}"] = (view, fn, registers)
    return v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="32,128")
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    a = jnp.full((1,), SCALE, F32)
    NH, DHQK, DHV = STEP_SHAPE
    print("| B | variant | kernel µs | x floor | TB/s |\n|---:|---|---:|---:|---:|")
    for B in (int(b) for b in args.batch.split(",")):
        floor = step_bytes(B) / COPY_TBPS * 1e6
        c = jax.random.normal(jax.random.key(0), (B * NH, DHQK, DHV), F32)
        for name, (view, fn, scales) in variants(a).items():
            if jax.default_backend() != "gpu" and name != "xla":
                continue  # Pallas kernels run compiled only here: a CPU run checks the script on XLA's copy
            x = c.reshape(view(B * NH))
            want = np.asarray(x[:4]) * (np.float32(SCALE) if scales else np.float32(1))
            got = np.asarray(jax.jit(fn)(jnp.copy(x))[:4])
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
            _, t = run_loop(lambda _, y, fn=fn: fn(y), jnp.copy(x), args.steps)
            if not t:
                print(f"| {B} | {name} | (no GPU kernel traced) | | |")
                continue
            us = t["main_us"]
            print(f"| {B} | {name} | {us:.1f} | {us / floor:.3f} | {step_bytes(B) / us / 1e6:.2f} |", flush=True)


if __name__ == "__main__":
    main()
