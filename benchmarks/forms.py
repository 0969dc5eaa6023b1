"""Times the forms of the mLSTM cell (recurrent scan, parallel, chunkwise) against each other.

For every form and sequence length: jit, one warm-up call (compilation), then the median wall time of
``--reps`` calls, each blocked until its result is ready. Modes: ``fwd`` (h only) and ``fwdbwd`` (the
gradient of ``sum(h * ct)`` with respect to q, k, v, i, f for a random cotangent). Ratios are taken against
the first chunkwise variant of the same run, at the same S and mode.

The floor of the chunkwise form is the larger of two times: its matrix-product FLOPs at ``--tflops``
(per head and chunk size L: 2·S·DHQK·DHV for the chunk summaries k̃ᵀv, the same for the read-out q·C, and
S·L·(DHQK + DHV) for the causal halves of q·kᵀ and scores·v; fwd+bwd counts three times that), and its
unavoidable bytes at ``--tbps`` (q, k, v, i, f read once and h written once; fwd+bwd also reads the
cotangent of h and writes the five gradients).

CPU (default shape)::

    PYTHONPATH=. python benchmarks/forms.py

H200 (the shape of issue 3)::

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/forms.py --B 8 --NH 8 --DHQK 256 --DHV 512 \\
        --dtype bfloat16 --S 256 1024 2048 4096 --chunk-sizes 64 128 256 --plot docs/forms.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.mlstm.chunkwise import border_states, chunkwise_fw
from xlstm_jax.mlstm.parallel import block_readout, block_summary, matmul_dtype, parallel_stabilized_fw
from xlstm_jax.mlstm.recurrent import recurrent_sequence_fw
from xlstm_jax.mlstm.stabilizer import log_forget_gate


def median_time(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of ``fn()`` (blocked until ready) over ``reps`` calls, after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_args(B: int, NH: int, S: int, DHQK: int, DHV: int, dtype) -> tuple[jax.Array, ...]:
    """Random q, k, v (normal), input gates N(0, 1) and forget gates N(3, 1) in ``dtype``; never zeros."""
    kq, kk, kv, ki, kf = jax.random.split(jax.random.key(S), 5)
    q = jax.random.normal(kq, (B, NH, S, DHQK), dtype)
    k = jax.random.normal(kk, (B, NH, S, DHQK), dtype)
    v = jax.random.normal(kv, (B, NH, S, DHV), dtype)
    i = jax.random.normal(ki, (B, NH, S), dtype)
    f = (3.0 + jax.random.normal(kf, (B, NH, S), jnp.float32)).astype(dtype)
    return q, k, v, i, f


def forms(chunk_sizes: list[int], unrolls: list[int]) -> dict[str, Callable]:
    table = {}
    for L in chunk_sizes:
        for u in unrolls:
            name = f"chunkwise L={L}" + (f" unroll={u}" if u != unrolls[0] else "")
            table[name] = lambda *a, L=L, u=u: chunkwise_fw(*a, chunk_size=L, scan_unroll=u)
    table["parallel"] = parallel_stabilized_fw
    table["recurrent"] = lambda *a: recurrent_sequence_fw(*a, use_scan=True, state_dtype="float32")
    return table


def compile_mode(form: Callable, mode: str, args: tuple[jax.Array, ...]) -> Callable[[], object]:
    if mode == "fwd":
        fn = jax.jit(form)
        return lambda: fn(*args)
    ct = jax.random.normal(jax.random.key(1), args[0].shape[:3] + (args[2].shape[-1],), args[0].dtype)

    def loss(*a):
        return jnp.sum(form(*a).astype(jnp.float32) * ct.astype(jnp.float32))

    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    return lambda: fn(*args)


def floor_seconds(B, NH, S, DHQK, DHV, L, itemsize, mode, tflops, tbps) -> tuple[float, float, float]:
    """``(floor seconds, FLOPs, bytes)`` of the chunkwise form (see the module docstring)."""
    flops = B * NH * (4 * S * DHQK * DHV + S * min(L, S) * (DHQK + DHV))
    io = B * NH * S * (2 * DHQK + 2 * DHV + 2) * itemsize  # q, k, v, i, f in; h out
    if mode == "fwdbwd":
        flops *= 3
        io = 2 * io  # + cotangent of h in, five gradients out
    return max(flops / (tflops * 1e12), io / (tbps * 1e12)), flops, io


def stage_times(args, L: int, unroll: int, reps: int) -> dict[str, float]:
    """Forward time of each stage of the chunkwise form on its own (S must be a multiple of L)."""
    q, k, v, i, f = args
    B, NH, S, DHQK = q.shape
    DHV = v.shape[-1]
    NC = S // L
    od = matmul_dtype(q.dtype, jnp.float32)
    q, k = (x.reshape(B, NH, NC, L, DHQK) for x in (q, k))
    v = v.reshape(B, NH, NC, L, DHV)
    F = jnp.cumsum(log_forget_gate(f.astype(jnp.float32)).reshape(B, NH, NC, L), axis=-1)
    i = i.astype(jnp.float32).reshape(B, NH, NC, L)
    zeros = (jnp.zeros((B, NH, DHQK, DHV)), jnp.zeros((B, NH, DHQK)), jnp.zeros((B, NH)))
    summary = jax.jit(lambda k, v, F, i: block_summary(k, v, F, i, od))
    cbar, nbar, ml = summary(k, v, F, i)
    borders = jax.jit(lambda *a: border_states(*a, *zeros, od, unroll))
    _, (c_b, n_b, m_b) = borders(F[..., -1], cbar, nbar, ml)
    readout = jax.jit(lambda *a: block_readout(*a, 1e-6, od))
    return {
        "1 summaries k~T v": median_time(lambda: summary(k, v, F, i), reps),
        "2 border states": median_time(lambda: borders(F[..., -1], cbar, nbar, ml), reps),
        "3 read-out": median_time(lambda: readout(q, k, v, F, i, c_b, n_b, m_b), reps),
    }


def measure_ceilings(reps: int) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate on random data."""
    x = jax.random.normal(jax.random.key(0), (256 * 1024 * 1024,), jnp.float32)
    copy = jax.jit(lambda x: x * 1.0001)
    a = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    return {
        "copy TB/s": 2 * x.nbytes / median_time(lambda: copy(x), reps) / 1e12,
        "bf16 matmul TFLOP/s": 2 * 8192**3 / median_time(lambda: mm(a), reps) / 1e12,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--NH", type=int, default=4)
    p.add_argument("--DHQK", type=int, default=64)
    p.add_argument("--DHV", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--S", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[64])
    p.add_argument("--unrolls", type=int, nargs="+", default=[8], help="chunkwise scan_unroll values")
    p.add_argument("--forms", nargs="+", default=["chunkwise", "parallel", "recurrent"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--max-parallel-S", type=int, default=4096, help="skip the quadratic form above this S")
    p.add_argument("--max-recurrent-S", type=int, default=4096, help="skip the recurrent scan above this S")
    p.add_argument("--recurrent-modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--breakdown-S", type=int, nargs="*", default=[], help="time the chunkwise stages at these S")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tflops", type=float, default=700.0, help="matmul rate for the floor")
    p.add_argument("--tbps", type=float, default=4.27, help="memory bandwidth for the floor")
    p.add_argument("--ceilings", action="store_true", help="measure copy bandwidth and bf16 matmul rate first")
    p.add_argument("--json", help="write all rows to this file")
    p.add_argument("--plot", help="draw time against S on log-log axes into this PNG (needs matplotlib)")
    p.add_argument("--plot-from", nargs="+", help="only draw --plot from the rows of these --json files")
    a = p.parse_args(argv)
    if a.plot_from:
        runs = []
        for path in a.plot_from:
            with open(path) as fh:
                runs.append(json.load(fh))
        title = f"{runs[0]['device']}, {runs[0]['shape']}, {runs[0]['dtype']}"
        plot([r for run in runs for r in run["rows"]], a.plot, title)
        return []
    dtype = jnp.dtype(a.dtype)
    shape = {"B": a.B, "NH": a.NH, "DHQK": a.DHQK, "DHV": a.DHV}
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, {shape}, {a.dtype}, reps={a.reps}")
    if a.ceilings:
        print("# ceilings:", {k: round(v, 1) for k, v in measure_ceilings(a.reps).items()})

    table = {name: fn for name, fn in forms(a.chunk_sizes, a.unrolls).items() if name.split()[0] in a.forms}
    baseline = next((name for name in table if name.startswith("chunkwise")), None)
    rows = []
    for S in a.S:
        args = make_args(a.B, a.NH, S, a.DHQK, a.DHV, dtype)
        h_ref = None  # the recurrent scan's h on the same inputs, when it runs at this S
        for mode in a.modes:
            for name, form in sorted(table.items(), key=lambda item: item[0] != "recurrent"):
                if name == "parallel" and a.max_parallel_S < S:
                    continue
                if name == "recurrent" and (a.max_recurrent_S < S or mode not in a.recurrent_modes):
                    continue
                err = float("nan")
                try:
                    run = compile_mode(form, mode, args)
                    seconds = median_time(run, a.reps)
                    if mode == "fwd":
                        h = np.asarray(run(), np.float32)
                        h_ref = h if name == "recurrent" else h_ref
                        if h_ref is not None:
                            err = float(np.sqrt(np.mean((h - h_ref) ** 2) / np.mean(h_ref**2)))
                except Exception as exc:  # out of memory at large S: record and go on
                    seconds = float("nan")
                    print(f"# {name} S={S} {mode}: {type(exc).__name__}: {str(exc)[:200]}")
                rows.append({"form": name, "S": S, "mode": mode, "ms": seconds * 1e3, "rel_err": err})
        if S in a.breakdown_S:
            for L in (L for L in a.chunk_sizes if S % L == 0):
                for stage, seconds in stage_times(args, L, a.unrolls[0], a.reps).items():
                    rows.append({"form": f"chunkwise L={L} stage {stage}", "S": S, "mode": "fwd", "ms": seconds * 1e3})
        del args

    print(
        f"{'form':<40} {'S':>6} {'mode':<7} {'ms':>9} {'x base':>7} {'Mtok/s':>8} {'floor ms':>9} {'floor/t':>8} "
        f"{'rel err':>8}"
    )
    for r in rows:
        base = next((b["ms"] for b in rows if b["form"] == baseline and b["S"] == r["S"] and b["mode"] == r["mode"]), 0)
        L = int(r["form"].split("L=")[1].split()[0]) if "L=" in r["form"] else a.chunk_sizes[0]
        floor, flops, io = floor_seconds(
            a.B, a.NH, r["S"], a.DHQK, a.DHV, L, dtype.itemsize, r["mode"], a.tflops, a.tbps
        )
        r.update(ratio=r["ms"] / base if base else float("nan"), floor_ms=floor * 1e3, flops=flops, bytes=io)
        print(
            f"{r['form']:<40} {r['S']:>6} {r['mode']:<7} {r['ms']:>9.3f} {r['ratio']:>7.2f} "
            f"{a.B * r['S'] / r['ms'] / 1e3:>8.2f} {floor * 1e3:>9.3f} {floor * 1e3 / r['ms']:>8.3f} "
            f"{r.get('rel_err', float('nan')):>8.1e}"
        )
    if a.json:
        with open(a.json, "w") as fh:
            info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "shape": shape, "dtype": a.dtype}
            json.dump({**info, "rows": rows}, fh, indent=1)
    if a.plot:
        plot(rows, a.plot, f"{jax.devices()[0].device_kind}, {shape}, {a.dtype}")
    return rows


def plot(rows: list[dict], path: str, title: str) -> None:
    """Time against S on log-log axes, one line per form and mode (solid: fwd, dashed: fwd+bwd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    names = sorted({r["form"] for r in rows if "stage" not in r["form"] and "unroll" not in r["form"]})
    for idx, name in enumerate(names):
        for mode, style in (("fwd", "-"), ("fwdbwd", "--")):
            pts = sorted({r["S"]: r["ms"] for r in rows if r["form"] == name and r["mode"] == mode}.items())
            pts = [(s, t) for s, t in pts if np.isfinite(t)]
            if pts:
                label = f"{name} {'fwd' if mode == 'fwd' else 'fwd+bwd'}"
                ax.loglog(*zip(*pts, strict=True), style, marker="o", color=f"C{idx}", label=label)
    ax.set_xlabel("sequence length S")
    ax.set_ylabel("time (ms)")
    ax.set_title(title, fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
