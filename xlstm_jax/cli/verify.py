"""Check every mLSTM backend against the recurrent form and time it.

``xlstm-jax verify`` (also the last part of ``xlstm-jax demo``, the main job) runs every registered backend
on a workload (default B=2, NH=4, S=256, DHQK=64, DHV=128), plus the recurrent form step by step (the decode
path), compares each one's h and last states with the recurrent form (``use_scan=True``) in float64 and
float32, and prints a table of errors and float32 times per call. It exits with status 1 if any form
disagrees.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.cli import CommandError, positive_int, prng_seed
from xlstm_jax.mlstm.recurrent import recurrent_step_fw
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import BACKENDS, create_mlstm_backend

__all__ = ["AGREEMENT", "HELP", "add_arguments", "check_backends", "run"]

HELP = "check every mLSTM backend against the recurrent form and time it"

# Forms agree when max |x - ref| / max |ref| <= AGREEMENT[dtype] for h and the last states. The workload's
# queries and keys have positive entries, so q̂·n is a sum without cancellation and the error of h is not
# amplified by a small normaliser: float32 unit roundoff (6e-8) times ~1e3 accumulated roundings is 6e-5,
# float64's is 1e-13. Wrong math is off by O(1).
AGREEMENT = {"float64": 1e-9, "float32": 1e-3}


def _time_call(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds, after one warm-up call (compilation)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _stepwise(q, k, v, i, f):
    """The decode path: one jitted ``recurrent_step_fw`` call per time step, states carried by the caller."""
    B, NH, S, DHQK = q.shape
    step = jax.jit(recurrent_step_fw)
    c = jnp.zeros((B, NH, DHQK, v.shape[-1]), q.dtype)
    n = jnp.zeros((B, NH, DHQK), q.dtype)
    m = jnp.zeros((B, NH, 1), q.dtype)
    hs = []
    for t in range(S):
        h, (c, n, m) = step(c, n, m, q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t, None], f[:, :, t, None])
        hs.append(h)
    return jnp.stack(hs, axis=2), (c, n, m[..., 0])


def _forms(q, k, v, i, f) -> dict[str, Callable[[], object]]:
    """Every registered backend with its default config as a call on (q, k, v, i, f), jitted.

    The recurrent backend runs in both loop forms. Its unrolled Python loop (``use_scan=False``) runs
    eagerly, one dispatch per operation: XLA's compile time grows faster than linearly in the number of
    unrolled steps (about 10 s at S=32 and minutes at S=256 on a CPU), which is why ``use_scan`` exists.
    """
    forms = {}
    for name in BACKENDS:
        configs = [("recurrent (use_scan=True)", {"use_scan": True}), ("recurrent (use_scan=False, eager)", {})]
        fallback = name == "recurrent_pallas" and jax.default_backend() != "gpu"  # the kernel needs a GPU
        plain = [(name + (" (no GPU: XLA form)" if fallback else ""), {})]
        for label, kwargs in configs if name == "recurrent" else plain:
            call = create_mlstm_backend(name, **kwargs)
            call = partial(call, return_last_states=True)
            if "eager" not in label:
                call = jax.jit(call)
            forms[label] = partial(call, q, k, v, i, f)
    forms["recurrent step by step (decode)"] = partial(_stepwise, q, k, v, i, f)
    return forms


def _inputs(shape: tuple[int, int, int, int, int], seed: int, dtype) -> tuple[jax.Array, ...]:
    """Random q, k (|normal|), v (normal), input gates (uniform in [-10, 10]), forget gates (normal around +3)."""
    B, NH, S, DHQK, DHV = shape
    keys = jax.random.split(jax.random.key(seed), 5)
    return (
        jnp.abs(jax.random.normal(keys[0], (B, NH, S, DHQK), dtype)),
        jnp.abs(jax.random.normal(keys[1], (B, NH, S, DHQK), dtype)),
        jax.random.normal(keys[2], (B, NH, S, DHV), dtype),
        jax.random.uniform(keys[3], (B, NH, S), dtype, minval=-10.0, maxval=10.0),
        jax.random.normal(keys[4], (B, NH, S), dtype) + 3.0,
    )


def _max_rel(x: jax.Array, ref: jax.Array) -> float:
    return float(jnp.max(jnp.abs(x - ref)) / jnp.max(jnp.abs(ref)))


def _errors(runs: dict[str, Callable[[], object]], ref_name: str) -> dict[str, tuple[float, float] | None]:
    """Each form's max error in h and in the last states against the reference form.

    None for a form that does not take this dtype (it raised TypeError, as the float32 Pallas kernels do
    for float64 inputs).
    """
    h_ref, states_ref = runs[ref_name]()
    errors = {}
    for name, run in runs.items():
        try:
            h, states = run()
        except TypeError:
            errors[name] = None
            continue
        errors[name] = (_max_rel(h, h_ref), max(_max_rel(a, b) for a, b in zip(states, states_ref, strict=True)))
    return errors


def check_backends(B: int, NH: int, S: int, DHQK: int, DHV: int, seed: int, repeats: int) -> bool:
    """Runs the check and prints the table; returns whether every form agrees with the reference.

    Each form runs in float64 (where it takes float64) and in float32, and must agree with the recurrent
    scan within ``AGREEMENT`` in both; the float32 run is timed.
    """
    shape = (B, NH, S, DHQK, DHV)
    ref_name = "recurrent (use_scan=True)"
    with jax.enable_x64(True):
        err64 = _errors(_forms(*_inputs(shape, seed, jnp.float64)), ref_name)
    runs = _forms(*_inputs(shape, seed, jnp.float32))
    err32 = _errors(runs, ref_name)

    print(f"mLSTM forms, B={B} NH={NH} S={S} DHQK={DHQK} DHV={DHV}, timed in float32 on {jax.devices()[0].platform}")
    print(f"errors: max|x - ref| / max|ref| of h and of the last states (c, n, m) against {ref_name}")
    print(f"forms agree if float64 errors <= {AGREEMENT['float64']:g} and float32 errors <= {AGREEMENT['float32']:g}")
    print(f"{'form':38s} {'f64 h':>8s} {'f64 cnm':>8s} {'f32 h':>8s} {'f32 cnm':>8s} {'ms/call':>9s}  agrees")
    ok = True
    for name, run in runs.items():
        f64_ok = err64[name] is None or max(err64[name]) <= AGREEMENT["float64"]
        agrees = f64_ok and max(err32[name]) <= AGREEMENT["float32"]
        ok &= agrees
        ms = _time_call(run, repeats) * 1e3
        f64 = "     n/a      n/a" if err64[name] is None else f"{err64[name][0]:8.1e} {err64[name][1]:8.1e}"
        print(f"{name:38s} {f64} {err32[name][0]:8.1e} {err32[name][1]:8.1e} {ms:9.2f}  {'yes' if agrees else 'NO'}")
    return ok


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload's shape, seed and timing repeats."""
    for name, default, meaning in (
        ("B", 2, "batch size"),
        ("NH", 4, "heads"),
        ("S", 256, "sequence length"),
        ("DHQK", 64, "query/key head size"),
        ("DHV", 128, "value head size"),
        ("repeats", 5, "timed calls per form (the median is shown)"),
    ):
        parser.add_argument(f"--{name}", type=positive_int, default=default, help=f"{meaning} (default {default})")
    parser.add_argument("--seed", type=prng_seed, default=0, help="PRNG seed of the random inputs (default 0)")


def run(args: argparse.Namespace) -> int:
    """Runs the check; 0 if every form agrees with the recurrent form, else 1."""
    try:
        ok = check_backends(args.B, args.NH, args.S, args.DHQK, args.DHV, args.seed, args.repeats)
    except ValueError as e:  # a form that does not take this shape says why
        raise CommandError(str(e)) from e
    if not ok:
        print("FAILED: some forms disagree with the recurrent form", file=sys.stderr)
    return 0 if ok else 1
