"""Device-side time of the decode step, kernel by kernel, against a copy kernel of the same bytes.

Run on a GPU from the repository root::

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/step_trace.py [--batch 1,8,32,128] [--json out.json]

``benchmarks/kernels.py`` times whole steps from the host. This script says where that time goes: each
variant runs ``--steps`` steps in one jitted ``fori_loop`` over one donated state (NH=8, DHQK=256, DHV=512,
float32 state, bfloat16 inputs) under ``jax.profiler``, and the trace gives, per step, the time of the step's
main kernel (median), the other kernels XLA launches around it (the DHQK-split epilogue, copies of the fresh
n and m into the loop carry), and the span from the first kernel's start to the last one's end. The same
loop over a copy of the state (``c * a``, read and written once, in place) gives what moving the state's
bytes costs on its own, by XLA's fused loop, by a Pallas (Triton) kernel with the Triton step's tiles or
with one 16-byte vector per thread (as XLA's), and by a Mosaic GPU kernel with the Mosaic step's pipeline:
the floor a step kernel can reach on this device, next to the nominal one (bytes at 4.27 TB/s).
Each variant is first checked against the XLA step on the same inputs (max |diff| / max |ref|).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from benchmarks.kernels import COPY_TBPS, step_bytes, step_inputs
from xlstm_jax.kernels import StepKernelConfig, recurrent_step_pallas
from xlstm_jax.mlstm.recurrent import recurrent_step_fw

F32 = jnp.float32
WARMUP_S = 0.5
C = StepKernelConfig
VARIANTS = {  # name: step function (bvX-sY-bkZ-wW as in benchmarks/kernels.py)
    "xla": recurrent_step_fw,
    "default": recurrent_step_pallas,  # backend="auto": the Mosaic kernel where it runs, else the Triton one
    "triton": functools.partial(recurrent_step_pallas, config=C(backend="triton", dhqk_splits=4)),
    "mosaic-d2": functools.partial(recurrent_step_pallas, config=C(backend="mosaic")),
    "mosaic-d3": functools.partial(recurrent_step_pallas, config=C(backend="mosaic", pipeline_depth=3)),
    "bv64-s8-bk32-w4": functools.partial(recurrent_step_pallas, config=C(64, 32, 8, num_warps=4, backend="triton")),
}


def trace(fn, arg, steps: int) -> dict:
    """Runs ``fn(arg)`` under the profiler; per-step kernel statistics of the GPU's compute stream.

    ``fn`` first runs for ``WARMUP_S`` seconds: an idle H200 sits at a low SM clock (345 MHz seen), and a
    trace of a few milliseconds taken straight away measures the clock ramp, not the kernels. When ``fn``
    returns ``arg``'s structure (a loop over a donated state), each run starts from the last one's result.
    """
    from jax.profiler import ProfileData

    start = time.perf_counter()
    while time.perf_counter() - start < WARMUP_S:
        out = jax.block_until_ready(fn(arg))
        if jax.tree.structure(out) == jax.tree.structure(arg):  # a donated arg is gone: go on from the result
            arg = out
    directory = tempfile.mkdtemp()
    jax.profiler.start_trace(directory)
    jax.block_until_ready(fn(arg))
    jax.profiler.stop_trace()
    data = ProfileData.from_file(str(sorted(Path(directory).rglob("*.xplane.pb"))[-1]))
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            events = list(line.events)
            if not line.name.startswith("Stream") or len(events) < steps:
                continue
            durations = collections.defaultdict(list)
            for e in events:
                durations[e.name].append(e.duration_ns / 1e3)
            main = max(durations, key=lambda n: sum(durations[n]))
            span = max(e.start_ns + e.duration_ns for e in events) - min(e.start_ns for e in events)
            return {
                "main": main,
                "main_us": float(np.median(durations[main])),
                "other_us": sum(sum(d) for n, d in durations.items() if n != main) / steps,
                "other_kernels": (len(events) - len(durations[main])) / steps,
                "span_us": span / 1e3 / steps,
                "kernels": len(events) / steps,
            }
    return {}


def copy_pallas(c, a, rows: int, cols: int, warps: int):
    """``c * a`` in place, one (rows, cols) tile per program, in the step kernel's grid order."""
    BH, DHQK, DHV = c.shape

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
        name="copy_probe",
    )(c, a)


def copy_mosaic(c, a, rows: int = 64, cols: int = 64, depth: int = 2):
    """``c * a`` in place by a Mosaic GPU kernel with the Mosaic step kernel's pipeline: (rows, cols) tiles
    copied into shared memory and back by the TMA engine, ``depth`` in flight per program."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from xlstm_jax.kernels.recurrent_step_mosaic import load_ref

    BH, DHQK, DHV = c.shape
    swizzled = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))

    def body(c_ref, a_ref):
        bh, vb = jax.lax.axis_index("bh"), jax.lax.axis_index("vb")
        scale = a_ref[0]

        def tile(_, c_smem, out_smem):
            out_smem[...] = load_ref(c_smem, plgpu.Layout.WGMMA) * scale

        spec = plgpu.BlockSpec((rows, cols), lambda j: (j, vb), transforms=swizzled)
        plgpu.emit_pipeline(tile, grid=(DHQK // rows,), in_specs=[spec], out_specs=[spec], max_concurrent_steps=depth)(
            c_ref.at[bh], c_ref.at[bh]
        )

    mesh = plgpu.Mesh(grid=(BH, DHV // cols), grid_names=("bh", "vb"))
    c_ref = jax.new_ref(c, memory_space=plgpu.GMEM)
    pl.kernel(body, out_type=(), mesh=mesh, name="copy_probe_mosaic")(c_ref, a)
    return jax.freeze(c_ref)


def run_loop(body, init, steps: int):
    """Wall µs per step of a jitted fori_loop (warmed up), and the trace of one more run."""
    run = jax.jit(lambda s: jax.lax.fori_loop(0, steps, body, s), donate_argnums=(0,))
    state = jax.block_until_ready(run(init))
    t0 = time.perf_counter()
    state = jax.block_until_ready(run(state))
    wall = (time.perf_counter() - t0) / steps * 1e6
    return wall, trace(run, state, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,8,32,128")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for B in (int(b) for b in args.batch.split(",")):
        floor = step_bytes(B) / COPY_TBPS * 1e6
        states, x = step_inputs(B, seed=1)
        h_ref, s_ref = jax.jit(lambda *a: recurrent_step_fw(*a, eps=1e-6))(*states, *x)
        print(f"B={B}: floor {floor:.1f} us (state read and written once at {COPY_TBPS / 1e12:.2f} TB/s)", flush=True)
        for name in args.variants.split(","):
            step = VARIANTS[name]
            h, s = jax.jit(lambda *a, step=step: step(*a, eps=1e-6))(*step_inputs(B, seed=1)[0], *x)
            ref = np.asarray(h_ref, np.float32)
            err = float(np.max(np.abs(np.asarray(h, np.float32) - ref)) / np.max(np.abs(ref)))
            err_c = float(np.max(np.abs(np.asarray(s[0]) - np.asarray(s_ref[0]))))

            def body(_, carry, step=step, x=x):
                c, n, m, _h = carry
                h, (c, n, m) = step(c, n, m, *x, eps=1e-6)
                return c, n, m, h

            init = (*step_inputs(B)[0], jnp.zeros(x[2].shape, x[0].dtype))
            wall, t = run_loop(body, init, args.steps)
            rows.append({"B": B, "variant": name, "wall_us": wall, "floor_us": floor, "err_h": err, **t})
            if not t:  # no GPU in the trace (a CPU run checks the script only)
                print(f"  {name:18s} wall {wall:7.1f} us (no GPU kernels traced) | err h {err:.1e}, c {err_c:.1e}")
                continue
            print(
                f"  {name:18s} wall {wall:7.1f} span {t['span_us']:7.1f} = {t['span_us'] / floor:.3f}x | "
                f"main {t['main_us']:7.1f} ({t['main_us'] / floor:.3f}x) + {t['other_us']:5.1f} us in "
                f"{t['other_kernels']:.0f} other kernels | err h {err:.1e}, c {err_c:.1e}",
                flush=True,
            )
        c = states[0].reshape(B * 8, 256, 512)
        a = jnp.full((1,), 1.0001, F32)
        copies = {"xla_copy": lambda c, a=a: c * a[0]}
        copies["pallas_copy_64x64_w4"] = functools.partial(copy_pallas, a=a, rows=64, cols=64, warps=4)
        # one 16-byte vector per thread, as XLA's copy: the fastest a Pallas kernel moved c (copy_ceiling.py)
        copies["pallas_copy_1x512_w4"] = functools.partial(copy_pallas, a=a, rows=1, cols=512, warps=4)
        copies["mosaic_copy_64x64_d2"] = functools.partial(copy_mosaic, a=a)
        if jax.default_backend() != "gpu":
            continue
        for name, fn in copies.items():
            wall, t = run_loop(lambda _, c, fn=fn: fn(c), jnp.copy(c), args.steps)
            rows.append({"B": B, "variant": name, "wall_us": wall, "floor_us": floor, **t})
            tbps = step_bytes(B) / t["main_us"] / 1e6
            print(
                f"  {name:18s} wall {wall:7.1f} span {t['span_us']:7.1f} | kernel {t['main_us']:7.1f} "
                f"({t['main_us'] / floor:.3f}x, {tbps:.2f} TB/s)",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"jax": jax.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
