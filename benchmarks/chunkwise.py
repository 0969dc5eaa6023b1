"""Times the chunkwise mLSTM forward kernel on Mosaic GPU against the XLA chunkwise form and TFLA, and the 7B prefill.

The H200 run, one command of under ten minutes with compilation (``--budget-s``: shapes left after 540 s
less ``--prefill-reserve-s`` and prefill cases left after 540 s are skipped, with a note; the JSON is
rewritten after every row), with NX-AI's ``mlstm_kernels`` wheel unpacked into ``/tmp/site`` as
``benchmarks/anchors.py`` describes::

    DISABLE_LLVM_OPT=1 PYTHONPATH=/tmp/site:. python3 benchmarks/chunkwise.py --json chunkwise.json

Defaults: B=8, NH=8, DHQK=256, DHV=512 (the head shape of xLSTM-7B) at S = 2048, 8192, 32768, plus the
65,536-token batches of the TFLA paper's table, ``--shapes 8x2048 8x8192 8x32768 4x16384 2x32768 1x65536``
(B x S; 8x8192 is one of them); bfloat16 q, k, v and float32 gates (drawn by ``benchmarks/forms.py``'s
``make_args``: forget gates N(3, 1), input gates N(0, 1)); modes ``fwd`` (h) and ``fwdbwd`` (the gradients
of ``sum(h * ct)`` in q, k, v, i, f, random float32 ct). A CPU smoke run (tiny shapes, the kernel in
Mosaic GPU's interpreter, the tiny model preset, TFLA skipped without torch)::

    PYTHONPATH=. python benchmarks/chunkwise.py --smoke --json /tmp/chunkwise.json

Rows of the table ``chunkwise``, per shape and mode:

* ``tfla L=128``: the TFLA Triton kernel ``chunkwise--triton_xl_chunk`` of ``mlstm_kernels`` in PyTorch,
  timed by ``benchmarks/anchors.py`` (CUDA events, its ``bench_seq``). It runs first, in a subprocess (one
  Python process for every batch size of ``--shapes``; torch and JAX never share the GPU's memory), and
  its JSON is read back; ``--tfla-json FILE ...`` reads earlier runs' files of ``anchors.py`` instead, and
  ``--tfla skip`` leaves the row out. Without torch, a CUDA GPU, triton or mlstm_kernels it is skipped,
  with the reason in the JSON's ``tfla`` facts.
* ``xla L=...``: ``xlstm_jax.mlstm.chunkwise_fw`` at each of ``--xla-chunk-sizes`` (default 256, its best
  chunk size at these shapes in BENCHMARKS.md), jitted.
* ``mosaic bdhv=... [d=...] [wg=...] [cl=...] [sc=...]``: ``xlstm_jax.kernels.chunkwise_mosaic.chunkwise_mosaic_fw``
  (chunk size 64), jitted, one row per kernel variant: each of ``--block-dhv`` (columns of c per warpgroup, default 32
  and 64), ``--depth`` (TMA pipeline depth, default 2; ``d=`` in the label unless only the default is asked for),
  ``--consumers`` (warpgroups per program, default 1 and 2; ``wg=`` in the label unless only 1 is asked for),
  ``--cluster`` (programs per cluster sharing the tiles by TMA multicast: 1, 2, 4 or ``auto``, the default, the
  library's ``auto_cluster`` pick for the tiling; ``cl=`` in the label unless only ``auto`` is asked for, the resolved
  value in the row's ``cluster``), ``--split`` (segments per head run side by side: a positive integer or ``auto``,
  the default, the library's ``auto_split`` pick for the tiling and the shape; ``sp=`` in the label unless only
  ``auto`` is asked for, the resolved value in the row's ``split``; a split that does not divide a shape's chunks
  is left out there with a note) and ``--scores`` (where the chunks' gated scores are computed, default ``kernel``,
  the library's default beyond 4 chunks; ``sc=`` in the label unless only that is asked for). Variants the kernel
  cannot run at the head shape (``chunkwise_mosaic_unsupported``: shared memory, divisibility) are left out with a
  note, as are ``bw=mosaic`` variants whose gradient the Mosaic backward cannot take
  (``mosaic_backward_unsupported``). fwdbwd differentiates through its custom VJP, once per ``--backward`` (``bw=`` in
  the label unless only ``xla`` is asked for): ``xla``, the XLA form's forward and backward; ``mosaic``, the kernel's
  forward and the Mosaic GPU backward kernels, once per ``--backward-consumers`` (their warpgroups per program,
  default 2; ``bwg=`` in the label unless only 2 is asked for) and ``--scan-block-dhv`` (the reverse state scan's
  columns per warpgroup, default 32; ``sbd=`` unless only 32 is asked for). fwd rows are timed once per variant and
  carry no ``bw=`` (the backward does not change the forward).

Columns: ``ms`` the median time of a call (``benchmarks/harness.py``'s ``time_jitted``: compilation apart,
``--repeats`` samples of ``--calls`` calls queued back to back, default 5, and TFLA's the same through
``anchors.py --calls``: each call is dispatched while the one before runs, so no row includes a round trip
from the host; at one call a sample, the kernel's forward at S=2048 read 0.678 ms on an H100 for 0.485 ms
of kernels); ``spread`` (max - min) / median; ``compile s``; ``Mtok/s`` B·S over the time;
``TFLOP/s`` the row's FLOPs over its time; ``mm frac`` that rate over the bf16 matrix rate measured in the
same run (``--ceilings measured``: a chain of 8192³ bf16 products); ``floor/t`` the hardware floor over
the time; ``t/tfla`` and ``t/xla`` (mosaic rows) the kernel's time over TFLA's and over the fastest XLA
row's at the same shape and mode (below 1: the kernel is faster); ``rel err`` and ``ok`` (mosaic rows) the
relative RMS error of the kernel's h against the XLA form's h (the first of ``--xla-chunk-sizes``) on the
same inputs, over every ``--check-stride``-th column of h (default 8: every block of ``block_dhv`` columns
is sampled; the full h at B=8, S=32768 has 10⁹ elements), bound ``RMS_BOUND['bfloat16']`` of forms.py; in
fwdbwd rows the largest of the five gradients' relative RMS errors against the XLA form's gradients (the
same stride over their last axis); there also ``max err``, the largest error of one element over its
gradient's largest (bound ``GRAD_MAX_BOUND``), and ``differ``, the elements that differ between two calls on the
same inputs (0 for a deterministic kernel; ``ok`` needs all three).

``--trace`` runs one more call of every timed row under ``jax.profiler`` (``harness.device_trace``): the row gets
``kernel ms`` (the GPU's kernels in that call, summed), ``mosaic ms`` (those of the Mosaic GPU kernels: names
with ``mosaic`` in them, the forward kernel and the backward's state scans and gradient kernel; the rest is
XLA's: the gate plan, the scores, the gradient's element-wise work) and ``busy`` (kernel time over the span
from the first kernel's start to the last one's end: below 1, the GPU waits on the host or on loop control
between kernels), and its costliest kernels are printed under it; the prefill rows get the same ``kernel ms`` and
``mosaic ms`` and their costliest kernels.

FLOPs and bytes (``benchmarks/forms.py``'s ``floor_counts`` at each row's chunk size L: 64 for the kernel,
the row's L for XLA and TFLA): per head ``4·S·DHQK·DHV + S·L·(DHQK + DHV)`` matrix FLOPs (the chunk
summaries, the read-out and the causal halves of the L x L blocks), times B·NH, 3x for fwdbwd; bytes q, k,
v, i, f read and h written once, ``B·NH·S·(2·DHQK + 2·DHV + 2)`` elements of 2 bytes (the float32 gates'
extra 4 bytes per step and head, 0.1%, left out), 2x for fwdbwd. The floor is the longer of the FLOPs at
the measured matrix rate and the bytes at the measured copy bandwidth.

Table ``prefill``: tokens per second of the language model's prefill (``xlstm_jax.generation.prefill``,
random bf16 weights of ``--preset``, default xLSTM-7B, built and timed as in ``benchmarks/generate.py``) at
batch 1 and ``--prefill-tokens`` (default 8192 and 65,536) tokens per call, for each of ``--prefill-backends``:
``NAME`` or ``NAME:FIELD=VALUE,...``, a registered prefill backend (``RuntimeConfig.prefill_backend``) and
fields of its config; ``--prefill-chunk-size`` is passed to backends whose config has ``chunk_size`` unless
given. ``--prefill-blocks``: the blocks under ``nn.scan`` (``scan``, the default, as generate.py's prefill), or
``unrolled`` (``RuntimeConfig.scan_blocks=False``, the default runtime's; the row's backend label ends in
``unrolled``): under the scan XLA copies each block's weights out of the stacked parameters. Model FLOPs as
generate.py's ``prefill_flops`` at the backend's chunk size (64 without one), ``mm frac`` against the measured
matrix rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.forms import RMS_BOUND, floor_counts, jitted, make_args, rel_rms
from benchmarks.generate import PRESETS, prefill_flops, random_params
from benchmarks.harness import Column, Report, add_arguments, ceilings_from_arguments, hardware_floor, time_jitted
from xlstm_jax.generation import prefill
from xlstm_jax.kernels.chunkwise_mosaic import (
    BACKWARDS,
    C_OPERANDS,
    CHUNK,
    CLUSTERS,
    SCORES,
    auto_cluster,
    chunkwise_mosaic_fw,
    chunkwise_mosaic_unsupported,
    forward_tiling,
)
from xlstm_jax.kernels.chunkwise_mosaic_bw import mosaic_backward_unsupported
from xlstm_jax.mlstm import chunkwise_fw
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import BACKENDS
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHAPES = ("8x2048", "8x8192", "8x32768", "4x16384", "2x32768", "1x65536")
SMOKE = {  # --smoke: defaults for a CPU check in seconds (explicit options still win)
    "shapes": [(1, 128)],
    "NH": 1,
    "DHQK": 64,
    "DHV": 64,
    "block_dhv": [32],
    "depth": [2],
    "consumers": [1],
    "xla_chunk_sizes": [32],
    "interpret": True,
    "preset": "tiny",
    "prefill_tokens": [64],
    "prefill_repeats": 1,
    "repeats": 2,
    "calls": 1,
    "check_stride": 1,
}
# One Python process runs anchors.py's main once per argument list (torch and triton imported once).
TFLA_CHILD = (
    "import json, sys\nfrom benchmarks.anchors import main\nfor argv in json.loads(sys.argv[1]):\n    main(argv)"
)
TFLA_PACKAGES = ("torch", "triton", "mlstm_kernels")

COLUMNS = [
    Column("form", "form", width=24),
    Column("B", "B", width=2),
    Column("S", "S", width=6),
    Column("mode", "mode", width=6),
    Column("ms", "median_s", ".3f", 1e3),
    Column("spread", "spread", ".2f", width=6),
    Column("compile s", "compile_s", ".1f"),
    Column("Mtok/s", "tokens_per_s", ".3f", 1e-6),
    Column("TFLOP/s", "flops_per_s", ".1f", 1e-12, width=7),
    Column("mm frac", "matmul_fraction", ".3f", width=7),
    Column("floor/t", "floor_fraction", ".3f", width=7),
    Column("t/tfla", "t_over_tfla", ".2f", width=6),
    Column("t/xla", "t_over_xla", ".2f", width=6),
    Column("rel err", "rel_err", ".1e", width=7),
    Column("max err", "max_err", ".1e", width=7),
    Column("differ", "nondeterministic", "d", width=6),
    Column("ok", "ok", width=5),
    Column("kernel ms", "trace_kernel_us", ".3f", 1e-3, width=9),
    Column("mosaic ms", "trace_mosaic_us", ".3f", 1e-3, width=9),
    Column("busy", "trace_busy", ".2f", width=5),
]
MOSAIC_KERNELS = "mosaic"  # in the names of the Mosaic GPU kernels (mlstm_*_mosaic*): --trace's mosaic ms
# The largest error of one gradient element, over its gradient's largest, that a fwdbwd row may show against the
# XLA form's bf16 gradients: each of the two bf16 backwards errs by up to TOL['bfloat16-grad'] (2e-2, its
# derivation in tests/numerics.py) of the largest against exact arithmetic, so they may differ by twice that; 5e-2
# rounds up. A wrong element (a race, a missed term) errs by O(1).
GRAD_MAX_BOUND = 5e-2
PREFILL_COLUMNS = [
    Column("backend", "backend", width=28),
    Column("S", "S", width=6),
    Column("ms", "median_s", ".2f", 1e3),
    Column("spread", "spread", ".2f", width=6),
    Column("compile s", "compile_s", ".1f"),
    Column("tokens/s", "tokens_per_s", ".0f"),
    Column("TFLOP/s", "flops_per_s", ".1f", 1e-12, width=7),
    Column("mm frac", "matmul_fraction", ".3f", width=7),
    Column("kernel ms", "trace_kernel_us", ".2f", 1e-3, width=9),
    Column("mosaic ms", "trace_mosaic_us", ".2f", 1e-3, width=9),
]


# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------
def shape(text: str) -> tuple[int, int]:
    """``"BxS"`` as (B, S), both positive integers."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: expected BxS with positive integers, e.g. 8x8192")
    return int(parts[0]), int(parts[1])


def _value(text: str) -> Any:
    """A backend config field's value from text: an int, a float, true/false, or the text itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def cluster_choice(text: str) -> int | None:
    """``--cluster`` values: ``auto`` (None: ``auto_cluster`` picks per tiling) or one of :data:`CLUSTERS`."""
    if text == "auto":
        return None
    if text.isdigit() and int(text) in CLUSTERS:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not auto or one of {CLUSTERS}")


def split_choice(text: str) -> int | None:
    """``--split`` values: ``auto`` (None: ``auto_split`` picks per tiling and shape) or a positive integer."""
    if text == "auto":
        return None
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not auto or a positive integer")


def prefill_backend(text: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """``"NAME"`` or ``"NAME:FIELD=VALUE,..."`` as (name, ((field, value), ...)), checked by RuntimeConfig."""
    name, _, rest = text.partition(":")
    fields = []
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"bad prefill backend {text!r}: expected NAME or NAME:FIELD=VALUE,...")
        fields.append((key, _value(value)))
    try:
        RuntimeConfig(prefill_backend=name, prefill_backend_kwargs=tuple(fields))
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"bad prefill backend {text!r}: {exc}") from None
    return name, tuple(fields)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed and checked options (``--smoke`` changes the defaults; explicit options still win)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on a CPU, the kernel interpreted")
    p.add_argument("--shapes", type=shape, nargs="+", default=[shape(s) for s in DEFAULT_SHAPES], help="BxS ...")
    p.add_argument("--NH", type=int, default=8)
    p.add_argument("--DHQK", type=int, default=256)
    p.add_argument("--DHV", type=int, default=512)
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--block-dhv", type=int, nargs="*", default=[32, 64], help="the kernel's columns per warpgroup")
    p.add_argument("--depth", type=int, nargs="+", default=[2], help="the kernel's TMA pipeline depths")
    p.add_argument("--consumers", type=int, nargs="+", default=[1, 2], help="the kernel's warpgroups per program")
    p.add_argument("--cluster", type=cluster_choice, nargs="+", default=[None], metavar="{auto,1,2,4}",
                   help="the kernel's programs per cluster (TMA multicast of the shared tiles); auto: the "
                   "library's pick, auto_cluster")  # fmt: skip
    p.add_argument("--split", type=split_choice, nargs="+", default=[None], metavar="{auto,1,2,...}",
                   help="segments per head that the kernel runs side by side; auto: the library's pick, "
                   "auto_split")  # fmt: skip
    p.add_argument(
        "--c-operand",
        nargs="+",
        default=["shared"],
        choices=list(C_OPERANDS),
        help="where the kernel's q C takes the state from (op= in the label unless only shared)",
    )
    p.add_argument("--scores", nargs="+", default=["kernel"], choices=list(SCORES),
                   help="where the kernel's chunk scores are computed")  # fmt: skip
    p.add_argument("--backward", nargs="+", default=["xla", "mosaic"], choices=list(BACKWARDS),
                   help="what runs under the kernel's differentiation (fwdbwd rows)")  # fmt: skip
    p.add_argument("--backward-consumers", type=int, nargs="+", default=[2], choices=[1, 2],
                   help="warpgroups per program of the Mosaic backward kernels (bw=mosaic rows)")  # fmt: skip
    p.add_argument("--scan-block-dhv", type=int, nargs="+", default=[32], choices=[32, 64],
                   help="columns per warpgroup of the Mosaic backward's reverse scan (bw=mosaic rows)")  # fmt: skip
    p.add_argument("--interpret", action="store_true", help="run the kernel in Mosaic GPU's interpreter")
    p.add_argument("--xla-chunk-sizes", type=int, nargs="*", default=[256], help="chunk sizes of the XLA form")
    p.add_argument("--check-stride", type=int, default=8, help="compare every this many columns of h")
    p.add_argument("--trace", action="store_true", help="trace one more call per row: its kernels' time and share")
    p.add_argument("--tfla", choices=("run", "skip"), default="run", help="time TFLA in a subprocess first")
    p.add_argument("--tfla-json", nargs="+", help="read TFLA's rows from these anchors.py JSON files instead")
    p.add_argument("--tfla-chunk-size", type=int, default=128)
    p.add_argument("--tfla-timeout-s", type=float, default=200.0, help="stop the TFLA subprocess after this")
    p.add_argument("--preset", choices=sorted(PRESETS), default="xlstm_7b", help="model of the prefill rows")
    p.add_argument("--prefill-tokens", type=int, nargs="*", default=[8192, 65536], help="tokens per call (B=1)")
    p.add_argument("--prefill-backends", type=prefill_backend, nargs="*", default=[prefill_backend("chunkwise")],
                   help="NAME or NAME:FIELD=VALUE,... (registered prefill backends)")  # fmt: skip
    p.add_argument("--prefill-blocks", choices=("scan", "unrolled"), nargs="+", default=["scan"],
                   help="the prefill's blocks under nn.scan or unrolled (RuntimeConfig.scan_blocks)")  # fmt: skip
    p.add_argument("--prefill-chunk-size", type=int, default=256, help="chunk_size of backends that take one")
    p.add_argument("--prefill-repeats", type=int, default=3)
    p.add_argument("--calls", type=int, default=5, help="calls queued back to back per timed sample (kernel and TFLA)")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip the cases left after this many seconds")
    p.add_argument("--prefill-reserve-s", type=float, default=150.0, help="seconds of the budget kept for prefill")
    add_arguments(p, repeats=10, ceilings="measured")
    if "--smoke" in argv:
        p.set_defaults(**SMOKE)
    a = p.parse_args(argv)
    for name in ("NH", "DHQK", "DHV", "check_stride", "tfla_chunk_size", "prefill_chunk_size", "repeats", "calls"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.prefill_repeats < 1:
        p.error(f"--prefill-repeats must be >= 1, got {a.prefill_repeats}")
    for name in ("xla_chunk_sizes", "prefill_tokens", "depth"):
        if any(n < 1 for n in getattr(a, name)):
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    bad = [b for b in a.block_dhv if b not in (32, 64)]
    if bad:
        p.error(f"--block-dhv must be 32 or 64, got {bad}")
    bad = [c for c in a.consumers if c not in (1, 2)]
    if bad:
        p.error(f"--consumers must be 1 or 2, got {bad}")
    return a


# ---------------------------------------------------------------------------------------------------------
# TFLA (PyTorch, in a subprocess)
# ---------------------------------------------------------------------------------------------------------
def tfla_argv(a: argparse.Namespace, directory: Path) -> list[list[str]]:
    """anchors.py's arguments, one list per batch size of ``--shapes`` (its rows: table ``forms``)."""
    by_batch: dict[int, list[int]] = {}
    for B, S in a.shapes:
        by_batch.setdefault(B, []).append(S)
    heads = ["--NH", str(a.NH), "--DHQK", str(a.DHQK), "--DHV", str(a.DHV), "--chunk-size", str(a.tfla_chunk_size)]
    return [
        ["--part", "seq", "--B", str(B), *heads, "--S", *map(str, S), "--modes", *a.modes,
         "--repeats", str(a.repeats), "--calls", str(a.calls), "--json", str(directory / f"tfla_B{B}.json")]
        for B, S in by_batch.items()
    ]  # fmt: skip


def run_tfla(a: argparse.Namespace, directory: Path, timeout_s: float) -> tuple[str, list[Path]]:
    """Runs anchors.py's TFLA rows in one subprocess; returns (status, the JSON files it wrote)."""
    missing = [name for name in TFLA_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        return f"skipped: {', '.join(missing)} not importable", []
    env = dict(os.environ)
    env.setdefault("DISABLE_LLVM_OPT", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    argv = tfla_argv(a, directory)
    print(f"# TFLA: {len(argv)} anchors.py run(s) in a subprocess (timeout {timeout_s:.0f} s)", flush=True)
    try:
        done = subprocess.run(
            [sys.executable, "-c", TFLA_CHILD, json.dumps(argv)],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            timeout=max(timeout_s, 1.0),
            check=False,
        )
        status = "ok" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-500:]}"
    except subprocess.TimeoutExpired:
        status = f"stopped after {timeout_s:.0f} s (--tfla-timeout-s or --budget-s)"
    return status, sorted(directory.glob("tfla_B*.json"))


def read_tfla(paths: Sequence[str | Path], a: argparse.Namespace) -> tuple[dict[tuple, dict], list[dict], list[str]]:
    """TFLA rows from anchors.py JSON files, as ``{(B, S, mode): row}``; their facts; files not matching."""
    rows, facts, ignored = {}, [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        s = data.get("settings", {})
        heads = (s.get("NH"), s.get("DHQK"), s.get("DHV"))
        if heads != (a.NH, a.DHQK, a.DHV):
            ignored.append(f"{path}: NH, DHQK, DHV = {heads}, not {(a.NH, a.DHQK, a.DHV)}")
            continue
        facts.append({"file": str(path), "B": s.get("B"), "anchors": data.get("anchors"),
                      "checks": data.get("tables", {}).get("checks", [])})  # fmt: skip
        for row in data.get("tables", {}).get("forms", []):
            rows[(s["B"], row["S"], row["mode"])] = row
    return rows, facts, ignored


# ---------------------------------------------------------------------------------------------------------
# The forms
# ---------------------------------------------------------------------------------------------------------
def inputs(B: int, S: int, a: argparse.Namespace) -> tuple[jax.Array, ...]:
    """forms.py's random q, k, v in bfloat16 and its gates, held in float32."""
    q, k, v, i, f = make_args(B, a.NH, S, a.DHQK, a.DHV, jnp.bfloat16)
    return q, k, v, i.astype(jnp.float32), f.astype(jnp.float32)


def kernel_variants(a: argparse.Namespace) -> tuple[dict[str, dict[str, int]], list[str]]:
    """The kernel variants of ``--block-dhv`` x ``--depth`` x ``--consumers`` x ``--cluster`` x ``--split`` x
    ``--scores`` that run at the head shape, as ``{row name: {"block_dhv", "depth", "consumers", "cluster", "split",
    "scores", "backward", "backward_consumers", "backward_scan_block_dhv"}}`` (each ``--backward``, ``mosaic`` once
    per ``--backward-consumers`` and ``--scan-block-dhv``; ``cluster`` resolved from ``auto``, ``split`` None for
    ``auto``, resolved per shape), and a note for each that does not."""
    variants, skipped = {}, []
    backwards = [
        (b, w, sb)
        for b in a.backward
        for w in (a.backward_consumers if b == "mosaic" else [1])
        for sb in (a.scan_block_dhv if b == "mosaic" else [None])
    ]
    grid = itertools.product(a.block_dhv, a.depth, a.consumers, a.cluster, a.split, a.scores, a.c_operand, backwards)
    for bdhv, depth, consumers, cluster, split, scores, c_operand, (backward, bwg, scan_block) in grid:
        if cluster is None:  # the library's pick for this tiling, named in the row
            cluster = auto_cluster(a.DHV, bdhv, consumers, a.interpret)
        name = f"mosaic bdhv={bdhv}"
        name += f" d={depth}" if a.depth != [2] else ""
        name += f" wg={consumers}" if a.consumers != [1] else ""
        name += f" cl={cluster}" if a.cluster != [None] else ""
        name += f" sp={'auto' if split is None else split}" if a.split != [None] else ""
        name += f" sc={scores}" if a.scores != ["kernel"] else ""
        name += f" op={c_operand}" if a.c_operand != ["shared"] else ""
        name += f" bw={backward}" if a.backward != ["xla"] else ""
        name += f" bwg={bwg}" if backward == "mosaic" and a.backward_consumers != [2] else ""
        name += f" sbd={scan_block}" if backward == "mosaic" and a.scan_block_dhv != [32] else ""
        why = chunkwise_mosaic_unsupported(
            a.DHQK, a.DHV, jnp.bfloat16, bdhv, depth=depth, consumers=consumers, scores=scores, cluster=cluster,
            c_operand=c_operand,
        )  # fmt: skip
        if why is None and backward == "mosaic" and "fwdbwd" in a.modes:
            why = mosaic_backward_unsupported(a.DHQK, a.DHV, jnp.bfloat16, bdhv, depth, scores)
            why = None if why is None else f"the Mosaic backward cannot run it (the XLA form's would): {why}"
        if why is None:
            variants[name] = {
                "block_dhv": bdhv,
                "depth": depth,
                "consumers": consumers,
                "cluster": cluster,
                "split": split,
                "scores": scores,
                "c_operand": c_operand,
                "backward": backward,
                "backward_consumers": bwg,
                "backward_scan_block_dhv": scan_block,
            }
        else:
            skipped.append(f"{name}: left out, {why}")
    return variants, skipped


def forms(a: argparse.Namespace) -> dict[str, tuple[Callable, int, str, dict]]:
    """``{row name: (form, chunk size, kind, settings)}``, kind ``"xla"`` or ``"mosaic"``; XLA rows first."""
    table: dict[str, tuple[Callable, int, str, dict]] = {}
    for L in a.xla_chunk_sizes:
        table[f"xla L={L}"] = (lambda *x, L=L: chunkwise_fw(*x, chunk_size=L), L, "xla", {})
    for name, settings in kernel_variants(a)[0].items():
        kernel = lambda *x, s=settings: chunkwise_mosaic_fw(*x, **s, interpret=a.interpret)
        table[name] = (kernel, CHUNK, "mosaic", settings)
    return table


def sample(h: jax.Array, stride: int) -> np.ndarray:
    """Every ``stride``-th column of h (B, NH, S, DHV) on the host, float32."""
    return np.asarray(h[..., ::stride], np.float32)


def rates(row: dict, flops: float, nbytes: float, ceilings: Any) -> dict:
    """A timed row's rates and fractions of the ceilings."""
    floor = hardware_floor(bytes_moved=nbytes, flops=flops, bandwidth=ceilings.copy_bytes_per_s,
                           flop_rate=ceilings.matmul_flops_per_s)  # fmt: skip
    t = row["median_s"]
    return {
        "flops": flops,
        "bytes": nbytes,
        "tokens_per_s": row["B"] * row["S"] / t,
        "flops_per_s": flops / t,
        "matmul_fraction": flops / t / ceilings.matmul_flops_per_s,
        "floor_s": floor.seconds,
        "floor_bound": floor.bound,
        "floor_fraction": floor.fraction(t),
    }


TRACE_TOP = 1000  # kernels kept per traced row: all of them, so that --trace's mosaic ms sums every launch
TRACE_PRINTED = 8  # of which the costliest printed under the row


def split_trace(row: dict) -> None:
    """Adds ``trace_mosaic_us`` to a row traced with every kernel kept: the Mosaic GPU kernels' summed time per
    call; keeps only the costliest ``TRACE_PRINTED`` kernels in ``trace_top``."""
    top = row.get("trace_top")
    if not top:
        return
    row["trace_mosaic_us"] = sum(us for us, _, name in top if MOSAIC_KERNELS in name.lower())
    row["trace_top"] = top[:TRACE_PRINTED]


def print_trace(row: dict) -> None:
    """The costliest kernels of a traced row, under its line of the table."""
    for us, launches, name in row.get("trace_top") or []:
        print(f"#   {us / 1e3:8.3f} ms  x{launches:<6g} {name[:100]}", flush=True)


def bench_shape(report: Report, a: argparse.Namespace, B: int, S: int, tfla: dict, ceilings: Any) -> None:
    """The table's rows at one shape: TFLA's (read back), the XLA form's, the kernel's, per mode."""
    args = inputs(B, S, a)
    bound = RMS_BOUND["bfloat16"]
    fwd: dict[str, Callable] = {}
    errors: dict[str, float] = {}
    h_ref: np.ndarray | None = None

    def check(name: str, form: Callable) -> float:
        nonlocal h_ref
        if h_ref is None:
            first = next(n for n, (_, _, kind, _) in table.items() if kind == "xla")
            fwd.setdefault(first, jax.jit(table[first][0]))
            h_ref = sample(fwd[first](*args), a.check_stride)
        if name not in errors:
            fwd.setdefault(name, jax.jit(form))
            errors[name] = rel_rms(h_ref, sample(fwd[name](*args), a.check_stride))
        return errors[name]

    grads_ref: list[np.ndarray] = []

    def check_grads(name: str, fn: Callable, call_args: tuple[jax.Array, ...]) -> dict:
        """The five gradients of ``fn`` against the first XLA row's: the largest relative RMS error, the largest
        error of one element over its gradient's largest (a few wrong elements hide in an RMS), and the elements
        that differ between two calls (a race between a kernel's threads or copies makes them differ)."""
        if not grads_ref:
            first = next(n for n, (_, _, kind, _) in table.items() if kind == "xla")
            reference, reference_args = jitted(table[first][0], "fwdbwd", args)  # the same ct (its key is fixed)
            grads_ref.extend(sample(g, a.check_stride) for g in reference(*reference_args))
        grads = [sample(g, a.check_stride) for g in fn(*call_args)]
        again = [sample(g, a.check_stride) for g in fn(*call_args)]
        rms = max(rel_rms(r, g) for r, g in zip(grads_ref, grads, strict=True))
        worst = max(float(np.max(np.abs(g - r)) / np.max(np.abs(r))) for r, g in zip(grads_ref, grads, strict=True))
        differ = sum(int(np.sum(g != h)) for g, h in zip(grads, again, strict=True))
        ok = rms <= bound and worst <= GRAD_MAX_BOUND and differ == 0
        return {"rel_err": rms, "max_err": worst, "max_bound": GRAD_MAX_BOUND, "nondeterministic": differ, "ok": ok}

    table = forms(a)
    has_xla = any(kind == "xla" for _, _, kind, _ in table.values())
    for mode in a.modes:
        times: dict[str, float] = {}
        if (B, S, mode) in tfla:
            src = tfla[(B, S, mode)]
            flops, nbytes = floor_counts(B, a.NH, S, a.DHQK, a.DHV, src["L"], 2, mode)
            keep = ("median_s", "min_s", "max_s", "spread", "warmup_s", "repeats", "units", "samples_s")
            row = {"form": src["form"], "kind": "tfla", "B": B, "S": S, "mode": mode, "L": src["L"]}
            row.update({k: src.get(k) for k in keep})
            row.update(rates(row, flops, nbytes, ceilings))
            times["tfla"] = row["median_s"]
            report.add("chunkwise", row)
        for name, (form, L, kind, settings) in table.items():
            label, fields = name, dict(settings)
            if mode == "fwd" and kind == "mosaic":  # the backward does not change the forward: one row, no bw=
                mosaic_first = a.backward[0] == "mosaic"
                first = (
                    a.backward[0],
                    a.backward_consumers[0] if mosaic_first else 1,
                    a.scan_block_dhv[0] if mosaic_first else None,
                )
                backward = [fields.pop(k) for k in ("backward", "backward_consumers", "backward_scan_block_dhv")]
                if tuple(backward) != first:
                    continue
                label = name.split(" bw=")[0]
            if kind == "mosaic":  # the split the call runs: auto_split's pick for the shape, or a given one that fits
                try:
                    fields["split"] = forward_tiling(
                        B * a.NH, S, a.DHQK, a.DHV, jnp.bfloat16, settings["scores"], block_dhv=settings["block_dhv"],
                        consumers=settings["consumers"], split=settings["split"],
                    ).split  # fmt: skip
                except ValueError as exc:
                    report.note(f"{name} B={B} S={S} {mode}: left out, {exc}")
                    continue
            row = {"form": label, "kind": kind, "B": B, "S": S, "mode": mode, "L": L, **fields}
            try:
                if mode == "fwd":
                    fn, call_args = fwd.setdefault(name, jax.jit(form)), args
                else:
                    fn, call_args = jitted(form, mode, args)
                timing = time_jitted(
                    fn, *call_args, repeats=a.repeats, calls=a.calls, trace=a.trace, trace_top=TRACE_TOP
                )  # fmt: skip
            except Exception as exc:  # out of memory, or the kernel off a Hopper GPU: recorded, the run goes on
                report.note(f"{name} B={B} S={S} {mode}: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            if kind == "mosaic" and has_xla:
                try:
                    if mode == "fwd":
                        err = check(name, form)
                        row.update(rel_err=err, bound=bound, ok=err <= bound, check_stride=a.check_stride)
                    else:
                        row.update(check_grads(name, fn, call_args), bound=bound, check_stride=a.check_stride)
                except Exception as exc:
                    report.note(f"{name} B={B} S={S}: check FAILED {type(exc).__name__}: {str(exc)[:300]}")
            row.update(timing.as_row())
            split_trace(row)
            row.update(rates(row, *floor_counts(B, a.NH, S, a.DHQK, a.DHV, L, 2, mode), ceilings))
            if kind == "xla":
                times["xla"] = min(times.get("xla", float("inf")), timing.median_s)
            else:
                row.update(
                    t_over_tfla=timing.median_s / times["tfla"] if "tfla" in times else None,
                    t_over_xla=timing.median_s / times["xla"] if "xla" in times else None,
                )
            report.add("chunkwise", row)
            print_trace(row)
            del fn


# ---------------------------------------------------------------------------------------------------------
# The model's prefill
# ---------------------------------------------------------------------------------------------------------
def bench_prefill(report: Report, a: argparse.Namespace, ceilings: Any, deadline: float) -> None:
    """Tokens per second of the model's prefill at batch 1, per backend and prompt length."""
    config = PRESETS[a.preset]()
    report.set("model", {"preset": a.preset, "params": config.num_params(), "config": repr(config)})
    report.table("prefill", PREFILL_COLUMNS)
    params = {}  # per blocks layout: the weights' layout depends only on scan_blocks
    for blocks, (name, fields) in itertools.product(a.prefill_blocks, a.prefill_backends):
        kwargs = dict(fields)
        if "chunk_size" in {f.name for f in dataclasses.fields(BACKENDS[name].config_class)}:
            kwargs.setdefault("chunk_size", a.prefill_chunk_size)
        runtime = RuntimeConfig(
            prefill_backend=name, prefill_backend_kwargs=tuple(kwargs.items()), scan_blocks=blocks == "scan"
        )  # fmt: skip
        label = name + "".join(f" {k}={v}" for k, v in kwargs.items()) + (" unrolled" if blocks == "unrolled" else "")
        for S in a.prefill_tokens:
            if time.time() > deadline:
                report.note(f"prefill {label} S={S}: skipped (--budget-s spent)")
                continue
            try:
                if blocks not in params:  # one layout's weights at a time (the 7B's are 13.7 GB)
                    params.clear()
                    params[blocks] = jax.block_until_ready(random_params(config, runtime))
                ids = jax.random.randint(jax.random.key(S), (1, S), 0, config.vocab_size, jnp.int32)
                run = jax.jit(lambda w, x, runtime=runtime: prefill(config, w, x, runtime=runtime))
                timing = time_jitted(
                    run, params[blocks], ids, repeats=a.prefill_repeats, trace=a.trace, trace_top=TRACE_TOP
                )  # fmt: skip
            except Exception as exc:
                report.note(f"prefill {label} S={S}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                continue
            flops = prefill_flops(config, S, kwargs.get("chunk_size", CHUNK))
            row = {"backend": label, "B": 1, "S": S, **timing.as_row(), "flops": flops}
            row.update(
                tokens_per_s=S / timing.median_s,
                flops_per_s=flops / timing.median_s,
                matmul_fraction=flops / timing.median_s / ceilings.matmul_flops_per_s,
            )
            split_trace(row)
            report.add("prefill", row)
            print_trace(row)


# ---------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark; returns the report's data (what ``--json`` writes)."""
    start = time.time()
    a = parse(argv)
    deadline = start + a.budget_s
    with tempfile.TemporaryDirectory() as directory:
        if a.tfla_json:  # before JAX touches the GPU: torch gets all of its memory
            status, paths = f"read from {len(a.tfla_json)} file(s)", [Path(p) for p in a.tfla_json]
        elif a.tfla == "run":
            status, paths = run_tfla(a, Path(directory), min(a.tfla_timeout_s, a.budget_s / 2))
        else:
            status, paths = "skipped (--tfla skip)", []
        tfla, facts, ignored = read_tfla(paths, a)
    settings = {k: v for k, v in vars(a).items() if k != "prefill_backends"}
    settings["prefill_backends"] = [[name, dict(fields)] for name, fields in a.prefill_backends]
    report = Report("chunkwise", "benchmarks/chunkwise.py", settings, a.json, argv)
    report.set("tfla", {"status": status, "rows": len(tfla), "runs": facts, "ignored": ignored})
    print(f"# TFLA: {status}; {len(tfla)} rows", flush=True)
    for text in ignored:
        report.note(f"TFLA file ignored: {text}")
    ceilings = ceilings_from_arguments(a, report)
    report.table("chunkwise", COLUMNS)
    for text in kernel_variants(a)[1]:
        report.note(text)
    prefill_rows = bool(a.prefill_tokens and a.prefill_backends)
    for B, S in a.shapes:
        if time.time() > deadline - (a.prefill_reserve_s if prefill_rows else 0.0):
            report.note(f"B={B} S={S}: skipped (--budget-s spent)")
            continue
        bench_shape(report, a, B, S, tfla, ceilings)
    if prefill_rows:
        bench_prefill(report, a, ceilings, deadline)
    return report.data


if __name__ == "__main__":
    main()
