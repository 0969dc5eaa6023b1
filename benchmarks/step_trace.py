"""Device-side time of the decode step, kernel by kernel, against copy kernels of the same bytes.

Reproduces BENCHMARKS.md's table of where the decode step's time goes (an H200)::

    PYTHONPATH=. python3 benchmarks/step_trace.py --json step_trace.json

and on a CPU at tiny shapes (a smoke test: the Pallas kernels in interpret mode, no GPU kernels to trace):
``PYTHONPATH=. python benchmarks/step_trace.py --batch 1 --step-shape 2 16 32 --steps 4 --repeats 1``.

``benchmarks/kernels.py`` times whole steps. This script says where that time goes: each variant (the names
of ``kernels.py``; ``--sweep`` for its tilings) runs ``--steps`` steps in one jitted ``fori_loop`` over one
donated state (NH=8, DHQK=256, DHV=512, float32 state, bfloat16 inputs; ``--step-shape``), timed by
``benchmarks/harness.py`` (``wall``: median per step), and one more loop runs under ``jax.profiler``. The trace
gives, per step, the median time of the step's main kernel, the time of the other kernels XLA launches around
it (the DHQK-split epilogue, copies of the fresh n and m into the loop carry), and the span from the first
kernel's start to the last one's end.

The same loop over a copy of c (``c * a``, read and written once, in place) gives what moving the state's
bytes costs on its own: by XLA's fused loop, and by a Pallas (Triton) kernel in the step's 64 x 64 tiles or
with one row of 512 columns per program (a 16-byte vector per thread, as XLA's copy). That is the floor a
step kernel can reach on this device, beside the nominal one: the state read and written once,
``2·B·NH·(DHQK·DHV + DHQK + 1)·4`` bytes, at the copy bandwidth (B=128: 1.08 GB, 0.252 ms at 4.27 TB/s).
Each step variant is first checked against the XLA step on the same inputs (bounds of ``kernels.py``).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from benchmarks.harness import Column, Report, add_arguments, ceilings_from_arguments, hardware_floor, time_loop
from benchmarks.kernels import carried, check_step, step_bytes, step_inputs, step_sweep, step_variant

F32 = jnp.float32


def copy_pallas(c: jax.Array, a: jax.Array, rows: int, cols: int, warps: int, interpret: bool) -> jax.Array:
    """``c * a[0]`` in place, one (rows, cols) tile per program, grid in the Triton step kernel's order.

    Args:
        c: (B·NH, DHQK, DHV) float32.
        a: (1,) float32.
        rows, cols: The tile; clipped to (DHQK, DHV).
        warps: Triton warps per program.
        interpret: Pallas interpret mode (off a GPU).
    """
    BH, DHQK, DHV = c.shape
    rows, cols = min(rows, DHQK), min(cols, DHV)

    def kernel(c_ref, a_ref, o_ref):
        o_ref[...] = c_ref[...] * a_ref[0]

    spec = pl.BlockSpec((None, rows, cols), lambda vb, ks, bh: (bh, ks, vb))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(c.shape, F32),
        grid=(DHV // cols, DHQK // rows, BH),
        in_specs=[spec, pl.BlockSpec((1,), lambda *_: (0,))],
        out_specs=spec,
        input_output_aliases={0: 0},
        compiler_params=pl_triton.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="copy_probe",
    )(c, a)


COLUMNS = [
    Column("B", "B", width=4),
    Column("variant", "variant", width=26),
    Column("wall us", "median_s", ".1f", 1e6),
    Column("floor us", "floor_s", ".1f", 1e6),
    Column("floor/wall", "floor_fraction", ".3f"),
    Column("span us", "trace_span_us", ".1f"),
    Column("floor/span", "span_floor_fraction", ".3f"),
    Column("main us", "trace_main_us", ".1f"),
    Column("floor/main", "main_floor_fraction", ".3f"),
    Column("other us", "trace_other_us", ".1f"),
    Column("kernels", "trace_kernels", ".1f"),
    Column("err h", "err_h", ".1e"),
    Column("ok", "ok", width=5),
]


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark; returns the report's data (what ``--json`` writes)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16, 32, 128])
    p.add_argument("--step-shape", type=int, nargs=3, default=[8, 256, 512], metavar=("NH", "DHQK", "DHV"))
    p.add_argument("--sweep", action="store_true", help="add the tilings of kernels.py's step_sweep")
    p.add_argument("--variants", nargs="+", default=None, help="run only these variants (names as printed)")
    p.add_argument("--steps", type=int, default=64, help="steps per jitted loop")
    add_arguments(p, repeats=5)
    a = p.parse_args(argv)
    report = Report("step_trace", "benchmarks/step_trace.py", vars(a), a.json, argv)
    ceilings = ceilings_from_arguments(a, report)
    interpret = None if jax.default_backend() == "gpu" else True  # off a GPU: Pallas interpret mode
    shape = tuple(a.step_shape)
    variants = {k: v for k, v in step_sweep(shape, a.sweep).items() if not a.variants or k in a.variants}
    report.table("step_trace", COLUMNS)

    def add(row, timing, floor):
        row.update(timing.as_row(), floor_s=floor.seconds, bytes=floor.bytes_moved)
        row["floor_fraction"] = floor.fraction(timing.median_s)
        if timing.trace:
            row["span_floor_fraction"] = floor.fraction(timing.trace["span_us"] * 1e-6)
            row["main_floor_fraction"] = floor.fraction(timing.trace["main_us"] * 1e-6)
        report.add("step_trace", row)

    for B in a.batch:
        floor = hardware_floor(bytes_moved=step_bytes(B, shape), bandwidth=ceilings.copy_bytes_per_s)
        for seed, (name, cfg) in enumerate(variants.items(), start=1):
            step = step_variant(cfg, interpret)
            if step is None:
                report.note(f"B={B} {name}: skipped (the Mosaic kernel runs compiled on a GPU only)")
                continue
            try:
                check = check_step(step, B, shape, seed) if cfg is not None else {}
                states, x = step_inputs(B, shape)
                init = (*states, jnp.zeros(x[2].shape, x[0].dtype))
                call = carried(step)
                body = lambda carry, call=call, x=x: call(*carry, *x)
                timing = time_loop(body, init, a.steps, repeats=a.repeats, trace=True)
            except Exception as exc:  # a config that does not compile is reported, not fatal
                report.note(f"B={B} {name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                continue
            add({"B": B, "variant": name, **check}, timing, floor)
        NH, DHQK, DHV = shape
        scale = jnp.full((1,), 1.0001, F32)
        copies = {
            "xla_copy": lambda c, scale=scale: c * scale[0],
            "pallas_copy_64x64_w4": functools.partial(
                copy_pallas, a=scale, rows=64, cols=64, warps=4, interpret=bool(interpret)
            ),
            "pallas_copy_1x512_w4": functools.partial(
                copy_pallas, a=scale, rows=1, cols=512, warps=4, interpret=bool(interpret)
            ),
        }
        for name, fn in copies.items():
            if a.variants and name not in a.variants:
                continue
            c = step_inputs(B, shape)[0][0].reshape(B * NH, DHQK, DHV)
            timing = time_loop(fn, c, a.steps, repeats=a.repeats, trace=True)
            add({"B": B, "variant": name}, timing, floor)
    return report.data


if __name__ == "__main__":
    main()
