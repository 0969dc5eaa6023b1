"""Training throughput and MFU of the xLSTM language model, against NX-AI's PyTorch xLSTM in the same run.

Times the library's training step (``xlstm_jax.training.step.make_train_step`` with ``make_optimizer``'s
AdamW, without gradient clipping as the anchor) on a 1.3B-class model (D=2048, 24 blocks, 4 heads of
DHQK=256 and DHV=512, vocabulary 50304, float32 parameters, bfloat16 compute, the Mosaic GPU chunkwise kernels
forward and backward on Hopper, or with ``--mlstm-backward xla`` (and off Hopper) the XLA chunkwise form) at S=4096,
for each (batch, remat policy) case of ``--cases`` (``B:remat``, remat one of ``none``, ``dots``, ``full``:
``RuntimeConfig.remat``; ``B:remat:accum`` runs the batch as ``accum`` micro-batches of B / accum rows, their
gradients accumulated: ``make_train_step``'s ``accum_steps``). A case that runs out of device memory is kept in
the table as ``OOM``; a case that would end past ``--time-budget`` seconds from the start (judged by the
longest case so far) is listed as skipped. Batches are random tokens (one document per row, every target counted).

The PyTorch anchor runs first, in its own process (``benchmarks/train_torch.py``, so that its memory is
gone when JAX starts): the same model in NX-AI's ``xlstm`` package (``xlstm_large``) with ``mlstm_kernels``'
TFLA chunkwise kernel, float32 parameters, bf16 autocast and fused AdamW, eager and under ``torch.compile``,
and torch's bf16 matrix rate (the best of a few large square products). Its results land in this run's
JSON (tables ``torch`` and ``matmul``).

MFU: tokens/s times the model FLOPs per token (``xlstm_jax.training.flops.flops_per_token``: every matrix
product and the mLSTM cell's chunkwise products at ``--chunk-size``, causal half of the intra-chunk
blocks, x3 for training; remat's recomputation not counted) over a bf16 matrix rate: ``mfu`` against the
rate torch measures in this run (the ceiling both sides are held to), ``mfu_jax`` against JAX's own
(``--ceilings measured``: a chain of 8192³ products). The same FLOPs per token are used for the anchor, so
MFU ratios are tokens/s ratios. ``x_eager`` and ``x_compiled`` are tokens/s over the anchor's. The table
``summary`` holds the fastest case with the targets (MFU >= 62%, >= 1.1x compiled, >= 1.6x eager).

On an H200, with the wheels of ``xlstm`` and ``mlstm_kernels`` in ``.whl/`` (BENCHMARKS.md)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=/tmp/site:. python3 benchmarks/train.py --json train.json

``--torch-json FILE`` takes the anchor's results from an earlier ``benchmarks/train_torch.py --json FILE`` on
the same machine instead (for a run split in two). On a CPU (tiny model, S=64; the anchor with PyTorch's
native kernels where torch is installed, minutes for its torch.compile, else noted as not run): ``PYTHONPATH=. python3
benchmarks/train.py --tiny``.

Timing: compilation apart (``compile_s``), ``--warmup`` untimed steps, then the median of ``--repeats``
samples, the state carried (donated) from step to step (``benchmarks/harness.py``). A sample is ``--queue``
steps dispatched back to back and blocked on once, per step: 1 blocks after every step; more lets the host
dispatch the next step while the device runs the last one, as ``xlstm-jax train`` does (it reads the metrics
back every ``log_every`` steps). Several ``--queue`` values give one row each from one compilation, and the
anchor is timed the same way for each (its steps without ``torch.cuda.synchronize()`` between them); a row's
torch ratios are against the anchor's row with the same ``queue``.
``--trace`` traces one more sample per row: the GPU's summed kernel time and their span against the timed
step (the difference is time the device spends outside the step's kernels), the traced sample's own wall
time, and the costliest kernels.
Where ``nvidia-smi`` runs, each row (the anchor's too) holds the GPU's SM clock, power and temperature during
the timed steps (``gpu_*``, ``harness.GpuMonitor``): a GPU at its power limit lowers its clock.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The device's memory for this process once the anchor's process has ended (JAX takes 75% by default).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax
import jax.numpy as jnp

from benchmarks.harness import Column, GpuMonitor, Report, add_arguments, ceilings_from_arguments, time_jitted
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.model import xLSTMLMModel
from xlstm_jax.models.xlstm_parallel.runtime import Remat, RuntimeConfig
from xlstm_jax.training.flops import flops_per_token
from xlstm_jax.training.init import init_params
from xlstm_jax.training.optim import OptimizerConfig, make_optimizer
from xlstm_jax.training.step import create_train_state, make_train_step

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"mfu": 0.62, "x_compiled": 1.1, "x_eager": 1.6}  # the targets for the fastest case
# The model: (name, type, default, tiny default). Shared with benchmarks/train_torch.py (same model, same S).
MODEL_ARGUMENTS = (
    ("D", int, 2048, 128),
    ("blocks", int, 24, 2),
    ("heads", int, 4, 2),
    ("vocab", int, 50304, 99),
    ("S", int, 4096, 64),
    ("chunk-size", int, 256, 16),
)
REMAT_PRIMITIVES = {"remat2", "checkpoint"}  # jax.checkpoint's primitive (its name in jax 0.10, and in older ones)
DEFAULT_CASES = ("16:none:2", "8:none", "8:dots", "16:dots", "16:full")
TINY_CASES = ("2:none", "2:full")

COLUMNS = [Column("B", "B", width=4), Column("remat", "remat", width=6), Column("accum", "accum", width=5),
           Column("queue", "queue", width=5),
           Column("status", "status", width=8),
           Column("step ms", "median_s", ".1f", 1e3), Column("spread", "spread", ".2f"),
           Column("ktok/s", "tokens_per_s", ".2f", 1e-3), Column("mfu", "mfu", ".3f"),
           Column("mfu_jax", "mfu_jax", ".3f"), Column("x_eager", "x_eager", ".2f"),
           Column("x_compiled", "x_compiled", ".2f"), Column("compile s", "compile_s", ".1f"),
           Column("peak GiB", "peak_gib", ".1f")]  # fmt: skip
TORCH_COLUMNS = [Column("mode", "mode", width=9), Column("B", "B", width=4), Column("queue", "queue", width=5),
                 Column("status", "status", width=8),
                 Column("step ms", "median_s", ".1f", 1e3), Column("spread", "spread", ".2f"),
                 Column("ktok/s", "tokens_per_s", ".2f", 1e-3), Column("mfu", "mfu", ".3f"),
                 Column("mfu_jax", "mfu_jax", ".3f"), Column("warmup s", "warmup_s", ".1f"),
                 Column("loss", "loss", ".3f")]  # fmt: skip
MATMUL_COLUMNS = [Column("source", "source", width=14), Column("n", "n", width=6),
                  Column("TFLOP/s", "flops_per_s", ".1f", 1e-12)]  # fmt: skip
SUMMARY_COLUMNS = [Column("B", "B", width=4), Column("remat", "remat", width=6), Column("accum", "accum", width=5),
                   Column("queue", "queue", width=5),
                   Column("ktok/s", "tokens_per_s", ".2f", 1e-3), Column("mfu", "mfu", ".3f"),
                   Column("x_eager", "x_eager", ".2f"), Column("x_compiled", "x_compiled", ".2f"),
                   Column("targets met", "targets_met", width=11)]  # fmt: skip


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model's sizes, S and ``--tiny`` (tiny defaults for a CPU), shared by this script and the anchor."""
    for name, kind, default, tiny in MODEL_ARGUMENTS:
        parser.add_argument(f"--{name}", type=kind, default=None, help=f"default {default} ({tiny} with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model at S=64, to check the script on a CPU")


def resolve_model_arguments(args: argparse.Namespace) -> None:
    """Fills the model arguments left unset with their defaults (the tiny ones with ``--tiny``)."""
    for name, _, default, tiny in MODEL_ARGUMENTS:
        attr = name.replace("-", "_")
        if getattr(args, attr) is None:
            setattr(args, attr, tiny if args.tiny else default)


def model_config(args: argparse.Namespace) -> xLSTMLMConfig:
    """The benchmarked model: float32 parameters, bfloat16 compute, the transformers xLSTM defaults otherwise."""
    return xLSTMLMConfig(
        vocab_size=args.vocab,
        embedding_dim=args.D,
        num_blocks=args.blocks,
        num_heads=args.heads,
        dtype="bfloat16",
        param_dtype="float32",
    )


def parse_case(text: str) -> tuple[int, Remat, int]:
    """``"B:remat"`` or ``"B:remat:accum"`` -> ``(B, Remat, accum)``: a batch of B rows, run as ``accum``
    micro-batches of B / accum rows (gradient accumulation; 1 when not given)."""
    parts = text.split(":")
    if len(parts) == 2:
        parts.append("1")
    remats = [r.value for r in Remat]
    good = len(parts) == 3 and parts[0].isdigit() and parts[2].isdigit() and parts[1] in remats
    batch, remat, accum = parts if good else ("0", "", "0")
    if not good or int(batch) < 1 or int(accum) < 1 or int(batch) % int(accum):
        raise argparse.ArgumentTypeError(
            f"a case is B:remat or B:remat:accum with B and accum positive ints, accum dividing B, and remat in "
            f"{remats}, got {text!r}"
        )
    return int(batch), Remat(remat), int(accum)


def random_batch(B: int, S: int, vocab: int, seed: int) -> dict[str, jax.Array]:
    """Random tokens: one document per row, every target counted (the shared batch layout)."""
    tokens = jax.random.randint(jax.random.key(seed), (B, S + 1), 0, vocab, jnp.int32)
    return {
        "input_ids": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": jnp.ones((B, S), jnp.int32),
        "loss_mask": jnp.ones((B, S), jnp.float32),
    }


def out_of_memory(error: BaseException) -> bool:
    """Whether an error from compiling or running a step is the device running out of memory."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def peak_gib() -> float | None:
    """The device's peak memory in use so far in this process, GiB (None where the backend does not say)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def primitives(jaxpr: Any) -> set[str]:
    """Names of the primitives in a jaxpr and in the jaxprs inside it (jitted calls, scans, remat)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= primitives(inner)
    return names


def run_case(
    config: xLSTMLMConfig, a: argparse.Namespace, B: int, remat: Remat, accum: int = 1
) -> list[dict[str, Any]]:
    """Times the training step at batch B (``accum`` micro-batches) with ``remat``, once per ``--queue`` value
    (one compilation): each row's timing fields (raises on failure)."""
    backend = ("chunkwise", ()) if a.mlstm_backward == "xla" else ("chunkwise_mosaic", (("backward", "mosaic"),))
    runtime = RuntimeConfig(
        prefill_backend=backend[0],
        prefill_backend_kwargs=(("chunk_size", a.chunk_size), *backend[1]),
        scan_blocks=a.scan_blocks,
        remat=remat,
    )
    model = xLSTMLMModel(config, runtime)
    # The anchor's optimiser: AdamW, no gradient clipping (make_optimizer masks the decay of norms and biases).
    optimizer = make_optimizer(OptimizerConfig(total_steps=1000, warmup_steps=10, clip_norm=None))
    # One jitted program makes the state (eagerly, each of init's many small operations would compile alone).
    init = jax.jit(lambda key: create_train_state(init_params(config, key, scan_blocks=a.scan_blocks), optimizer, 0))
    state = init(jax.random.key(0))
    batch = random_batch(B, a.S, a.vocab, seed=B)
    train_step = make_train_step(model, optimizer, accum_steps=accum)
    jaxpr, shapes = jax.make_jaxpr(train_step, return_shape=True)(state, batch)
    metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[1])

    # time_jitted's carry feeds (state, metrics) back as the first two arguments; the batch stays.
    step = jax.jit(lambda state, metrics, batch: train_step(state, batch), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step.lower(state, metrics, batch).compile()
    compile_s = time.perf_counter() - start
    remat_in_step = bool(REMAT_PRIMITIVES & primitives(jaxpr.jaxpr))
    rows = []
    for n, queue in enumerate(a.queue):
        if n:  # the last timing donated the state it was given: continue from a fresh one
            state = init(jax.random.key(0))
        monitor = GpuMonitor()  # the GPU's clock and power during the timed steps
        timing = time_jitted(
            compiled, state, metrics, batch, repeats=a.repeats, warmup=a.warmup, calls=queue, carry=True,
            trace=a.trace, monitor=monitor,
        )  # fmt: skip
        row = {**timing.as_row(), "compile_s": compile_s, "queue": queue, "remat_in_step": remat_in_step}
        rows.append({**row, **monitor.stats})
    del state
    return rows


def run_anchor(a: argparse.Namespace) -> tuple[dict[str, Any] | None, str]:
    """Runs benchmarks/train_torch.py in its own process: (its JSON's data or None, how it ended).

    Called before this process touches the GPU: JAX takes most of the device's memory when it starts.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "torch.json"
        argv = [f"--{n}={getattr(a, n.replace('-', '_'))}" for n, *_ in MODEL_ARGUMENTS]
        argv += ["--modes", *a.torch_modes, "--eager-batch", str(a.torch_eager_batch)]
        argv += ["--compiled-batch", str(a.torch_compiled_batch), "--warmup", str(a.torch_warmup)]
        argv += ["--torch-chunk-size", str(a.torch_chunk_size), "--weight-mode", a.torch_weight_mode]
        argv += ["--repeats", str(a.repeats), "--queue", *map(str, a.queue)]
        argv += ["--json", str(path), *(["--tiny"] if a.tiny else [])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, str(ROOT / "benchmarks" / "train_torch.py"), *argv]
        print(f"# torch anchor: {' '.join(command[1:])}", flush=True)
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, timeout=a.torch_timeout, check=False)
            status = f"exit status {done.returncode}"
        except subprocess.TimeoutExpired:
            status = f"stopped after --torch-timeout {a.torch_timeout:.0f} s"
        # What it measured, also when it stopped part way (it rewrites its JSON after every row).
        return (json.loads(path.read_text()) if path.exists() else None), status


def anchor_rates(anchor: dict[str, Any] | None) -> tuple[float | None, dict[tuple[str, int], float]]:
    """(torch's bf16 matrix rate, {(mode, queue): tokens/s of its fastest successful row}) from the anchor's
    data (rows without ``queue`` were timed one step per sample: queue 1)."""
    if anchor is None:
        return None, {}
    rate = anchor.get("matmul_flops_per_s")
    best: dict[tuple[str, int], float] = {}
    for row in anchor.get("tables", {}).get("train", []):
        if row.get("status") == "ok":
            key = (row["mode"], row.get("queue", 1))
            best[key] = max(best.get(key, 0.0), row["tokens_per_s"])
    return rate, best


def rates(tokens_per_s: float, fpt: float, torch_rate: float | None, jax_rate: float) -> dict[str, float | None]:
    """MFU against torch's and JAX's matrix rates."""
    return {"mfu": tokens_per_s * fpt / torch_rate if torch_rate else None, "mfu_jax": tokens_per_s * fpt / jax_rate}


def add_row(
    report: Report,
    row: dict[str, Any],
    fpt: float,
    torch_rate: float | None,
    torch_best: dict[tuple[str, int], float],
    jax_rate: float,
) -> None:
    """Adds a timed case's row (tokens/s, MFU, ratios against the anchor's rows of the same ``queue``) and
    prints what the GPU monitor and the trace saw."""
    B, remat, queue = row["B"], row["remat"], row["queue"]
    tokens_per_s = B * row["S"] / row["median_s"]
    row.update(status="ok", tokens_per_s=tokens_per_s, flops_per_token=fpt, peak_gib=peak_gib())
    row.update(rates(tokens_per_s, fpt, torch_rate, jax_rate))
    for mode in ("eager", "compiled"):
        anchor = torch_best.get((mode, queue))
        row[f"x_{mode}"] = tokens_per_s / anchor if anchor else None
    report.add("train", row)
    if row.get("gpu_samples"):
        print(
            f"# GPU during the timed steps (B={B} remat={remat} queue={queue}): SM clock "
            f"{row['gpu_sm_mhz_median']:.0f} MHz median ({row['gpu_sm_mhz_min']:.0f}-{row['gpu_sm_mhz_max']:.0f}), "
            f"power {row['gpu_power_w_median']:.0f} W median ({row['gpu_power_w_max']:.0f} max), "
            f"{row['gpu_temp_c_max']:.0f} C max"
        )
    if row.get("trace_kernel_us") is not None:
        print(
            f"# profile B={B} remat={remat} queue={queue}, per step: {row['trace_kernels']:.0f} kernels, "
            f"{row['trace_kernel_us'] / 1e3:.1f} ms of kernels in a span of {row['trace_span_us'] / 1e3:.1f} ms, "
            f"{row['trace_wall_us'] / 1e3:.1f} ms of wall time traced (the timed step: {row['median_s'] * 1e3:.1f} "
            "ms); costliest:"
        )
        for us, launches, kernel in row["trace_top"]:
            print(f"#   {us / 1e3:8.2f} ms  x{launches:4.0f}  {kernel[:100]}")
    if remat != Remat.NONE.value and not row["remat_in_step"]:
        report.note(f"B={B} remat={remat}: no jax.checkpoint in the step: the model ignored the remat policy")


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the anchor and the JAX cases; returns the report's data (what ``--json`` writes)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument(
        "--cases",
        nargs="+",
        type=parse_case,
        default=None,
        help=f"B:remat or B:remat:accum (micro-batches) (default {DEFAULT_CASES})",
    )
    p.add_argument("--scan-blocks", action="store_true", help="run the blocks under nn.scan (faster compilation)")
    p.add_argument(
        "--mlstm-backward",
        choices=("xla", "mosaic"),
        default="mosaic",
        help="the mLSTM cell: on Hopper the Mosaic GPU forward and backward kernels (mosaic, the default; the XLA "
        "form elsewhere), or the XLA chunkwise form (xla)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed samples after compilation")
    p.add_argument(
        "--queue",
        type=int,
        nargs="+",
        default=[1],
        help="steps dispatched back to back in each timed sample, blocked on once (one row per value, the anchor "
        "timed the same way): 1 blocks after every step",
    )
    p.add_argument(
        "--trace",
        action="store_true",
        help="trace one more sample per row (jax.profiler): the GPU's kernel time, their span, the sample's wall "
        "time and the costliest kernels, per step (trace_* fields; none on a CPU)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=540.0,
        help="seconds from the start (the anchor included) within which cases are run: a case is skipped when the "
        "longest so far would end past it",
    )
    p.add_argument("--torch", choices=("run", "skip"), default="run", help="run the PyTorch anchor first")
    p.add_argument("--torch-json", help="take the anchor's results from this JSON of train_torch.py instead")
    p.add_argument("--torch-modes", nargs="+", choices=("eager", "compiled"), default=["eager", "compiled"])
    p.add_argument("--torch-eager-batch", type=int, default=None, help="default 4 (2 with --tiny)")
    p.add_argument("--torch-compiled-batch", type=int, default=None, help="default 8 (2 with --tiny)")
    p.add_argument("--torch-chunk-size", type=int, default=None, help="the TFLA kernel's chunk (128; 16: --tiny)")
    p.add_argument("--torch-weight-mode", choices=("single", "fused"), default="single", help="xlstm_large's")
    p.add_argument("--torch-warmup", type=int, default=2, help="the anchor's untimed steps (the first compiles)")
    p.add_argument("--torch-timeout", type=float, default=360.0, help="seconds before the anchor is stopped")
    add_arguments(p, repeats=5, ceilings="measured")
    a = p.parse_args(argv)
    resolve_model_arguments(a)
    a.cases = a.cases or [parse_case(c) for c in (TINY_CASES if a.tiny else DEFAULT_CASES)]
    a.torch_chunk_size = a.torch_chunk_size or (16 if a.tiny else 128)
    a.torch_eager_batch = a.torch_eager_batch or (2 if a.tiny else 4)
    a.torch_compiled_batch = a.torch_compiled_batch or (2 if a.tiny else 8)
    if min(a.repeats, a.torch_warmup, *a.queue) < 1 or a.warmup < 0:
        p.error("--repeats, --queue and --torch-warmup must be >= 1, --warmup >= 0")
    start = time.perf_counter()
    config = model_config(a)
    fpt = flops_per_token(config, a.S, chunk_size=a.chunk_size)
    if a.torch_json:
        anchor, anchor_status = json.loads(Path(a.torch_json).read_text()), f"read from {a.torch_json}"
    elif a.torch == "run":
        anchor, anchor_status = run_anchor(a)
    else:
        anchor, anchor_status = None, "skipped (--torch skip)"
    settings = {**vars(a), "cases": [f"{B}:{r.value}:{n}" for B, r, n in a.cases]}
    report = Report("train", "benchmarks/train.py", settings, a.json, argv)  # JAX starts on the device here
    report.set("model", {**dataclasses.asdict(config), "num_params": config.num_params(), "flops_per_token": fpt})
    report.set("torch_anchor_status", anchor_status)
    if a.torch == "run" and anchor is None:
        report.note(f"the torch anchor did not run ({anchor_status}; its message is above): no torch ratios or MFU")
    elif anchor is not None and anchor_status.startswith(("exit", "stopped")) and anchor_status != "exit status 0":
        report.note(f"the torch anchor ended with {anchor_status}; its rows so far are kept")
    torch_rate, torch_best = anchor_rates(anchor)
    if anchor is not None:
        report.set("torch_anchor", {k: v for k, v in anchor.items() if k not in ("tables", "settings")})
    ceilings = ceilings_from_arguments(a, report)
    jax_rate = ceilings.matmul_flops_per_s

    report.table("matmul", MATMUL_COLUMNS)
    for row in (anchor or {}).get("tables", {}).get("matmul", []):
        report.add("matmul", {"source": "torch", **row})
    report.add("matmul", {"source": f"jax ({ceilings.source})", "flops_per_s": jax_rate})
    report.table("torch", TORCH_COLUMNS)
    for row in (anchor or {}).get("tables", {}).get("train", []):
        fields = rates(row["tokens_per_s"], fpt, torch_rate, jax_rate) if row.get("status") == "ok" else {}
        report.add("torch", {**row, **fields})

    report.table("train", COLUMNS)
    longest = 0.0  # the longest case so far, seconds: the next one is expected to take as long
    for B, remat, accum in a.cases:
        row: dict[str, Any] = {"B": B, "remat": remat.value, "accum": accum, "S": a.S, "chunk_size": a.chunk_size}
        case_start = time.perf_counter()
        if case_start - start + longest > a.time_budget:
            report.add("train", {**row, "status": "skipped"})
            report.note(
                f"B={B} remat={remat.value} skipped: {case_start - start:.0f} s in, and the longest case took "
                f"{longest:.0f} s (--time-budget {a.time_budget:.0f} s)"
            )
            continue
        try:
            timings = run_case(config, a, B, remat, accum)
        except Exception as error:  # every failure becomes a row, and the run goes on to the next case
            longest = max(longest, time.perf_counter() - case_start)
            status = "OOM" if out_of_memory(error) else "error"
            report.add("train", {**row, "status": status, "error": f"{type(error).__name__}: {str(error)[:2000]}"})
            report.note(f"B={B} remat={remat.value}: {status} ({type(error).__name__}: {str(error)[:300]})")
            continue
        longest = max(longest, time.perf_counter() - case_start)
        for timing in timings:
            add_row(report, {**row, **timing}, fpt, torch_rate, torch_best, jax_rate)

    report.table("summary", SUMMARY_COLUMNS)
    done = [r for r in report.data["tables"]["train"] if r["status"] == "ok"]
    if done:
        best = max(done, key=lambda r: r["tokens_per_s"])
        keys = ("B", "remat", "accum", "queue", "tokens_per_s", "mfu", "mfu_jax", "x_eager", "x_compiled")
        summary = {k: best.get(k) for k in keys}
        met = {k: None if summary[k] is None else summary[k] >= target for k, target in TARGETS.items()}
        summary.update(targets=TARGETS, met=met, targets_met=all(met.values()) if None not in met.values() else None)
        report.add("summary", summary)
    return report.data


if __name__ == "__main__":
    main()
