"""Times NX-AI's PyTorch/Triton mLSTM kernels (package ``mlstm_kernels``), anchors for the library's timings.

The anchors, in eager PyTorch (no ``torch.compile`` here; the package compiles its gate helpers with it, in
the warm-up): the TFLA chunkwise kernel ``get_mlstm_kernel("chunkwise--triton_xl_chunk")`` (``--chunk-size``),
fwd (h) and fwdbwd (the gradients of ``sum(h * ct)``, random float32 ct, in q, k, v, i, f), and the Triton
decode step ``get_mlstm_step_kernel("triton")``. Shapes as in ``benchmarks/forms.py`` and
``benchmarks/kernels.py`` (B=8, NH=8, DHQK=256, DHV=512; bf16 q, k, v; float32 states; forget gates N(3, 1),
input gates N(0, 1)); the gates in ``--gate-dtype``, float32 as a PyTorch model passes them (those scripts
pass bf16 gates: under 0.2% of the bytes). Rows go to the tables ``forms`` and ``step`` with those scripts'
fields (form, S, mode; B, variant, mode; median_s; floors), for ratios between JSON files of one machine.

Timing: ``--warmup`` calls (the first, the kernels' compilation, timed on the host as ``warmup_s``), then the
median of ``--repeats`` samples, each between two CUDA events. A sample: ``--calls`` sequence calls; for the
step, mode ``queued``: ``--queued`` steps launched from Python (the host's dispatch included, as kernels.py's
``queued``), mode ``loop``: one replay of a CUDA graph of ``--loop`` steps (the device's time).

Checks (table ``checks``): max |out - ref| / max |ref| against the README's recurrence run in float64
(:func:`reference_step`) on the same inputs; the step's h and states at each B, the chunkwise kernel's h and
gradients (reported, not bounded) at B=2, NH=2, S=384 and the benchmarked head sizes.

On a GPU machine without registry access, with the wheel of mlstm_kernels 2.0.6 in ``.whl/`` (pure Python;
it needs einops, numpy, PyYAML, matplotlib and torch besides)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=/tmp/site:. DISABLE_LLVM_OPT=1 python3 benchmarks/anchors.py --json anchors.json

The TFLA kernels need ``DISABLE_LLVM_OPT=1`` under Triton 3.6; the script sets it, unless set, before triton
is imported, and keeps JAX (the harness's environment) from preallocating GPU memory. Without torch, a CUDA
GPU, triton or mlstm_kernels it says which is missing and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

from benchmarks.forms import floor_counts
from benchmarks.harness import Column, Report, Timing, add_arguments, ceilings_from_arguments, hardware_floor
from benchmarks.kernels import BOUNDS, EPS, max_rel_err, step_bytes

os.environ.setdefault("DISABLE_LLVM_OPT", "1")  # the TFLA kernels under Triton 3.6; set before triton is imported
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX (the harness's environment) beside torch
try:  # optional here: main() exits with status 2 without it
    import torch
except ImportError as exc:
    torch, TORCH_MISSING = None, str(exc)

CHUNKWISE, STEP = "chunkwise--triton_xl_chunk", "triton"
CHECK_SHAPE = (2, 2, 384)  # B, NH, S of the chunkwise check: three chunks of 128
# Bounds on max |out - ref| / max |ref| against the float64 recurrence on the same (bf16) inputs.
ANCHOR_BOUNDS = {
    # kernels.py's bound on a fused kernel's h, for the same reasons (bf16 h, bf16 operands of the matrix units).
    "sequence h": BOUNDS["sequence h"],
    # The step kernel multiplies in bfloat16 where the library keeps float32: f' (2^-9 relative), and
    # i'·(k vᵀ) with i', k vᵀ and their product each rounded (3·2^-9); c' and n' are about 3·2^-9 off, and as
    # the two terms of c' can be up to ~1.5 max|c'|, 4.5·2^-9 = 8.8e-3 of max|c'|: 1e-2.
    "step states": 1e-2,
    # h = q̂·c' / max(|q̂·n'|, exp(-m')): c' and n' as above and rounded to bf16 once more for the read-out
    # (4·2^-9 each, in the numerator and the normaliser), h rounded to bf16 (2^-9): 9·2^-9 = 1.8e-2, 2e-2.
    "step h": 2e-2,
}
CHECK_COLUMNS = [Column("anchor", "anchor", width=26), Column("shape", "shape", width=18),
                 Column("quantity", "quantity", width=8), Column("err", "err", ".1e"),
                 Column("bound", "bound", ".0e"), Column("ok", "ok", width=5)]  # fmt: skip
STEP_COLUMNS = [Column("B", "B", width=4), Column("variant", "variant", width=22), Column("mode", "mode", width=6),
                Column("us", "median_s", ".1f", 1e6), Column("spread", "spread", ".2f"),
                Column("floor us", "floor_s", ".1f", 1e6), Column("floor/t", "floor_fraction", ".3f"),
                Column("ok", "ok", width=5)]  # fmt: skip
FORMS_COLUMNS = [Column("form", "form", width=12), Column("S", "S", width=6), Column("mode", "mode", width=6),
                 Column("ms", "median_s", ".3f", 1e3), Column("spread", "spread", ".2f"),
                 Column("Mtok/s", "tokens_per_s", ".3f", 1e-6), Column("floor ms", "floor_s", ".3f", 1e3),
                 Column("floor/t", "floor_fraction", ".3f")]  # fmt: skip


def fail(message: str) -> NoReturn:
    """Exits with status 2 and ``message`` on stderr (no traceback)."""
    print(f"anchors.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def need(package: str, hint: str):
    """Imports an optional package, or exits with status 2 naming it."""
    try:
        return __import__(package)
    except ImportError as exc:
        fail(f"needs {package} ({exc}); {hint}")


def time_events(call: Callable[[], object], repeats: int, warmup: int, calls: int = 1, units: int = 1) -> Timing:
    """The :class:`Timing` of one unit: ``calls`` calls of ``units`` units each between two CUDA events."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        call()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(calls):
            call()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) / 1e3 / (calls * units))
    median, low, high = statistics.median(samples), min(samples), max(samples)
    return Timing(median_s=median, min_s=low, max_s=high, spread=(high - low) / median, compile_s=None,
                  warmup_s=warmup_s, repeats=repeats, units=calls * units, samples_s=tuple(samples))  # fmt: skip


def reference_step(c, n, m, q, k, v, i, f):
    """One step of the README's recurrence in the inputs' dtype; c (B, NH, DHQK, DHV), n, q, k (B, NH, DHQK),
    v (B, NH, DHV), m, i, f (B, NH, 1). Returns h (B, NH, DHV) and (c', n', m')."""
    logf = torch.nn.functional.logsigmoid(f)
    m_new = torch.maximum(logf + m, i)
    f_act, i_act = torch.exp(logf + m - m_new), torch.exp(i - m_new)
    c = f_act[..., None] * c + i_act[..., None] * k[..., :, None] * v[..., None, :]
    n = f_act * n + i_act * k
    q = q / math.sqrt(q.shape[-1])
    den = torch.maximum((q * n).sum(-1, keepdim=True).abs(), torch.exp(-m_new)) + EPS
    return torch.einsum("bhd,bhdv->bhv", q, c) / den, (c, n, m_new)


def inputs(shape: Sequence[int], gate_dtype, seed: int) -> list:
    """Random bf16 q, k (B, NH, [S,] DHQK), v (B, NH, [S,] DHV) and gates i, f (B, NH, S) or, without S, (B, NH, 1)."""
    *lead, DHQK, DHV = shape
    g = torch.Generator("cuda").manual_seed(seed)
    rand = lambda *s, dtype=torch.bfloat16: torch.randn(*s, generator=g, device="cuda", dtype=dtype)
    gates = (*lead, 1) if len(lead) == 2 else tuple(lead)
    return [rand(*lead, DHQK), rand(*lead, DHQK), rand(*lead, DHV), rand(*gates, dtype=gate_dtype),
            (3.0 + rand(*gates, dtype=torch.float32)).to(gate_dtype)]  # fmt: skip


def step_state(B: int, a: argparse.Namespace, seed: int) -> list:
    """Random float32 c (B, NH, DHQK, DHV), n (B, NH, DHQK) and m (B, NH, 1) in [-2, 2], as kernels.py's."""
    g = torch.Generator("cuda").manual_seed(seed)
    c, n = (torch.randn(*s, device="cuda", generator=g) for s in ((B, a.NH, a.DHQK, a.DHV), (B, a.NH, a.DHQK)))
    return [c, n, torch.rand(B, a.NH, 1, device="cuda", generator=g) * 4.0 - 2.0]


def err(ref, out) -> float:
    return max_rel_err(ref.detach().double().cpu().numpy(), out.detach().double().cpu().numpy())


def check(report: Report, anchor: str, shape: Sequence[int], quantity: str, e: float, bound: float | None) -> bool:
    """Adds a row to the table ``checks``; whether ``e`` is within ``bound`` (None: not judged)."""
    ok = None if bound is None else e <= bound
    shape = ",".join(map(str, shape))
    report.add("checks", {"anchor": anchor, "shape": shape, "quantity": quantity, "err": e, "bound": bound, "ok": ok})
    return bool(ok)


def check_step(report: Report, step: Callable, B: int, a: argparse.Namespace) -> dict:
    """The step kernel's h and states against one float64 step of the recurrence; kernels.py's check fields."""
    x, state = inputs((B, a.NH, a.DHQK, a.DHV), a.gate_dtype, seed=B), step_state(B, a, seed=B + 1)
    h, new = step(*x, *state, eps=EPS)
    h_ref, ref = reference_step(*(t.double() for t in (*state, *x)))
    err_h, err_s = err(h_ref, h), max(err(r, o) for r, o in zip(ref, new, strict=True))
    shape = (B, a.NH, a.DHQK, a.DHV)
    ok = check(report, STEP, shape, "h", err_h, ANCHOR_BOUNDS["step h"])
    ok &= check(report, STEP, shape, "c,n,m", err_s, ANCHOR_BOUNDS["step states"])
    return {"err_h": err_h, "err_states": err_s, "ok": ok}


def check_chunkwise(report: Report, kernel: Callable, a: argparse.Namespace) -> None:
    """The TFLA kernel's h and gradients against the float64 recurrence at CHECK_SHAPE."""
    B, NH, S = CHECK_SHAPE
    x = [t.requires_grad_() for t in inputs((B, NH, S, a.DHQK, a.DHV), a.gate_dtype, seed=1)]
    x64 = [t.detach().double().requires_grad_() for t in x]
    ct = torch.randn(B, NH, S, a.DHV, device="cuda")
    zeros = x64[0].new_zeros
    state, hs = (zeros(B, NH, a.DHQK, a.DHV), zeros(B, NH, a.DHQK), zeros(B, NH, 1)), []
    for t in range(S):
        h, state = reference_step(*state, *(y[:, :, t] for y in x64[:3]), *(y[:, :, t, None] for y in x64[3:]))
        hs.append(h)
    h_ref, h = torch.stack(hs, 2), kernel(*x, eps=EPS, chunk_size=a.chunk_size)
    grads = torch.autograd.grad((h.float() * ct).sum(), x)
    grads_ref = torch.autograd.grad((h_ref * ct.double()).sum(), x64)
    check(report, CHUNKWISE, (B, NH, S, a.DHQK, a.DHV), "h", err(h_ref, h), ANCHOR_BOUNDS["sequence h"])
    for name, r, o in zip("qkvif", grads_ref, grads, strict=True):
        check(report, CHUNKWISE, (B, NH, S, a.DHQK, a.DHV), f"grad {name}", err(r, o), None)


def stepper(step: Callable, x: list, state: list) -> Callable[[], None]:
    """A call that runs one step, alternating between ``state`` and a second buffer (no state allocated)."""
    buffers = [state, [torch.empty_like(t) for t in state]]

    def call() -> None:
        old, new = buffers
        step(*x, *old, eps=EPS, matC_new=new[0], vecN_new=new[1], scaM_new=new[2])
        buffers.reverse()

    return call


def bench_step(report: Report, step: Callable, a: argparse.Namespace, ceilings, checks: dict) -> None:
    for B in a.batch:
        call = stepper(step, inputs((B, a.NH, a.DHQK, a.DHV), a.gate_dtype, seed=B), step_state(B, a, seed=B + 1))
        timings = {}
        if "queued" in a.step_modes:
            timings["queued"] = time_events(call, a.repeats, a.warmup, a.queued)
        if "loop" in a.step_modes:
            graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                call()  # compiled and warm before the capture
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                for _ in range(a.loop):
                    call()
            timings["loop"] = time_events(graph.replay, a.repeats, a.warmup, units=a.loop)
            del graph
        floor = hardware_floor(bytes_moved=step_bytes(B, (a.NH, a.DHQK, a.DHV)), bandwidth=ceilings.copy_bytes_per_s)
        for mode, timing in timings.items():
            row = {"B": B, "variant": f"mlstm_kernels {STEP}", "mode": mode, **timing.as_row(), **checks[B]}
            row.update(floor_s=floor.seconds, bytes=floor.bytes_moved, floor_fraction=floor.fraction(timing.median_s))
            report.add("step", row)
        del call
        torch.cuda.empty_cache()


def bench_seq(report: Report, kernel: Callable, a: argparse.Namespace, ceilings) -> None:
    h = lambda x: kernel(*x, eps=EPS, chunk_size=a.chunk_size)
    for S in a.S:
        x = inputs((a.B, a.NH, S, a.DHQK, a.DHV), a.gate_dtype, seed=S)
        for mode in a.modes:
            if mode == "fwd":
                call = lambda x=x: h(x)
            else:
                xg, ct = [t.detach().requires_grad_() for t in x], torch.randn(a.B, a.NH, S, a.DHV, device="cuda")
                call = lambda xg=xg, ct=ct: torch.autograd.grad((h(xg).float() * ct).sum(), xg)
            with torch.set_grad_enabled(mode == "fwdbwd"):
                timing = time_events(call, a.repeats, a.warmup, a.calls)
            flops, nbytes = floor_counts(a.B, a.NH, S, a.DHQK, a.DHV, a.chunk_size, 2, mode)
            floor = hardware_floor(bytes_moved=nbytes, flops=flops, bandwidth=ceilings.copy_bytes_per_s,
                                   flop_rate=ceilings.matmul_flops_per_s)  # fmt: skip
            row = {"form": f"tfla L={a.chunk_size}", "S": S, "mode": mode, "L": a.chunk_size, "flops": flops}
            row.update(bytes=nbytes, **timing.as_row(), tokens_per_s=a.B * S / timing.median_s)
            row.update(floor_s=floor.seconds, floor_bound=floor.bound, floor_fraction=floor.fraction(timing.median_s))
            report.add("forms", row)
        del x, call
        torch.cuda.empty_cache()


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the anchors; returns the report's data (what ``--json`` writes). Exits with 2 without a GPU."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "step", "seq"), default="all")
    for name, default in (("B", 8), ("NH", 8), ("DHQK", 256), ("DHV", 512), ("chunk-size", 128)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--S", type=int, nargs="+", default=[2048, 8192], help="sequence lengths (multiples of 128)")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16, 32, 128], help="decode-step batch sizes")
    p.add_argument("--step-modes", nargs="+", default=["queued", "loop"], choices=["queued", "loop"])
    p.add_argument("--queued", type=int, default=100, help="steps queued per timed sample (mode queued)")
    p.add_argument("--loop", type=int, default=256, help="steps in the replayed CUDA graph (mode loop)")
    p.add_argument("--calls", type=int, default=1, help="sequence calls per timed sample")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before the samples (at least 1)")
    p.add_argument("--gate-dtype", default="float32", choices=("float32", "bfloat16"))
    add_arguments(p, repeats=20)
    a = p.parse_args(argv)
    if min(a.warmup, a.repeats, a.calls, a.queued, a.loop) < 1:
        p.error("--warmup, --repeats, --calls, --queued and --loop must be >= 1")
    if torch is None:
        fail(f"needs torch ({TORCH_MISSING}); run it where PyTorch with CUDA is installed")
    if not torch.cuda.is_available():
        fail(f"needs a CUDA GPU; torch {torch.__version__} sees none (torch.cuda.is_available() is False)")
    triton = need("triton", "install PyTorch's Triton")
    hint = "python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site:."
    mlstm_kernels = need("mlstm_kernels", hint)
    from mlstm_kernels.torch import get_mlstm_kernel, get_mlstm_step_kernel

    report = Report("anchors", "benchmarks/anchors.py", vars(a), a.json, argv)
    ceilings = ceilings_from_arguments(a, report)
    versions = {"mlstm_kernels": mlstm_kernels.__version__, "torch": torch.__version__, "triton": triton.__version__}
    report.set("anchors", {**versions, "cuda_device": torch.cuda.get_device_name(), "chunkwise": CHUNKWISE,
                           "step": STEP, "DISABLE_LLVM_OPT": os.environ["DISABLE_LLVM_OPT"]})  # fmt: skip
    a.gate_dtype = getattr(torch, a.gate_dtype)
    torch.manual_seed(0)  # the cotangents; the inputs have their own generators
    chunkwise, step = get_mlstm_kernel(CHUNKWISE), get_mlstm_step_kernel(STEP)
    report.table("checks", CHECK_COLUMNS)
    checks = {B: check_step(report, step, B, a) for B in a.batch} if a.part != "seq" else {}
    if a.part != "step":
        check_chunkwise(report, chunkwise, a)
    if a.part != "seq":
        report.table("step", STEP_COLUMNS)
        bench_step(report, step, a, ceilings, checks)
    if a.part != "step":
        report.table("forms", FORMS_COLUMNS)
        bench_seq(report, chunkwise, a, ceilings)
    return report.data


if __name__ == "__main__":
    main()
