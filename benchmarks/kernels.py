"""Times the fused Pallas mLSTM kernels against the library's XLA step and scan, with correctness checks.

Reproduces BENCHMARKS.md's two kernel tables (decode step, whole sequence) on an H200::

    PYTHONPATH=. python3 benchmarks/kernels.py --json kernels.json

and on a CPU at tiny shapes, the kernels in Pallas interpret mode (a smoke test; the Mosaic kernel is
skipped there): ``PYTHONPATH=. python benchmarks/kernels.py --batch 1 --step-shape 2 16 16 --seq-shapes
1,2,16,16,16 --queued 2 --loop 4 --repeats 1``. ``--sweep`` adds the tilings of :func:`step_sweep` and
:func:`seq_sweep` to the default configs.

Decode step, NH=8, DHQK=256, DHV=512 (``--step-shape``), float32 state, bfloat16 inputs, B in ``--batch``
(1, 8, 32, 128): ``recurrent_step_fw`` (XLA), ``recurrent_step_pallas`` with its default config, and the
default tiling forced onto the Triton and onto the Mosaic kernel. Two timings of a step, both by
``benchmarks/harness.py``: *queued*, ``--queued`` jitted calls queued from Python over a donated state (what
a host loop pays, dispatch included), and *loop*, one step inside a jitted ``fori_loop`` of ``--loop`` steps
(the device's time; a model's decode loop runs so). Floor: the state read and written once,
``2·B·NH·(DHQK·DHV + DHQK + 1)·4`` bytes, at the copy bandwidth (B=128: 1.08 GB, 0.252 ms at 4.27 TB/s).

Sequence, shapes ``B,NH,S,DHQK,DHV`` in ``--seq-shapes`` (8,8,512,256,512; 8,8,2048,256,512;
16,4,2048,64,64), bfloat16 inputs, float32 state: the XLA scan (``recurrent_sequence_fw``, the reference),
the XLA chunkwise form (``chunkwise_fw``) and ``recurrent_sequence_pallas``, each timed as ``--calls`` calls
queued back to back. Two floors: the per-step floor of the literal recurrence, 5 float32 FLOPs per state
element and time step (c update f'c + (i'k)v: 3; read-out q̂·c: 2), ``5·B·NH·S·DHQK·DHV`` at the float32
vector rate (the bytes, q, k, v, i, f read and h written once, at the copy bandwidth, if longer); and each
variant's own: a kernel of chunk size L computes full L x L blocks, ``2·B·NH·S·(L·DHQK + L·DHV +
2·DHQK·DHV)`` matrix-product FLOPs (q·kᵀ, scores·v, q·C, kᵀv), at the bf16 matrix rate, and the chunkwise
form the counts of ``benchmarks/forms.py``; the bytes again if longer. On Hopper (or interpreted) the
``mosaic`` row is ``recurrent_sequence_pallas(backend="mosaic")``, the Mosaic GPU chunkwise kernel that
``backend="auto"`` runs there (chunks of 64). At S >= ``--grad-min-S`` the gradients are timed too, against 3x
the FLOPs and 2x the bytes: ``default fwd+bwd``, the Triton kernel's default tiling forward and the chunkwise
form's backward; ``mosaic fwd+bwd``, the Mosaic forward and backward kernels.

Checks: every variant against the XLA form on the same inputs, max |diff| / max |ref|, bounds in
:data:`BOUNDS` with their reasons.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.forms import floor_counts, sequence_bytes
from benchmarks.harness import (
    Ceilings,
    Column,
    Floor,
    Report,
    add_arguments,
    ceilings_from_arguments,
    hardware_floor,
    time_jitted,
    time_loop,
)
from xlstm_jax.kernels import SequenceKernelConfig, StepKernelConfig, recurrent_sequence_pallas, recurrent_step_pallas
from xlstm_jax.kernels.chunkwise_mosaic import chunkwise_mosaic_unsupported
from xlstm_jax.kernels.recurrent_step_mosaic import device_supports_mosaic
from xlstm_jax.mlstm import chunkwise_fw, recurrent_sequence_fw, recurrent_step_fw

F32, BF16 = jnp.float32, jnp.bfloat16
EPS = 1e-6

# Bounds on max |out - ref| / max |ref| against the XLA form on the same inputs.
BOUNDS = {
    # h is bfloat16 on both sides: each rounds a float32 h, and two float32 values a few ulp apart can round
    # to neighbouring bf16 values, one bf16 ulp = 2^-8 of |h| (3.9e-3). The float32 read-out sums over DHQK
    # in another order add ~DHQK·u = 1.5e-5 of the sum's terms, which cancellation can enlarge against |h|.
    "step h": 1e-2,
    # c', n', m' are float32 and elementwise (no sums): about a dozen operations per element, each rounded
    # once (u = 6e-8), the gate exponentials' condition number |arg| <= ~10 at these gates: ~7e-6. The
    # kernels write the gate math differently (exp2 with a log2(e) factor; log σ without log1p), so 1e-4;
    # a state kept in bf16 would show 2^-9 = 2e-3.
    "step states": 1e-4,
    # h rounded to bf16 (2^-8 between two roundings, as above), plus the bf16 operands the closed-form
    # blocks feed to the matrix units (scores and gated scores rounded once each, 2^-9 relative), plus the
    # float32 log-gate sums over S <= 2048 (u·0.05·S = 6e-6): 3.9e-3 + 2·2e-3, rounded up to 1e-2.
    "sequence h": 1e-2,
}


def max_rel_err(ref: jax.Array, out: jax.Array) -> float:
    """``max |out - ref| / max |ref|`` in float64."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


# ---------------------------------------------------------------------------------------------------------
# Decode step
# ---------------------------------------------------------------------------------------------------------
def step_inputs(B: int, shape: Sequence[int], seed: int = 0) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Random states and inputs of one step; ``shape`` is (NH, DHQK, DHV).

    Returns:
        ``(c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH, 1))`` in float32 and ``(q, k (B, NH, DHQK), v (B, NH,
        DHV), i, f (B, NH, 1))`` in bfloat16, forget gates N(3, 1).
    """
    NH, DHQK, DHV = shape
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


def step_bytes(B: int, shape: Sequence[int]) -> int:
    """Bytes behind the step's floor: the float32 state (c, n, m) read once and written once."""
    NH, DHQK, DHV = shape
    return 2 * B * NH * (DHQK * DHV + DHQK + 1) * 4


def carried(step: Callable) -> Callable:
    """``step`` as ``(c, n, m, h, q, k, v, i, f) -> (c', n', m', h')``: the state first, so it can be carried."""

    def call(c, n, m, h, q, k, v, i, f):
        h, (c, n, m) = step(c, n, m, q, k, v, i, f, eps=EPS)
        return c, n, m, h

    return call


def step_name(cfg: StepKernelConfig) -> str:
    """``bvX-sY-bkZ-wW[-stN]-triton`` (block_dhv, dhqk_splits, block_dhqk or "all" rows, num_warps,
    num_stages) for the Triton kernel, ``mosaic-bvX-bkZ-dN`` (N: pipeline depth) for the Mosaic kernel."""
    if cfg.backend == "mosaic":
        return f"mosaic-bv{cfg.block_dhv}-bk{cfg.block_dhqk or 64}-d{cfg.pipeline_depth}"
    bk = "all" if cfg.block_dhqk is None else cfg.block_dhqk
    name = f"bv{cfg.block_dhv}-s{cfg.dhqk_splits or 'auto'}-bk{bk}-w{cfg.num_warps}"
    name += f"-st{cfg.num_stages}" if cfg.num_stages != 1 else ""
    return name + ("-triton" if cfg.backend == "triton" else "")


def step_sweep(shape: Sequence[int], sweep: bool) -> dict[str, StepKernelConfig | None]:
    """``{name: config}``: "xla" (None: ``recurrent_step_fw``), "default" (``StepKernelConfig.get_default``:
    Mosaic where it runs and pays, else Triton), the default tiling forced onto each kernel, and with
    ``sweep`` the Triton tilings and Mosaic pipeline depth around it."""
    default = StepKernelConfig.get_default(*shape[1:])
    variants: dict[str, StepKernelConfig | None] = {"xla": None, "default": default}
    forced = [replace(default, backend="triton"), replace(default, backend="mosaic")]
    if sweep:
        C = functools.partial(StepKernelConfig, backend="triton")
        forced += [
            C(block_dhv=16, block_dhqk=None, dhqk_splits=1, num_warps=8),
            C(block_dhv=32, block_dhqk=None, dhqk_splits=1, num_warps=8),
            C(block_dhv=64, block_dhqk=None, dhqk_splits=1, num_warps=8),
            C(block_dhv=32, block_dhqk=None, dhqk_splits=2, num_warps=4),
            C(block_dhv=32, block_dhqk=64, dhqk_splits=1, num_warps=4),
            C(block_dhv=64, block_dhqk=64, dhqk_splits=2, num_warps=4),
            C(block_dhv=64, block_dhqk=64, dhqk_splits=4, num_warps=2),
            C(block_dhv=64, block_dhqk=64, dhqk_splits=4, num_warps=8),
            C(block_dhv=64, block_dhqk=32, dhqk_splits=8, num_warps=4),
            C(block_dhv=128, block_dhqk=32, dhqk_splits=1, num_warps=4),
            replace(default, backend="mosaic", pipeline_depth=3),
        ]
    variants.update({step_name(cfg): cfg for cfg in forced})
    return variants


def step_variant(cfg: StepKernelConfig | None, interpret: bool | None) -> Callable | None:
    """The step function of a variant: the XLA step for None, else the Pallas step with ``cfg``; None when the
    variant cannot run here (the Mosaic kernel runs compiled on a GPU only)."""
    if cfg is None:
        return recurrent_step_fw
    if cfg.backend == "mosaic" and interpret:
        return None
    return functools.partial(recurrent_step_pallas, config=cfg, interpret=interpret)


def check_step(step: Callable, B: int, shape: Sequence[int], seed: int) -> dict[str, float | bool]:
    """Errors of h and of the states against ``recurrent_step_fw`` on fresh inputs (the state donated)."""
    states, x = step_inputs(B, shape, seed)
    h_ref, s_ref = jax.jit(lambda *a: recurrent_step_fw(*a, eps=EPS))(*states, *x)
    jax.block_until_ready((h_ref, s_ref))
    h0 = jnp.zeros(x[2].shape, x[0].dtype)
    c, n, m, h = jax.jit(carried(step), donate_argnums=(0, 1, 2, 3))(*states, h0, *x)
    err_h = max_rel_err(h_ref, h)
    err_s = max(max_rel_err(r, o) for r, o in zip(s_ref, (c, n, m), strict=True))
    ok = err_h <= BOUNDS["step h"] and err_s <= BOUNDS["step states"]
    return {"err_h": err_h, "err_states": err_s, "ok": ok}


def bench_step(report: Report, a: argparse.Namespace, ceilings: Ceilings, interpret: bool | None, deadline: float):
    report.table("step", STEP_COLUMNS)
    shape = tuple(a.step_shape)
    variants = {k: v for k, v in step_sweep(shape, a.sweep).items() if not a.variants or k in a.variants}
    for B in a.batch:
        floor = hardware_floor(bytes_moved=step_bytes(B, shape), bandwidth=ceilings.copy_bytes_per_s)
        xla_time = {}
        for seed, (name, cfg) in enumerate(variants.items(), start=1):
            if time.time() > deadline:
                report.note(f"step B={B} {name}: skipped (--budget-s spent)")
                continue
            step = step_variant(cfg, interpret)
            if step is None:
                report.note(f"step B={B} {name}: skipped (the Mosaic kernel runs compiled on a GPU only)")
                continue
            try:
                check = check_step(step, B, shape, seed) if cfg is not None else {}
                states, x = step_inputs(B, shape)
                h0 = jnp.zeros(x[2].shape, x[0].dtype)
                call = carried(step)
                timings = {}
                if "queued" in a.step_modes:
                    fn = jax.jit(call, donate_argnums=(0, 1, 2, 3))
                    timings["queued"] = time_jitted(fn, *states, h0, *x, repeats=a.repeats, calls=a.queued, carry=True)
                if "loop" in a.step_modes:
                    states = step_inputs(B, shape)[0]
                    body = lambda carry, call=call, x=x: call(*carry, *x)
                    timings["loop"] = time_loop(body, (*states, h0), a.loop, repeats=a.repeats)
            except Exception as exc:  # a config that does not compile is reported, not fatal
                report.note(f"step B={B} {name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                continue
            for mode, timing in timings.items():
                xla_time.setdefault(mode, timing.median_s if cfg is None else None)
                row = {"B": B, "variant": name, "mode": mode, **timing.as_row(), **check}
                row.update(
                    floor_s=floor.seconds,
                    bytes=floor.bytes_moved,
                    floor_fraction=floor.fraction(timing.median_s),
                    xla_over_this=xla_time[mode] / timing.median_s if xla_time.get(mode) else None,
                )
                report.add("step", row)


STEP_COLUMNS = [
    Column("B", "B", width=4),
    Column("variant", "variant", width=26),
    Column("mode", "mode", width=6),
    Column("us", "median_s", ".1f", 1e6),
    Column("spread", "spread", ".2f"),
    Column("compile s", "compile_s", ".2f"),
    Column("floor us", "floor_s", ".1f", 1e6),
    Column("floor/t", "floor_fraction", ".3f"),
    Column("xla/this", "xla_over_this", ".2f"),
    Column("err h", "err_h", ".1e"),
    Column("err cnm", "err_states", ".1e"),
    Column("ok", "ok", width=5),
]


# ---------------------------------------------------------------------------------------------------------
# Sequence
# ---------------------------------------------------------------------------------------------------------
def seq_inputs(B: int, NH: int, S: int, DHQK: int, DHV: int, seed: int = 0) -> tuple[jax.Array, ...]:
    """Random bf16 q, k (B, NH, S, DHQK), v (B, NH, S, DHV), i, f (B, NH, S); forget gates N(3, 1)."""
    ks = jax.random.split(jax.random.key(seed), 5)
    return (
        jax.random.normal(ks[0], (B, NH, S, DHQK), BF16),
        jax.random.normal(ks[1], (B, NH, S, DHQK), BF16),
        jax.random.normal(ks[2], (B, NH, S, DHV), BF16),
        jax.random.normal(ks[3], (B, NH, S), BF16),
        (3.0 + jax.random.normal(ks[4], (B, NH, S), F32)).astype(BF16),
    )


def seq_step_flops(B: int, NH: int, S: int, DHQK: int, DHV: int) -> float:
    """FLOPs of the literal per-step recurrence: 5 per state element and step (c update 3, read-out 2)."""
    return 5.0 * B * NH * S * DHQK * DHV


def seq_block_flops(B: int, NH: int, S: int, DHQK: int, DHV: int, L: int) -> float:
    """Matrix-product FLOPs of a kernel of chunk size L on full L x L blocks: q·kᵀ, scores·v, q·C, kᵀv."""
    return 2.0 * B * NH * S * (L * DHQK + L * DHV + 2 * DHQK * DHV)


def seq_floor(shape: Sequence[int], ceilings: Ceilings, L: int, grad: bool = False, chunkwise: bool = False) -> Floor:
    """The floor of a sequence of ``shape`` (B, NH, S, DHQK, DHV) with bf16 inputs (the module docstring).

    Args:
        shape: (B, NH, S, DHQK, DHV).
        ceilings: The rates.
        L: The chunk size; 1 for the per-step floor of the literal recurrence.
        grad: Forward and backward: 3x the FLOPs, 2x the bytes.
        chunkwise: The XLA chunkwise form's FLOPs (causal halves of the blocks), not a kernel's full blocks.
    """
    nbytes = (1 + grad) * sequence_bytes(*shape, itemsize=2)
    if L == 1:
        flops, rate = seq_step_flops(*shape), ceilings.vector_flops_per_s
    else:
        flops = floor_counts(*shape, L, 2, "fwd")[0] if chunkwise else seq_block_flops(*shape, L)
        rate = ceilings.matmul_flops_per_s
    return hardware_floor(
        bytes_moved=nbytes, flops=(1 + 2 * grad) * flops, bandwidth=ceilings.copy_bytes_per_s, flop_rate=rate
    )


def seq_sweep(DHQK: int, DHV: int, sweep: bool) -> dict[str, SequenceKernelConfig]:
    """The default config, and with ``sweep`` tilings named ``L<chunk_size>-bv<block_dhv>-w<num_warps>[-s<stages>]``
    (``L1``: the literal step-by-step recurrence)."""
    variants = {"default": SequenceKernelConfig.get_default(DHQK, DHV)}
    if not sweep:
        return variants
    grid = [(1, 16, 1, 1)]  # (chunk_size, block_dhv, num_warps, num_stages)
    if DHQK >= 256:
        grid += [(16, 64, 8, 1), (32, 128, 8, 2), (64, 128, 8, 1), (64, 64, 8, 2), (128, 128, 8, 2)]
    else:
        grid += [(32, 32, 4, 1), (64, 64, 4, 1), (64, 32, 8, 2), (64, 16, 4, 1)]
    for L, bv, w, st in grid:
        name = f"L{L}-bv{bv}-w{w}" + (f"-s{st}" if st > 1 else "")
        variants[name] = SequenceKernelConfig(block_dhv=min(bv, DHV), chunk_size=L, num_warps=w, num_stages=st)
    return variants


def bench_seq(report: Report, a: argparse.Namespace, ceilings: Ceilings, interpret: bool | None, deadline: float):
    report.table("sequence", SEQ_COLUMNS)
    chunkwise_L = inspect.signature(chunkwise_fw).parameters["chunk_size"].default
    for spec in a.seq_shapes:
        shape = tuple(spec)
        B, NH, S, DHQK, DHV = shape
        x = seq_inputs(*shape)
        variants: dict[str, tuple[Callable, Floor]] = {
            "xla-scan": (
                lambda *q: recurrent_sequence_fw(*q, state_dtype="float32", use_scan=True),
                seq_floor(shape, ceilings, 1),
            ),
            "xla-chunkwise": (
                lambda *q: chunkwise_fw(*q, state_dtype="float32"),
                seq_floor(shape, ceilings, chunkwise_L, chunkwise=True),
            ),
        }
        for name, cfg in seq_sweep(DHQK, DHV, a.sweep).items():
            fn = lambda *q, cfg=cfg: recurrent_sequence_pallas(*q, config=cfg, interpret=interpret)
            variants[name] = (fn, seq_floor(shape, ceilings, cfg.chunk_size))
        # backend="auto" on Hopper: the Mosaic GPU chunkwise kernel (chunks of 64), timed beside the Triton tilings
        mosaic = chunkwise_mosaic_unsupported(DHQK, DHV, BF16, 32) is None and (interpret or device_supports_mosaic())
        if mosaic:
            fn = lambda *q: recurrent_sequence_pallas(*q, backend="mosaic", interpret=interpret)
            variants["mosaic"] = (fn, seq_floor(shape, ceilings, 64))
        if a.grad_min_S <= S:
            default = SequenceKernelConfig.get_default(DHQK, DHV)
            backends = {"default fwd+bwd": ("triton", default.chunk_size)} | (
                {"mosaic fwd+bwd": ("mosaic", 64)} if mosaic else {}
            )
            for name, (backend, L) in backends.items():
                loss = lambda *q, b=backend: jnp.sum(
                    recurrent_sequence_pallas(*q, backend=b, interpret=interpret).astype(F32)
                )
                variants[name] = (jax.grad(loss, argnums=(0, 1, 2, 3, 4)), seq_floor(shape, ceilings, L, grad=True))
        h_ref = t_scan = None
        for name, (form, floor) in variants.items():
            if a.variants and name not in a.variants and name != "xla-scan":
                continue
            if time.time() > deadline:
                report.note(f"sequence {shape} {name}: skipped (--budget-s spent)")
                continue
            fn = jax.jit(form)
            row = {"shape": list(shape), "variant": name}
            try:
                if name == "xla-scan":
                    timing = time_jitted(fn, *x, repeats=min(a.repeats, 3), calls=1)
                    h_ref, t_scan = fn(*x), timing.median_s
                else:
                    timing = time_jitted(fn, *x, repeats=a.repeats, calls=a.calls)
                    if not name.endswith("fwd+bwd"):
                        err = max_rel_err(h_ref, fn(*x))
                        row.update(err=err, ok=err <= BOUNDS["sequence h"])
            except Exception as exc:  # a config that does not compile is reported, not fatal
                report.note(f"sequence {shape} {name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                continue
            row.update(timing.as_row())
            row.update(
                floor_s=floor.seconds,
                floor_bound=floor.bound,
                floor_fraction=floor.fraction(timing.median_s),
                step_floor_fraction=seq_floor(shape, ceilings, 1, grad=name.endswith("fwd+bwd")).fraction(
                    timing.median_s
                ),
                scan_over_this=t_scan / timing.median_s if t_scan else None,
            )
            report.add("sequence", row)


SEQ_COLUMNS = [
    Column("shape B,NH,S,DHQK,DHV", "shape", width=22),
    Column("variant", "variant", width=18),
    Column("ms", "median_s", ".3f", 1e3),
    Column("spread", "spread", ".2f"),
    Column("compile s", "compile_s", ".2f"),
    Column("floor ms", "floor_s", ".3f", 1e3),
    Column("floor/t", "floor_fraction", ".3f"),
    Column("step floor/t", "step_floor_fraction", ".2f"),
    Column("scan/this", "scan_over_this", ".1f"),
    Column("err h", "err", ".1e"),
    Column("ok", "ok", width=5),
]


def seq_shape(text: str) -> tuple[int, ...]:
    """``"B,NH,S,DHQK,DHV"`` as five positive ints."""
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 5 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected B,NH,S,DHQK,DHV (five positive integers), got {text!r}")
    return shape


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark; returns the report's data (what ``--json`` writes)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "step", "seq"), default="all")
    p.add_argument("--sweep", action="store_true", help="add the tilings of step_sweep and seq_sweep")
    p.add_argument("--variants", nargs="+", default=None, help="run only these variants (names as printed)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128], help="decode-step batch sizes")
    p.add_argument("--step-shape", type=int, nargs=3, default=[8, 256, 512], metavar=("NH", "DHQK", "DHV"))
    p.add_argument("--step-modes", nargs="+", default=["queued", "loop"], choices=["queued", "loop"])
    p.add_argument("--queued", type=int, default=100, help="step calls queued per timed sample")
    p.add_argument("--loop", type=int, default=256, help="steps per timed jitted loop")
    default_shapes = ["8,8,512,256,512", "8,8,2048,256,512", "16,4,2048,64,64"]
    p.add_argument("--seq-shapes", type=seq_shape, nargs="+", default=[seq_shape(s) for s in default_shapes])
    p.add_argument("--calls", type=int, default=10, help="sequence calls queued per timed sample")
    p.add_argument("--grad-min-S", type=int, default=2048, help="time the gradient from this S")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="skip the variants left after this")
    add_arguments(p, repeats=5)
    a = p.parse_args(argv)
    deadline = time.time() + a.budget_s
    report = Report("kernels", "benchmarks/kernels.py", vars(a), a.json, argv)
    ceilings = ceilings_from_arguments(a, report)
    interpret = None if jax.default_backend() == "gpu" else True  # off a GPU: Pallas interpret mode
    report.set("interpret", bool(interpret))
    if a.part in ("all", "step"):
        bench_step(report, a, ceilings, interpret, deadline)
    if a.part in ("all", "seq"):
        bench_seq(report, a, ceilings, interpret, deadline)
    return report.data


if __name__ == "__main__":
    main()
