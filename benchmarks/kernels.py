"""Times the fused Pallas mLSTM kernels against this library's XLA step and scan, with correctness checks.

Run on a GPU from the repository root::

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/kernels.py --json out.json

Shapes (issue 4): decode step NH=8, DHQK=256, DHV=512, float32 state, bfloat16 inputs, B in {1, 8, 32, 128};
sequence B=8, S in {512, 2048} at the same head shape, and NH=4, DHQK=DHV=64, B=16, S=2048.

Floors: the step must read and write its state once (bytes / copy ceiling). The sequence has two: the
per-step floor of the literal recurrence, 5 float32 FLOPs per state element and time step (c update
f'c + (i'k)v: 3; read-out q̂·c: 2) at the fp32 non-tensor rate (the issue's ~1.3 ms at B=8, S=2048); and
each variant's own floor, the matrix-product FLOPs of its closed-form blocks at the bf16 matrix-unit rate or
the bytes of q, k, v, h at the copy ceiling, whichever is larger. Each table row gives the time, floor / time,
and the XLA scan's time / this row's. The XLA chunkwise form runs in the same table for comparison.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

from tests.numerics import TOL
from xlstm_jax.kernels import SequenceKernelConfig, StepKernelConfig, recurrent_sequence_pallas, recurrent_step_pallas
from xlstm_jax.mlstm.chunkwise import chunkwise_fw
from xlstm_jax.mlstm.recurrent import recurrent_sequence_fw, recurrent_step_fw

COPY_TBPS = 4.27e12  # measured device-to-device copy ceiling of the H200 (bytes read + written per second)
FP32_FLOPS = 67e12  # fp32 non-tensor FMA rate, counting an FMA as 2 FLOPs
BF16_FLOPS = 700e12  # dense bf16 matrix-unit rate measured on this H200 (600-700 TFLOP/s; forms.py uses 700)
F32, BF16 = jnp.float32, jnp.bfloat16
INTERPRET = False  # --smoke: tiny shapes in Pallas interpret mode, to check this script without a GPU


def _median_time(fn, reps: int) -> float:
    """Median wall time of ``fn()`` (which blocks on its result) over ``reps`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rel_err(ref, out) -> float:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def measure_copy() -> float:
    x = jax.random.normal(jax.random.key(0), ((1 if INTERPRET else 256) * 1024 * 1024,), F32)  # 1 GiB
    copy = jax.jit(lambda x: x * 1.0001)

    def run():
        copy(x).block_until_ready()

    return 2 * x.nbytes / _median_time(run, 10)


# ---------------------------------------------------------------------------------------------------------
# Decode step
# ---------------------------------------------------------------------------------------------------------
STEP_SHAPE = (8, 256, 512)  # NH, DHQK, DHV of the decode-step benchmark


def step_inputs(B, seed=0):
    NH, DHQK, DHV = STEP_SHAPE
    ks = jax.random.split(jax.random.key(seed), 8)
    states = (
        jax.random.normal(ks[0], (B, NH, DHQK, DHV), F32),
        jax.random.normal(ks[1], (B, NH, DHQK), F32),
        jax.random.uniform(ks[2], (B, NH, 1), F32, -2.0, 2.0),
    )
    x = (
        jax.random.normal(ks[3], (B, NH, DHQK), BF16),
        jax.random.normal(ks[4], (B, NH, DHQK), BF16),
        jax.random.normal(ks[5], (B, NH, DHV), BF16),
        jax.random.normal(ks[6], (B, NH, 1), BF16),
        (3.0 + jax.random.normal(ks[7], (B, NH, 1), F32)).astype(BF16),
    )
    return states, x


# How a step is timed: calls queued from Python (state donated); a jitted fori_loop over one state, plain
# and unrolled 8 times; the step repeated in straight-line code (unrolled fully; XLA may then fuse the
# elementwise state updates of consecutive XLA steps, so this mode flatters the XLA step).
STEP_MODES = ("queued", "loop", "loop8", "unrolled")


def _jit_step(step):
    """``step`` jitted as ``(c, n, m, q, k, v, i, f) -> (h, (c', n', m'))`` with the state donated."""

    def call(c, n, m, q, k, v, i, f):
        return step(c=c, n=n, m=m, q=q, k=k, v=v, i=i, f=f, eps=1e-6)

    return call, jax.jit(call, donate_argnums=(0, 1, 2))


def time_step(step, B, modes=STEP_MODES, n_queued=100, n_loop=256, unroll_full=32, reps=5):
    """Per-step times of ``step(c, n, m, q, k, v, i, f)``: calls queued (donated), and inside jitted loops."""
    if INTERPRET:
        n_queued, n_loop, unroll_full, reps = 2, 8, 2, 1
    _, x = step_inputs(B)
    call, jitted = _jit_step(step)
    holder = {"s": step_inputs(B)[0]}

    def queued():
        s = holder["s"]
        for _ in range(n_queued):
            h, s = jitted(*s, *x)
        jax.block_until_ready((h, s))
        holder["s"] = s

    def loop_fn(length, unroll):
        def body(_, carry):
            c, n, m, _h = carry
            h, (c, n, m) = call(c, n, m, *x)
            return c, n, m, h

        @functools.partial(jax.jit, donate_argnums=(0,))
        def run(s):
            h0 = jnp.zeros(x[2].shape, x[0].dtype)
            return jax.lax.fori_loop(0, length, body, (*s, h0), unroll=unroll)

        return run

    results = {"queued": _median_time(queued, reps) / n_queued} if "queued" in modes else {}
    for name, length, unroll in (("loop", n_loop, 1), ("loop8", n_loop, 8), ("unrolled", unroll_full, True)):
        if name not in modes:
            continue
        run = loop_fn(length, unroll)
        holder2 = {"s": step_inputs(B)[0]}

        def looped(run=run, holder2=holder2):
            out = run(holder2["s"])
            jax.block_until_ready(out)
            holder2["s"] = out[:3]

        results[name] = _median_time(looped, reps) / length
    return results


def check_step(step, B, seed=1) -> dict[str, float]:
    """max |diff| / max |ref| of h, c', n', m' against the XLA step on fresh random inputs (state donated)."""
    states, x = step_inputs(B, seed=seed)
    h_ref, s_ref = jax.jit(recurrent_step_fw)(*states, *x)
    jax.block_until_ready((h_ref, s_ref))
    h, s = _jit_step(step)[1](*states, *x)  # consumes states (donated), as in the timed calls
    errs = {"h": _rel_err(h_ref.astype(F32), h.astype(F32))}
    errs.update({name: _rel_err(r, o) for name, r, o in zip("cnm", s_ref, s, strict=True)})
    ok = errs["h"] <= TOL["bfloat16/float32"].max_err and max(errs[k] for k in "cnm") <= TOL["float32"].max_err
    return {**errs, "ok": bool(ok)}


def step_bytes(B) -> int:
    NH, DHQK, DHV = STEP_SHAPE
    return 2 * B * NH * (DHQK * DHV + DHQK + 1) * 4  # the state read and written once


def step_name(cfg: StepKernelConfig) -> str:
    """bvX-sY-bkZ-wW[-stN][-heads][-nopf][-ev][-triton]: block_dhv, dhqk_splits, block_dhqk ("all": no row
    loop), num_warps, num_stages (if not 1), grid_order "heads", prefetch off, evict_first on, the Triton
    kernel forced (not ``backend="auto"``); or mosaic-bvX-bkZ-dN for the Mosaic kernel (pipeline depth N)."""
    bk = "all" if cfg.block_dhqk is None else cfg.block_dhqk
    name = f"bv{cfg.block_dhv}-s{cfg.dhqk_splits or 'auto'}-bk{bk}-w{cfg.num_warps}"
    name += f"-st{cfg.num_stages}" if cfg.num_stages != 1 else ""
    name += "-heads" if cfg.grid_order == "heads" else ""
    name += "-nopf" if not cfg.prefetch else ""
    name += "-ev" if cfg.evict_first else ""
    if cfg.backend == "mosaic":  # the Mosaic kernel uses only the blocks and the pipeline depth
        return f"mosaic-bv{cfg.block_dhv}-bk{cfg.block_dhqk or 64}-d{cfg.pipeline_depth}"
    return name + ("-triton" if cfg.backend == "triton" else "")


def step_sweep(B: int, full: bool = True) -> dict[str, StepKernelConfig]:
    """The default config (``backend="auto"``: the Mosaic kernel where it runs, else bv64-s4-bk64-w4), the
    default's Triton and Mosaic kernels forced, the previous default (issue-4 run of 2026-11-29: heads fastest
    in the grid, loads at their use, Triton's pipeliner), plus (``full``) tilings named by :func:`step_name`."""
    C = functools.partial(StepKernelConfig, backend="triton")  # the tilings below are the Triton kernel's
    previous = C(block_dhv=64, block_dhqk=64, dhqk_splits=4, num_stages=2, prefetch=False, grid_order="heads")
    default = StepKernelConfig.get_default(*STEP_SHAPE[1:])
    sweep = {"default": default, "previous": previous}
    for cfg in (replace(default, backend="triton"), replace(default, backend="mosaic")):
        sweep[step_name(cfg)] = cfg
    if not full:
        return sweep
    if B <= 8:
        cfgs = [
            C(block_dhv=16, block_dhqk=None, dhqk_splits=1, num_warps=8),
            C(block_dhv=64, block_dhqk=None, dhqk_splits=1, num_warps=8),
            C(block_dhv=32, block_dhqk=64, dhqk_splits=1, num_warps=4),
            C(block_dhv=32, block_dhqk=None, dhqk_splits=2, num_warps=4),
        ]
    else:
        cfgs = [
            C(block_dhv=64, block_dhqk=64, dhqk_splits=4, num_warps=4, grid_order="heads"),  # prefetch only
            C(block_dhv=32, block_dhqk=None, dhqk_splits=1, num_warps=8, grid_order="heads"),
            C(block_dhv=32, block_dhqk=None, dhqk_splits=1, num_warps=8, evict_first=True),
            C(block_dhv=64, block_dhqk=None, dhqk_splits=1, num_warps=8),
            C(block_dhv=128, block_dhqk=32, dhqk_splits=1, num_warps=4),
            C(block_dhv=256, block_dhqk=16, dhqk_splits=1, num_warps=4),
            C(block_dhv=512, block_dhqk=8, dhqk_splits=1, num_warps=4),
        ]
    cfgs += [  # second round: warps and row loops around the best of the first, the first round's default
        C(block_dhv=64, block_dhqk=64, dhqk_splits=4, num_warps=2),
        C(block_dhv=64, block_dhqk=64, dhqk_splits=4, num_warps=8),
        C(block_dhv=64, block_dhqk=64, dhqk_splits=2, num_warps=4),
        C(block_dhv=64, block_dhqk=64, dhqk_splits=4, num_warps=4, grid_order="heads"),  # prefetch, old order
        C(block_dhv=64, block_dhqk=None, dhqk_splits=1, num_warps=8),
        C(block_dhv=32, block_dhqk=None, dhqk_splits=1, num_warps=8),
        C(block_dhv=32, block_dhqk=None, dhqk_splits=4, num_warps=4),
    ]
    sweep.update({step_name(cfg): cfg for cfg in cfgs})
    return sweep


def bench_step(rows, batch_sizes, sweep_for, modes=STEP_MODES, deadline=None, json_path=None):
    for B in batch_sizes:
        floor = step_bytes(B) / COPY_TBPS
        b_modes = modes
        xla = time_step(recurrent_step_fw, B, b_modes)
        rows.append({"kind": "step", "B": B, "variant": "xla", **xla, "floor": floor, "check": None})
        times = "  ".join(f"{m} {xla[m] * 1e6:7.1f} us" for m in b_modes)
        print(f"step B={B:4d} xla                     {times}  floor {floor * 1e6:7.1f} us", flush=True)
        for seed, (name, cfg) in enumerate(sweep_for(B).items(), start=1):
            if deadline is not None and time.time() > deadline:
                print(f"step B={B} {name}: skipped (deadline)", flush=True)
                continue
            step = functools.partial(recurrent_step_pallas, config=cfg, interpret=INTERPRET)
            try:
                check = check_step(step, B, seed=seed)
                t = time_step(step, B, b_modes)
            except Exception as e:  # a config that does not compile is reported, not fatal
                print(f"step B={B} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            rows.append({"kind": "step", "B": B, "variant": name, **t, "floor": floor, "check": check})
            times = "  ".join(f"{m} {t[m] * 1e6:7.1f} us" for m in b_modes)
            print(f"step B={B:4d} {name:26s} {times}  ok={check['ok']} err_h={check['h']:.1e}", flush=True)
            if json_path:
                with open(json_path, "w") as fh:
                    json.dump({"jax": jax.__version__, "rows": rows}, fh)


def profile_step(B: int, names: list[str], calls: int = 2) -> None:
    """Runs the XLA step and the named sweep variants ``calls`` times each, untimed, on inputs made on the host
    (so that the only kernels launched are the steps'): a driver for ``ncu``."""
    states, x = step_inputs(B)
    host = [np.asarray(a) for a in (*states, *x)]
    sweep = step_sweep(B)
    for name in names:
        step = recurrent_step_fw if name == "xla" else functools.partial(recurrent_step_pallas, config=sweep[name])
        fn = jax.jit(lambda *a, step=step: step(*a, eps=1e-6))
        for _ in range(calls):
            args = [jax.device_put(a) for a in host]
            jax.block_until_ready(args)
            jax.block_until_ready(fn(*args))
        print(f"profiled B={B} {name}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# Sequence
# ---------------------------------------------------------------------------------------------------------
def seq_inputs(B, NH, S, DHQK, DHV, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    return (
        jax.random.normal(ks[0], (B, NH, S, DHQK), BF16),
        jax.random.normal(ks[1], (B, NH, S, DHQK), BF16),
        jax.random.normal(ks[2], (B, NH, S, DHV), BF16),
        jax.random.normal(ks[3], (B, NH, S), BF16),
        (3.0 + jax.random.normal(ks[4], (B, NH, S), F32)).astype(BF16),
    )


def seq_step_flops(B, NH, S, DHQK, DHV) -> float:
    """FLOPs of the literal per-step recurrence: 5 per state element and step (c update 3, read-out 2)."""
    return 5.0 * B * NH * S * DHQK * DHV


def seq_block_flops(B, NH, S, DHQK, DHV, L) -> float:
    """Matrix-product FLOPs of the closed form over blocks of L steps, per head (not per DHV tile):
    q·kᵀ (L, L, DHQK) and scores·v (L, L, DHV) on full L x L blocks, q·C and kᵀv (L, DHQK, DHV)."""
    return 2.0 * B * NH * S * (L * DHQK + L * DHV + 2 * DHQK * DHV)


def seq_bytes(B, NH, S, DHQK, DHV) -> float:
    return 2.0 * B * NH * S * (2 * DHQK + 2 * DHV)  # q, k, v read and h written once, bf16


def _queued_time(fn, x, reps: int, n: int = 10) -> float:
    """Median over ``reps`` of (n calls queued back to back, then blocked on) / n: no per-call dispatch gap."""

    def run():
        for _ in range(n):
            out = fn(*x)
        jax.block_until_ready(out)

    return _median_time(run, reps) / n


def bench_seq(rows, shapes, sweep_for, reps=5):
    """Times the XLA scan, the XLA chunkwise form and the kernel variants; checks each against the scan."""
    for B, NH, S, DHQK, DHV in shapes:
        shape = [B, NH, S, DHQK, DHV]
        x = seq_inputs(B, NH, S, DHQK, DHV)
        step_floor = max(seq_step_flops(*shape) / FP32_FLOPS, seq_bytes(*shape) / COPY_TBPS)
        xla_fn = jax.jit(lambda *a: recurrent_sequence_fw(*a, state_dtype="float32", use_scan=True))
        h_ref = xla_fn(*x)
        t_xla = _queued_time(xla_fn, x, 3, 2)
        rows.append({"kind": "seq", "shape": shape, "variant": "xla-scan", "time": t_xla, "floor": step_floor})
        print(f"seq {tuple(shape)} xla-scan {t_xla * 1e3:9.3f} ms  per-step floor {step_floor * 1e3:.3f} ms")
        cw_fn = jax.jit(lambda *a: chunkwise_fw(*a, state_dtype="float32"))
        variants = {
            "xla-chunkwise": (cw_fn, None),
            **{name: (None, cfg) for name, cfg in sweep_for(DHQK, DHV, S).items()},
        }
        for name, (fn, cfg) in variants.items():
            if fn is None:
                fn = jax.jit(lambda *a, cfg=cfg: recurrent_sequence_pallas(*a, config=cfg, interpret=INTERPRET))
            L = 256 if cfg is None else cfg.chunk_size
            floor = (
                step_floor if L == 1 else max(seq_block_flops(*shape, L) / BF16_FLOPS, seq_bytes(*shape) / COPY_TBPS)
            )
            try:
                err = _rel_err(h_ref.astype(F32), fn(*x).astype(F32))
                t = _queued_time(fn, x, reps)
            except Exception as e:  # a config that does not compile is reported, not fatal
                print(f"seq {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            ok = err <= TOL["bfloat16/float32"].max_err
            rows.append({"kind": "seq", "shape": shape, "variant": name, "time": t, "floor": floor,
                         "step_floor": step_floor, "xla": t_xla, "err": err, "ok": ok})  # fmt: skip
            print(f"seq {tuple(shape)} {name:18s} {t * 1e3:8.3f} ms  own floor/time {floor / t:5.3f}  "
                  f"per-step floor/time {step_floor / t:5.2f}  xla-scan/this {t_xla / t:6.1f}x  err {err:.1e} "
                  f"ok={ok}", flush=True)  # fmt: skip
        if S >= 2048 and not INTERPRET:  # the gradient: forward kernel, backward recomputed by the chunkwise form
            loss = lambda *a: jnp.sum(recurrent_sequence_pallas(*a).astype(F32))  # noqa: E731
            grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
            t = _queued_time(grad, x, 3, 3)
            L = SequenceKernelConfig.get_default(DHQK, DHV).chunk_size
            floor = 3 * max(seq_block_flops(*shape, L) / BF16_FLOPS, seq_bytes(*shape) / COPY_TBPS)
            rows.append({"kind": "seq", "shape": shape, "variant": "default fwd+bwd", "time": t, "floor": floor,
                         "step_floor": 3 * step_floor})  # fmt: skip
            print(f"seq {tuple(shape)} default fwd+bwd     {t * 1e3:8.3f} ms", flush=True)


def seq_sweep(DHQK, DHV, S, full=True):
    """The default config, plus (``full``) variants named L<chunk_size>-bv<block_dhv>-w<num_warps>[-s<stages>];
    L1 is the literal step-by-step recurrence (the kernel of the previous release, for comparison)."""
    C = SequenceKernelConfig
    sweep = {"default": C.get_default(DHQK, DHV)}
    if not full:
        return sweep
    grid = [(1, 16, 1, 1)]  # (chunk_size, block_dhv, num_warps, num_stages)
    if DHQK >= 256:
        grid += [(16, 64, 8, 1), (32, 128, 8, 2), (64, 128, 8, 1), (64, 64, 8, 2), (128, 128, 8, 2)]
    else:
        grid += [(32, 32, 4, 1), (64, 64, 4, 1), (64, 32, 8, 2), (64, 16, 4, 1)]
    for L, bv, w, st in grid:
        sweep[f"L{L}-bv{bv}-w{w}" + (f"-s{st}" if st > 1 else "")] = C(
            block_dhv=min(bv, DHV), chunk_size=L, num_warps=w, num_stages=st
        )
    return sweep


def print_table(rows):
    print("\n| kernel | shape | variant | time | floor | floor/time | [seq] per-step floor/time | XLA/kernel | check |")
    print("|---|---|---|---|---|---|---|---|---|")
    xla_step = {(r["B"], m): r[m] for r in rows if r["kind"] == "step" and r["variant"] == "xla"
                for m in STEP_MODES if m in r}  # fmt: skip
    for r in rows:
        if r["kind"] == "step":
            for m in (m for m in STEP_MODES if m in r):
                ratio = xla_step[(r["B"], m)] / r[m]
                check = "" if r["check"] is None else f"ok={r['check']['ok']}"
                print(f"| step ({m}) | B={r['B']} | {r['variant']} | {r[m] * 1e6:.1f} us | {r['floor'] * 1e6:.1f} us "
                      f"| {r['floor'] / r[m]:.2f} | | {ratio:.2f}x | {check} |")  # fmt: skip
        else:
            ratio = f"{r['xla'] / r['time']:.1f}x" if r.get("xla") else ""
            check = f"err={r['err']:.1e} ok={r['ok']}" if "err" in r else ""
            print(f"| sequence | {tuple(r['shape'])} | {r['variant']} | {r['time'] * 1e3:.3f} ms | "
                  f"{r['floor'] * 1e3:.3f} ms | {r['floor'] / r['time']:.3f} | "
                  f"{r.get('step_floor', r['floor']) / r['time']:.2f} | {ratio} | {check} |")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="write all rows to this file")
    parser.add_argument("--part", choices=("all", "step", "seq"), default="all")
    parser.add_argument("--quick", action="store_true", help="default configs only (no sweep)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (no GPU needed)")
    parser.add_argument("--batch", default="1,8,32,128", help="decode-step batch sizes, comma-separated")
    parser.add_argument("--step-modes", default=",".join(STEP_MODES), help="decode-step timing modes")
    parser.add_argument("--deadline", type=float, default=None, help="skip step variants after this many seconds")
    parser.add_argument("--variants", default=None, help="comma-separated step variant names to run (default all)")
    parser.add_argument("--profile", default=None, help="comma-separated step variants (and 'xla') to run untimed")
    args = parser.parse_args()
    start = time.time()
    if args.profile:
        for B in (int(b) for b in args.batch.split(",")):
            profile_step(B, args.profile.split(","))
        return
    global INTERPRET, STEP_SHAPE
    if args.smoke:
        INTERPRET, STEP_SHAPE = True, (2, 32, 64)
    print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
    rows = []
    copy = measure_copy()
    print(f"copy ceiling measured here: {copy / 1e12:.2f} TB/s (floors use {COPY_TBPS / 1e12:.2f})", flush=True)
    if args.part in ("all", "step"):
        sweep_for = functools.partial(step_sweep, full=not args.quick)
        if args.variants:
            keep = args.variants.split(",")
            sweep_for = lambda B, f=sweep_for: {k: v for k, v in f(B).items() if k in keep}  # noqa: E731
        batch = (1, 2) if args.smoke else tuple(int(b) for b in args.batch.split(","))
        modes = tuple(m for m in STEP_MODES if m in args.step_modes.split(","))
        deadline = None if args.deadline is None else start + args.deadline
        bench_step(rows, batch, sweep_for, modes, deadline, args.json)
    if args.part in ("all", "seq"):
        shapes = [(8, 8, 512, 256, 512), (8, 8, 2048, 256, 512), (16, 4, 2048, 64, 64)]
        if args.smoke:
            shapes = [(1, 2, 37, 16, 32), (2, 1, 40, 32, 16)]
        bench_seq(rows, shapes, functools.partial(seq_sweep, full=not args.quick))
    print_table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"jax": jax.__version__, "device": str(jax.devices()[0]), "copy_Bps": copy, "rows": rows}, fh)


if __name__ == "__main__":
    main()
