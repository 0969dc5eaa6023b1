"""Times the forms of the mLSTM cell (recurrent scan, parallel, chunkwise) against each other.

Reproduces BENCHMARKS.md's table of the cell's forms (an H200, the head shape of xLSTM-7B)::

    PYTHONPATH=. python3 benchmarks/forms.py --B 8 --NH 8 --DHQK 256 --DHV 512 --dtype bfloat16 \\
        --S 256 1024 2048 4096 --chunk-sizes 64 128 256 --repeats 10 --json forms.json

and on a CPU at tiny shapes (a smoke test): ``PYTHONPATH=. python benchmarks/forms.py --B 1 --S 16 --NH 1
--DHQK 16 --DHV 16 --chunk-sizes 8 --repeats 2``. ``--plot FILE.png`` draws time against S (needs matplotlib);
``--plot-from A.json ...`` draws it from earlier runs' JSON.

Each form is jitted from the public functions of ``xlstm_jax.mlstm`` and timed by ``benchmarks/harness.py``
(compilation apart, median of ``--repeats`` calls, each blocked until ready). Modes: ``fwd`` (h only) and
``fwdbwd`` (the gradient of ``sum(h * ct)`` with respect to q, k, v, i, f for a random cotangent). ``x base``
is the time over the first row's at the same S and mode (the first chunk size's when chunkwise runs).

The floor (one per S and mode, so that floor/time compares the forms): per head, the chunkwise form's
matrix-product FLOPs at chunk size L, ``4·S·DHQK·DHV`` (the chunk summaries k̃ᵀv and the read-out q·C,
2·S·DHQK·DHV each) ``+ S·L·(DHQK + DHV)`` (the causal halves of q·kᵀ and scores·v on L x L blocks), times
B·NH, at the bf16 matrix rate; against its bytes, q, k, v, i, f read once and h written once,
``B·NH·S·(2·DHQK + 2·DHV + 2)`` elements, at the copy bandwidth; whichever is longer. fwd+bwd counts 3x the
FLOPs and 2x the bytes (the cotangent of h read, five gradients written). L is each chunkwise row's own, and
the first of ``--chunk-sizes`` for the other forms.

Check: every form's h (fwd) against the recurrent scan, ``recurrent_sequence_fw``, the library's literal
XLA form, on the same inputs (relative RMS error, bounds in :data:`RMS_BOUND`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import Column, Report, add_arguments, ceilings_from_arguments, hardware_floor, time_jitted
from xlstm_jax.mlstm import chunkwise_fw, parallel_stabilized_fw, recurrent_sequence_fw

# Bound on the relative RMS error of a form's h against the recurrent scan on the same inputs, by dtype.
RMS_BOUND = {
    # u = 6e-8. Forget preacts N(3, 1) give log σ(f) ≈ -0.05, so the log-gate sums reach 0.05·S (800 at
    # S=16384); the forms combine them in different orders (cumulative sums and their differences against
    # step-by-step products), so a gate weight exp(F_t - F_s) carries a relative error of ~u·0.05·S = 5e-5 at
    # S=16384, and the dot products over DHQK add ~u·sqrt(DHQK). 1e-4 covers S up to 16384.
    "float32": 1e-4,
    # h is rounded to bf16 (relative RMS 2^-9/sqrt(3) = 1.1e-3 per rounding, two roundings of slightly different
    # float32 values), and the chunkwise and parallel forms feed bf16 operands to the matrix units (the
    # gated scores and the chunk states rounded once each, 2^-9 relative). Their sum, 4·2^-9 = 7.8e-3 worst
    # case per element, bounds the RMS too: 1e-2.
    "bfloat16": 1e-2,
}


def make_args(B: int, NH: int, S: int, DHQK: int, DHV: int, dtype: jnp.dtype) -> tuple[jax.Array, ...]:
    """Random q, k, v (normal), input gates N(0, 1) and forget gates N(3, 1) in ``dtype``; never zeros.

    Returns:
        q (B, NH, S, DHQK), k (B, NH, S, DHQK), v (B, NH, S, DHV), i (B, NH, S), f (B, NH, S).
    """
    kq, kk, kv, ki, kf = jax.random.split(jax.random.key(S), 5)
    q = jax.random.normal(kq, (B, NH, S, DHQK), dtype)
    k = jax.random.normal(kk, (B, NH, S, DHQK), dtype)
    v = jax.random.normal(kv, (B, NH, S, DHV), dtype)
    i = jax.random.normal(ki, (B, NH, S), dtype)
    f = (3.0 + jax.random.normal(kf, (B, NH, S), jnp.float32)).astype(dtype)
    return q, k, v, i, f


def recurrent_scan(*args: jax.Array) -> jax.Array:
    """The recurrent form over the sequence as one ``lax.scan``, float32 states."""
    return recurrent_sequence_fw(*args, use_scan=True, state_dtype="float32")


def forms(chunk_sizes: Sequence[int], names: Sequence[str]) -> dict[str, tuple[Callable, int | None]]:
    """``{row name: (form, chunk size or None)}`` for the forms in ``names``; chunkwise once per chunk size."""
    table: dict[str, tuple[Callable, int | None]] = {}
    if "chunkwise" in names:
        for L in chunk_sizes:
            table[f"chunkwise L={L}"] = (lambda *a, L=L: chunkwise_fw(*a, chunk_size=L), L)
    if "parallel" in names:
        table["parallel"] = (parallel_stabilized_fw, None)
    if "recurrent" in names:
        table["recurrent"] = (recurrent_scan, None)
    return table


def jitted(form: Callable, mode: str, args: tuple[jax.Array, ...]) -> tuple[Callable, tuple[jax.Array, ...]]:
    """``form`` jitted for ``mode``, and the arguments to call it with: for ``fwd`` h from ``args``; for ``fwdbwd``
    the gradients of ``sum(h * ct)`` in q, k, v, i and f, from ``args`` and a random float32 ``ct`` after them.

    ``ct`` is an argument rather than an array the function closes over: XLA compiles a closed-over array into the
    program as a constant (1.07 GB at B=8, NH=8, S=8192, DHV=512), and that alone took the compilation of the
    chunkwise kernel's forward and backward for an H200 from 6.1 to 69.5 s at S=8192 (6.5 to 22.6 s at 2048).
    """
    if mode == "fwd":
        return jax.jit(form), tuple(args)
    q, _, v = args[:3]
    ct = jax.random.normal(jax.random.key(1), q.shape[:3] + v.shape[-1:], jnp.float32)

    def loss(*a):
        *inputs, cotangent = a
        return jnp.sum(form(*inputs).astype(jnp.float32) * cotangent)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))), (*args, ct)


def sequence_bytes(B: int, NH: int, S: int, DHQK: int, DHV: int, itemsize: int) -> int:
    """Bytes a sequence form must move at least: q, k, v, i, f read once and h written once."""
    return B * NH * S * (2 * DHQK + 2 * DHV + 2) * itemsize


def floor_counts(B: int, NH: int, S: int, DHQK: int, DHV: int, L: int, itemsize: int, mode: str) -> tuple[int, int]:
    """``(FLOPs, bytes)`` behind the floor of one call (the module docstring gives the counts)."""
    flops = B * NH * (4 * S * DHQK * DHV + S * min(L, S) * (DHQK + DHV))
    nbytes = sequence_bytes(B, NH, S, DHQK, DHV, itemsize)
    return (3 * flops, 2 * nbytes) if mode == "fwdbwd" else (flops, nbytes)


def rel_rms(ref: np.ndarray, out: np.ndarray) -> float:
    """``sqrt(mean((out - ref)²) / mean(ref²))`` in float64."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return float(np.sqrt(np.mean((out - ref) ** 2) / np.mean(ref**2)))


COLUMNS = [
    Column("form", "form", width=16),
    Column("S", "S", width=6),
    Column("mode", "mode", width=6),
    Column("ms", "median_s", ".3f", 1e3),
    Column("spread", "spread", ".2f"),
    Column("compile s", "compile_s", ".2f"),
    Column("x base", "x_base", ".2f"),
    Column("Mtok/s", "tokens_per_s", ".3f", 1e-6),
    Column("floor ms", "floor_s", ".3f", 1e3),
    Column("floor/t", "floor_fraction", ".3f"),
    Column("rel err", "rel_err", ".1e"),
    Column("ok", "ok", width=5),
]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--NH", type=int, default=4)
    p.add_argument("--DHQK", type=int, default=64)
    p.add_argument("--DHV", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=sorted(RMS_BOUND))
    p.add_argument("--S", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[256], help="chunkwise chunk sizes L")
    p.add_argument("--forms", nargs="+", default=["chunkwise", "parallel", "recurrent"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--max-parallel-S", type=int, default=4096, help="skip the quadratic form above this S")
    p.add_argument("--max-recurrent-S", type=int, default=4096, help="skip the recurrent scan above this S")
    p.add_argument("--recurrent-modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--calls", type=int, default=1, help="calls queued back to back per timed sample")
    p.add_argument("--plot", help="draw time against S on log-log axes into this PNG (needs matplotlib)")
    p.add_argument("--plot-from", nargs="+", help="only draw --plot from the results of these --json files")
    add_arguments(p, repeats=10)
    a = p.parse_args(argv)
    unknown = sorted(set(a.forms) - {"chunkwise", "parallel", "recurrent"})
    if unknown:
        p.error(f"--forms: unknown {unknown}; choose from chunkwise, parallel, recurrent")
    if a.plot_from and not a.plot:
        p.error("--plot-from needs --plot")
    return a


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark; returns the report's data (what ``--json`` writes)."""
    a = parse(argv)
    if a.plot_from:
        runs = [json.loads(Path(path).read_text()) for path in a.plot_from]
        plot([r for run in runs for r in run["tables"]["forms"]], a.plot, title(runs[0]))
        return {}
    report = Report("forms", "benchmarks/forms.py", vars(a), a.json, argv)
    ceilings = ceilings_from_arguments(a, report)
    dtype = jnp.dtype(a.dtype)
    table = forms(a.chunk_sizes, a.forms)
    report.table("forms", COLUMNS)
    for S in a.S:
        args = make_args(a.B, a.NH, S, a.DHQK, a.DHV, dtype)
        h_ref = (
            np.asarray(jax.jit(lambda *x: recurrent_scan(*x))(*args), np.float32) if a.max_recurrent_S >= S else None
        )
        for mode in a.modes:
            base = None
            for name, (form, L) in table.items():
                if name == "parallel" and a.max_parallel_S < S:
                    continue
                if name == "recurrent" and (a.max_recurrent_S < S or mode not in a.recurrent_modes):
                    continue
                flops, nbytes = floor_counts(a.B, a.NH, S, a.DHQK, a.DHV, L or a.chunk_sizes[0], dtype.itemsize, mode)
                floor = hardware_floor(
                    bytes_moved=nbytes,
                    flops=flops,
                    bandwidth=ceilings.copy_bytes_per_s,
                    flop_rate=ceilings.matmul_flops_per_s,
                )
                row = {"form": name, "S": S, "mode": mode, "L": L, "flops": flops, "bytes": nbytes}
                fn, call_args = jitted(form, mode, args)
                try:
                    timing = time_jitted(fn, *call_args, repeats=a.repeats, calls=a.calls)
                    if mode == "fwd" and h_ref is not None:
                        err = rel_rms(h_ref, np.asarray(fn(*call_args), np.float32))
                        row.update(rel_err=err, bound=RMS_BOUND[a.dtype], ok=err <= RMS_BOUND[a.dtype])
                except Exception as exc:  # out of memory at large S: recorded, and the run goes on
                    report.note(f"{name} S={S} {mode}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                base = base or timing.median_s
                row.update(timing.as_row())
                row.update(
                    x_base=timing.median_s / base,
                    tokens_per_s=a.B * S / timing.median_s,
                    floor_s=floor.seconds,
                    floor_bound=floor.bound,
                    floor_fraction=floor.fraction(timing.median_s),
                )
                report.add("forms", row)
        del args
    if a.plot:
        plot(report.data["tables"]["forms"], a.plot, title(report.data))
    return report.data


def title(data: dict) -> str:
    """A plot title from a report's data: device, head shape, dtype."""
    s = data["settings"]
    return f"{data['environment']['device']}, B={s['B']} NH={s['NH']} DHQK={s['DHQK']} DHV={s['DHV']}, {s['dtype']}"


def plot(rows: list[dict], path: str, heading: str) -> None:
    """Time against S on log-log axes, one line per form and mode (solid: fwd, dashed: fwd+bwd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    for idx, name in enumerate(sorted({r["form"] for r in rows})):
        for mode, style in (("fwd", "-"), ("fwdbwd", "--")):
            pts = sorted({r["S"]: r["median_s"] * 1e3 for r in rows if r["form"] == name and r["mode"] == mode}.items())
            if pts:
                label = f"{name} {'fwd' if mode == 'fwd' else 'fwd+bwd'}"
                ax.loglog(*zip(*pts, strict=True), style, marker="o", color=f"C{idx}", label=label)
    ax.set_xlabel("sequence length S")
    ax.set_ylabel("time (ms)")
    ax.set_title(heading, fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
