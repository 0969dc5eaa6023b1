"""Times the fused residual-norm and read-out kernels (Triton and Mosaic GPU) against XLA at xLSTM-7B's shapes.

The H200 run (36 cases, each a single call checked and a loop timed, both compiled first; ``--budget-s N``
skips the cases left after N seconds)::

    PYTHONPATH=. python3 benchmarks/norms.py --json norms.json

and a CPU smoke run at tiny shapes, the Triton kernels in Pallas interpret mode and the Mosaic GPU kernels in
Mosaic GPU's interpreter (skipped, with a note, where ``xlstm_jax.kernels.mosaic.mosaic_interpret_params()``
is None)::

    PYTHONPATH=. python benchmarks/norms.py --smoke --json /tmp/norms.json

What is timed. The three calls of the two kernels in a fused decode step of the language model
(``RuntimeConfig.decode_fusion``), with the arguments the model passes (``xlstm_jax.models.xlstm_parallel``:
``blocks/mlstm/layer.py``, ``model.py``, ``decode.py``), at the sizes of ``xLSTMLMConfig.xlstm_7b()``: D=4096,
NH=8, DHQK=256, DHV=512, the gates G = 2·NH = 16 with soft cap 15, norm eps 1e-6, bfloat16 activations and
weights (``--dtype``), M rows in ``--rows`` (decode batches 1, 16, 128 and 8192 rows, a prefill's size):

* ``mlstm_norm``: the mLSTM layer's input, ``add_rms_norm_pallas(x, weight, (pending,), return_sum=False,
  side_weight=if_kernel (D, G), side_bias=if_bias (G,), side_cap=15)``: one residual add, the RMSNorm y and
  the soft-capped float32 gates g (M, G).
* ``ffn_norm``: the FFN's input, ``add_rms_norm_pallas(x, weight, (pending, y_mlstm))``: two residual adds,
  the sum s (the new residual stream) and the RMSNorm y.
* ``head_readout``: the mLSTM read-out after the decode step, ``head_norm_gate_pallas(h, qkvo, weight,
  num_heads=NH, o_offset=NH·(2·DHQK + DHV), m=m', states=(n', n, m, layer))``: per-head LayerNorm times the
  weight times ``sigmoid(o)``, o read in place from the fused projection (B, 2·NH·DHQK + 2·NH·DHV), and the
  layer's n' and m' written into the stacked states (L=2 here; the kernel touches one layer's slice). h comes
  as the decode step hands it over on an H200 (``--head-input model``): the Triton step's partial sums over
  P DHQK splits (``num`` (BH, P, DHV), ``qn`` (BH, P), float32; P=4) below ``StepKernelConfig``'s
  ``mosaic_min_programs`` (B < 32 at these heads), else h (BH, DHV) in bfloat16 from the Mosaic step.
  (A prefill runs this read-out in XLA; its M=8192 row is the kernel at a prefill's number of rows.)

Variants per call and M: ``xla``, the same function in XLA from the library's own pieces (the residual adds,
``rms_norm``, ``project`` and ``soft_cap`` as the unfused layer computes its gates; ``normalize_readout``,
``head_norm_gate`` and the ``.at[layer].set`` of the unfused stacked step), ``triton`` (``backend="triton"``)
and ``mosaic`` (``backend="mosaic"``). Each is timed by ``benchmarks/harness.py``'s ``time_loop``: ``--loop``
calls inside one jitted ``fori_loop`` over a donated carry (the dispatch of a call from Python, tens of µs on
a GPU, is more than these kernels take), ``--repeats`` samples, compilation apart. The activations pass
through ``lax.optimization_barrier`` at the top of each iteration, so that XLA can neither hoist the call out
of the loop nor drop an output (every output is carried, the stacked states in place); the weights stay
loop-invariant, as in ``generate``'s decode loop, so what XLA makes of them alone (the kernels' transposed
gate weight, the XLA gate product's float32 weight) is computed once, outside the loop.

Byte floors (read and written once at the copy bandwidth of ``--ceilings``; b the activation's bytes, b_w
the weights', 2 and 2 in bfloat16, float32 4; BH = M·NH)::

    mlstm_norm    (2 + 1)·M·D·b  + D·b_w + (D·G + G)·b_w + M·G·4      x, pending in; y, g out
    ffn_norm      (3 + 2)·M·D·b  + D·b_w                             x, pending, y_mlstm in; s, y out
    head_readout  partial sums: BH·P·(DHV + 1)·4, else h: BH·DHV·b;  + BH·4 (m') + 2·BH·DHQK·4 (n' in, the
                  stack's slice out) + BH·4 (m' out) + 2·M·NH·DHV·b (o in, y out) + NH·DHV·b_w

xLSTM-7B, bfloat16, at 4.27 TB/s (the nominal H200 copy rate)::

    M       mlstm_norm               ffn_norm                 head_readout
    1       163,936 B     0.04 µs    49,152 B      0.01 µs    106,688 B (P=4)     0.02 µs
    16      533,536 B     0.12 µs    663,552 B     0.16 µs    1,584,128 B (P=4)   0.37 µs
    128     3,293,216 B   0.77 µs    5,251,072 B   1.23 µs    5,259,264 B (h)     1.23 µs
    8192    202.0 MB      47.3 µs    335.6 MB      78.6 µs    336.1 MB (h)        78.7 µs

A decode call's time is its launch and latency, far above these floors; at M=8192 the floor is the measure.

Columns: ``us`` the median time of one call; ``floor us`` the byte floor; ``x floor`` time over floor;
``mosaic/triton`` (mosaic rows) the Mosaic kernel's time over the Triton kernel's at the same call and M;
``xla/this`` XLA's time over the row's; ``err y``, ``err s``, ``err g``, ``err nm`` max |out - ref| / max |ref|
of each output against the ``xla`` variant on the same fresh inputs (n, m: the stacked states), bounds per
dtype in :data:`BOUNDS`; ``ok`` every output within its bound.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import Column, Report, add_arguments, ceilings_from_arguments, hardware_floor, time_loop
from xlstm_jax.kernels import StepKernelConfig, add_rms_norm_pallas, head_norm_gate_pallas
from xlstm_jax.kernels.add_rms_norm import rms_norm
from xlstm_jax.kernels.mosaic import mosaic_interpret_params
from xlstm_jax.mlstm.stabilizer import normalize_readout
from xlstm_jax.models.xlstm_parallel.blocks.dense import project
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.layer import soft_cap
from xlstm_jax.models.xlstm_parallel.blocks.norm import head_norm_gate
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig

F32 = jnp.float32
OPS = ("mlstm_norm", "ffn_norm", "head_readout")
VARIANTS = ("xla", "triton", "mosaic")
LAYERS, LAYER = 2, 1  # the stacked states of the read-out: L layers, the one written

# Bounds on max |out - ref| / max |ref| against the XLA variant, by output and activation dtype.
BOUNDS = {
    # y: the float32 statistics of the two sides sum in different orders (a few float32 ulp apart), which can
    # flip a later rounding to the activation dtype; each value passes through at most four such roundings
    # (the sum after each of two adds, the normalised value, its product with the weight; in the read-out the
    # normalised value, the weight product, sigmoid(o) and the gated product), each one ulp at most: 4 ulp,
    # bfloat16 4·2^-8 = 1.6e-2, float16 4·2^-11 = 2.0e-3. float32: the statistics' sums over K <= 8192
    # elements in another order, K·2^-24 = 4.9e-4 at worst.
    "y": {"bfloat16": 2e-2, "float16": 2e-3, "float32": 5e-4},
    # s: at most two adds rounded to the dtype, which XLA may fuse into one rounding: 2 ulp.
    "s": {"bfloat16": 2 * 2**-8, "float16": 2 * 2**-11, "float32": 2 * 2**-24},
    # g: float32 sums over K of y·w: y's flipped roundings (y's bound) enter weighted by |w|, the sums' order
    # K·2^-24 (4.9e-4 at K=8192); the cap's tanh only contracts. y's bound plus the float32 order term.
    "g": {"bfloat16": 2e-2 + 5e-4, "float16": 2e-3 + 5e-4, "float32": 1e-3},
    # n, m: the read-out copies the step's n' and m' into the stacks: exact.
    "nm": {"bfloat16": 0.0, "float16": 0.0, "float32": 0.0},
}


def max_rel_err(ref: jax.Array, out: jax.Array) -> float:
    """``max |out - ref| / max |ref|`` in float64."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


# ---------------------------------------------------------------------------------------------------------
# Shapes and the calls
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shapes:
    """The sizes and settings the model passes to the kernels (from an ``xLSTMLMConfig``)."""

    D: int
    NH: int
    DHQK: int
    DHV: int
    cap: float
    norm_eps: float
    eps: float
    param_dtype: str

    @classmethod
    def from_config(cls, cfg: xLSTMLMConfig) -> Shapes:
        return cls(cfg.embedding_dim, cfg.num_heads, cfg.qk_head_dim, cfg.v_head_dim, cfg.gate_soft_cap,
                   cfg.norm_eps, cfg.eps, cfg.param_dtype)  # fmt: skip

    @property
    def G(self) -> int:  # the gates: input and forget gate of each head
        return 2 * self.NH

    @property
    def W(self) -> int:  # the fused projection's width: q, k, v, o of all heads
        return self.NH * (2 * self.DHQK + 2 * self.DHV)

    @property
    def o_offset(self) -> int:
        return self.NH * (2 * self.DHQK + self.DHV)


def model_config(smoke: bool) -> xLSTMLMConfig:
    """xLSTM-7B; ``smoke``: D=256, 2 heads of DHQK=DHV=128 (the smallest heads the Mosaic kernels take)."""
    return xLSTMLMConfig.xlstm_7b(**({"embedding_dim": 256, "num_heads": 2, "qk_dim_factor": 1.0} if smoke else {}))


def head_partial_splits(M: int, sh: Shapes, head_input: str) -> int:
    """P, the DHQK splits whose partial sums the read-out combines, or 0 where it gets h itself.

    ``head_input="model"``: as the decode step hands them over on Hopper: the Triton step's splits
    (``StepKernelConfig.get_default``) below ``mosaic_min_programs`` programs, else h from the Mosaic step."""
    cfg = StepKernelConfig.get_default(sh.DHQK, sh.DHV)
    block_dhv, splits, _ = cfg.splits(M * sh.NH, sh.DHQK, sh.DHV)
    if head_input == "partial":
        return max(splits, 2)
    if head_input == "h" or M * sh.NH * (sh.DHV // block_dhv) >= cfg.mosaic_min_programs:
        return 0
    return splits if splits > 1 else 0  # one split: the step combines h itself


@dataclass(frozen=True)
class Case:
    """One call at one M: its inputs, the outputs' names, which outputs replace an input (in place), which inputs
    are the model's weights (loop-invariant), the floor's bytes."""

    op: str
    M: int
    inputs: tuple[jax.Array, ...]
    outputs: tuple[str, ...]  # names of the outputs, in order: "y", "s", "g", "n", "m"
    inplace: dict[int, int]  # output index -> input index it replaces in the loop's carry
    weights: tuple[int, ...]  # input indices of the weights
    bytes_moved: int
    facts: dict[str, Any]


def make_case(op: str, M: int, sh: Shapes, dtype: Any, head_input: str, seed: int) -> Case:
    """Random inputs of ``op`` at M rows (never zeros: N(0, 1) activations, weights 1 + N(0, 0.1²), gate weight
    N(0, 1/D), m' uniform in [-2, 2])."""
    ks = iter(jax.random.split(jax.random.key(seed), 10))
    b, wdt = jnp.dtype(dtype).itemsize, jnp.dtype(sh.param_dtype)
    bw = wdt.itemsize

    def normal(shape, dt=dtype, scale=1.0, mean=0.0):
        return (mean + scale * jax.random.normal(next(ks), shape, F32)).astype(dt)

    D, G, NH, DHQK, DHV = sh.D, sh.G, sh.NH, sh.DHQK, sh.DHV
    if op == "mlstm_norm":
        inputs = (normal((M, D)), normal((D,), wdt, 0.1, 1.0), normal((M, D)),
                  normal((D, G), wdt, D**-0.5), normal((G,), wdt))  # fmt: skip
        nbytes = 3 * M * D * b + D * bw + (D * G + G) * bw + M * G * 4
        return Case(op, M, inputs, ("y", "g"), {}, (1, 3, 4), nbytes, {"residuals": 1, "G": G})
    if op == "ffn_norm":
        inputs = (normal((M, D)), normal((D,), wdt, 0.1, 1.0), normal((M, D)), normal((M, D)))
        return Case(op, M, inputs, ("s", "y"), {}, (1,), 5 * M * D * b + D * bw, {"residuals": 2})
    if op != "head_readout":
        raise ValueError(f"op={op!r} must be one of {OPS}")
    BH, P = M * NH, head_partial_splits(M, sh, head_input)
    if P:
        h = (normal((BH, P, DHV), F32), normal((BH, P), F32, 4.0))
        h_bytes = BH * P * (DHV + 1) * 4
    else:
        h, h_bytes = (normal((BH, DHV)),), BH * DHV * b
    m_new = jax.random.uniform(next(ks), (BH,), F32, -2.0, 2.0)
    states = (normal((BH, DHQK), F32), normal((M, sh.W)), normal((NH * DHV,), wdt, 0.1, 1.0),
              normal((LAYERS, BH, DHQK), F32), normal((LAYERS, BH), F32))  # fmt: skip
    inputs = (*h, m_new, *states)
    nbytes = h_bytes + 2 * BH * 4 + 2 * BH * DHQK * 4 + 2 * M * NH * DHV * b + NH * DHV * bw
    n_in = len(inputs)
    facts = {"h_form": "partial" if P else "h", "P": P or None}
    return Case(op, M, inputs, ("y", "n", "m"), {1: n_in - 2, 2: n_in - 1}, (n_in - 3,), nbytes, facts)


def call_fn(case: Case, variant: str, sh: Shapes, interpret: bool) -> Callable[..., tuple[jax.Array, ...]]:
    """``inputs -> outputs`` of ``case.op`` by ``variant``: the XLA function, or the kernel by backend."""
    norm_eps = sh.norm_eps  # the RMSNorm's and the per-head norm's eps; sh.eps is the cell's (the normaliser)
    if case.op in ("mlstm_norm", "ffn_norm"):
        gates = case.op == "mlstm_norm"

        def add_norm(x, weight, *rest):
            residuals, side = (rest[:1], rest[1:]) if gates else (rest, ())
            if variant != "xla":
                kw = {"eps": norm_eps, "return_sum": not gates, "interpret": interpret, "backend": variant}
                if gates:
                    kw.update(side_weight=side[0], side_bias=side[1], side_cap=sh.cap)
                s, y, g = add_rms_norm_pallas(x, weight, residuals, **kw)
                return (y, g) if gates else (s, y)
            s = x
            for r in residuals:
                s = s + r
            y = rms_norm(s, weight, norm_eps)
            if not gates:
                return s, y
            side_weight, side_bias = side  # the unfused layer's gates: a float32 product, bias, soft cap
            g = project(y, side_weight, F32, jax.lax.Precision.HIGHEST) + side_bias.astype(F32)
            return y, soft_cap(g, sh.cap)

        return add_norm

    partial = case.facts["h_form"] == "partial"
    NH, DHV, off = sh.NH, sh.DHV, sh.o_offset

    def readout(*args):
        h, (m_new, n_new, o, weight, n, m) = (args[:2], args[2:]) if partial else (args[0], args[1:])
        if variant != "xla":
            kw = {"num_heads": NH, "o_offset": off, "norm_eps": norm_eps, "m": m_new, "eps": sh.eps}
            y, (n, m) = head_norm_gate_pallas(
                tuple(h) if partial else h, o, weight, states=(n_new, n, m, LAYER), interpret=interpret,
                backend=variant, **kw,
            )  # fmt: skip
            return y, n, m
        if partial:  # the step's epilogue: the splits summed, divided by the normaliser, rounded to the dtype
            h = normalize_readout(h[0].sum(axis=1), h[1].sum(axis=1), m_new, sh.eps).astype(o.dtype)
        B = o.shape[0]
        y = head_norm_gate(h.reshape(B, NH, DHV), o[:, off : off + NH * DHV], weight, norm_eps)
        return y, n.at[LAYER].set(n_new), m.at[LAYER].set(m_new)

    return readout


def loop_body(fn: Callable, case: Case) -> Callable:
    """``carry -> carry`` for ``time_loop``: carry = (inputs, outputs not in place); each iteration calls ``fn``
    on the inputs, all but the weights passed through an ``optimization_barrier`` first (no hoisting of the
    invariant call; the weights stay loop-invariant, as in ``generate``'s decode loop, so that XLA prepares them
    once, e.g. the transposed gate weight), the in-place outputs replacing their inputs, the others carried
    (none dropped)."""
    n_in = len(case.inputs)

    def body(carry):
        free = [k for k in range(len(carry)) if k not in case.weights]
        barred = jax.lax.optimization_barrier(tuple(carry[k] for k in free))
        carry = list(carry)
        for k, x in zip(free, barred, strict=True):
            carry[k] = x
        ins = carry[:n_in]
        outs = fn(*ins)
        for o, i in case.inplace.items():
            ins[i] = outs[o]
        return (*ins, *(x for k, x in enumerate(outs) if k not in case.inplace))

    return body


def loop_init(fn: Callable, case: Case) -> tuple[jax.Array, ...]:
    """The loop's first carry: the inputs, then zeros for the outputs that are not in place."""
    shapes = jax.eval_shape(fn, *case.inputs)
    extra = (jnp.zeros(s.shape, s.dtype) for k, s in enumerate(shapes) if k not in case.inplace)
    return (*case.inputs, *extra)


def unavailable(variant: str, interpret: bool) -> str | None:
    """Why ``variant`` cannot run here, or None."""
    if variant == "mosaic" and interpret and mosaic_interpret_params() is None:
        return f"JAX {jax.__version__} has no Mosaic GPU interpret mode (mosaic_interpret_params() is None)"
    return None


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
COLUMNS = [
    Column("op", "op", width=12),
    Column("M", "M", width=5),
    Column("variant", "variant", width=7),
    Column("h", "h_form", width=7),
    Column("us", "median_s", ".2f", 1e6),
    Column("spread", "spread", ".2f", width=6),
    Column("compile s", "compile_s", ".2f"),
    Column("floor us", "floor_s", ".3f", 1e6),
    Column("x floor", "x_floor", ".1f"),
    Column("mosaic/triton", "mosaic_over_triton", ".2f"),
    Column("xla/this", "xla_over_this", ".2f"),
    Column("err y", "err_y", ".1e"),
    Column("err s", "err_s", ".1e"),
    Column("err g", "err_g", ".1e"),
    Column("err nm", "err_nm", ".1e"),
    Column("ok", "ok", width=5),
]


def errors(case: Case, ref: Sequence[jax.Array], out: Sequence[jax.Array], dtype_name: str) -> dict[str, Any]:
    """``err_<name>`` of each output against the reference, the bounds, and ``ok``."""
    row: dict[str, Any] = {}
    for name, r, o in zip(case.outputs, ref, out, strict=True):
        key = "nm" if name in ("n", "m") else name
        row[f"err_{key}"] = max(row.get(f"err_{key}", 0.0), max_rel_err(r, o))
    bounds = {k[4:]: BOUNDS[k[4:]][dtype_name] for k in row}
    row["bounds"] = bounds
    row["ok"] = all(row[f"err_{k}"] <= bound for k, bound in bounds.items())
    return row


def bench(report: Report, a: argparse.Namespace, interpret: bool) -> None:
    sh = Shapes.from_config(model_config(a.smoke))
    report.set("shapes", {**asdict(sh), "G": sh.G, "W": sh.W, "o_offset": sh.o_offset, "dtype": a.dtype})
    ceilings = ceilings_from_arguments(a, report)
    report.table("norms", COLUMNS)
    deadline = time.time() + a.budget_s
    dtype_name = jnp.dtype(a.dtype).name
    for op in a.ops:
        for M in a.rows:
            check = make_case(op, M, sh, a.dtype, a.head_input, seed=0)
            floor = hardware_floor(bytes_moved=check.bytes_moved, bandwidth=ceilings.copy_bytes_per_s)
            ref = jax.jit(call_fn(check, "xla", sh, interpret))(*check.inputs)
            times: dict[str, float] = {}
            for variant in a.variants:
                label = f"{op} M={M} {variant}"
                if time.time() > deadline:
                    report.note(f"{label}: skipped (--budget-s spent)")
                    continue
                reason = unavailable(variant, interpret)
                if reason is not None:
                    report.note(f"{label}: skipped ({reason})")
                    continue
                try:
                    fn = call_fn(check, variant, sh, interpret)
                    row_err = {} if variant == "xla" else errors(check, ref, jax.jit(fn)(*check.inputs), dtype_name)
                    case = make_case(op, M, sh, a.dtype, a.head_input, seed=1)  # fresh inputs: the loop donates them
                    timing = time_loop(loop_body(fn, case), loop_init(fn, case), a.loop, repeats=a.repeats)
                except Exception as exc:  # a kernel that does not compile here is reported, not fatal
                    report.note(f"{label}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                    continue
                t = times[variant] = timing.median_s
                row = {"op": op, "M": M, "variant": variant, "dtype": dtype_name, **check.facts, **timing.as_row()}
                row.update(bytes=check.bytes_moved, floor_s=floor.seconds, x_floor=t / floor.seconds, **row_err)
                if variant == "mosaic" and "triton" in times:
                    row["mosaic_over_triton"] = t / times["triton"]
                if "xla" in times:
                    row["xla_over_this"] = times["xla"] / t
                report.add("norms", row)


SMOKE = {"rows": [3], "loop": 2, "repeats": 1}  # --smoke: defaults for a CPU check (explicit options win)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed and checked options (``--smoke`` changes the defaults; explicit options still win)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (D=256, 2 heads of 128), kernels interpreted")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="the calls to time")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 128, 8192], help="M: rows (batch) per call")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="activations")
    head_help = "the read-out's h: as the decode step hands it over on Hopper, partial sums, or h"
    p.add_argument("--head-input", choices=("model", "partial", "h"), default="model", help=head_help)
    p.add_argument("--loop", type=int, default=100, help="calls per timed jitted loop")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="skip the cases left after this")
    add_arguments(p, repeats=5)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--smoke" in argv:
        p.set_defaults(**SMOKE)
    a = p.parse_args(argv)
    for name in ("loop", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if min(a.rows) < 1:
        p.error(f"--rows must be positive, got {a.rows}")
    return a


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark; returns the report's data (what ``--json`` writes)."""
    a = parse(argv)
    report = Report("norms", "benchmarks/norms.py", vars(a), a.json, argv)
    interpret = jax.default_backend() != "gpu"  # off a GPU: Pallas interpret mode and Mosaic GPU's interpreter
    report.set("interpret", interpret)
    bench(report, a, interpret)
    return report.data


if __name__ == "__main__":
    main()
