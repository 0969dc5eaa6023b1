"""The timing harness every benchmark script shares: timings, hardware floors, the run's facts, JSON out.

A script builds a :class:`Report` from its parsed arguments, times jitted callables with :func:`time_jitted`
(or a small kernel inside one jitted loop with :func:`time_loop`), sets each time against a hardware floor
with :func:`hardware_floor`, and adds rows to named tables. The report prints every row as it comes (a
readable table on stdout) and, with ``--json PATH``, rewrites one JSON file after every row, so a run
stopped part way keeps what it measured. The file holds::

    {"benchmark": "forms",
     "environment": {"date", "platform", "device", "device_count", "jax", "jaxlib", "python", "command",
                     "argv", "commit", "host": {"cpu", "cpus", "python_loop_ms"}},
     "settings": {the parsed arguments},
     "ceilings": {"copy_bytes_per_s", "matmul_flops_per_s", "vector_flops_per_s", "source"},
     "tables": {"name": [row, ...]},
     ...}   # any other facts a script records with Report.set

Timings. Compilation is excluded from every timing and reported on its own (``compile_s``): a function
jitted with ``jax.jit`` is lowered and compiled ahead of time, and the compiled executable is what runs.
``warmup`` untimed calls follow (they load the program and allocate buffers), then ``repeats`` timed
samples, each ended by ``jax.block_until_ready``. A sample may queue several calls back to back
(``calls``), so that the host's dispatch overlaps the device's work. The median over samples is the time;
the spread is the range of the samples over the median.

Small kernels. JAX's per-call dispatch takes tens of microseconds on a GPU (BENCHMARKS.md), more than a
small decode step; to time such a kernel, :func:`time_loop` runs it ``iterations`` times inside one jitted
``lax.fori_loop`` over a donated carry and divides.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

__all__ = [
    "NOMINAL_H200",
    "Ceilings",
    "Column",
    "Floor",
    "GpuMonitor",
    "Report",
    "Timing",
    "add_arguments",
    "ceilings_from_arguments",
    "device_trace",
    "environment",
    "gpu_sample_stats",
    "hardware_floor",
    "measure_ceilings",
    "time_jitted",
    "time_loop",
]


# ---------------------------------------------------------------------------------------------------------
# The run's facts
# ---------------------------------------------------------------------------------------------------------
def _commit() -> str | None:
    """The git commit of the checkout the harness lives in, with ``-dirty`` if files differ; None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def _cpu_model() -> str | None:
    """The host CPU's model name (Linux's /proc/cpuinfo), or the platform's processor string; None if neither."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def python_loop_ms(repeats: int = 5) -> float:
    """Milliseconds of a fixed pure-Python loop (median of ``repeats``): the host's single-thread speed, which the
    host-bound figures (dispatch, a lone prefill chunk's launches) scale with, as one number to compare machines."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        total = 0
        for i in range(200_000):
            total += i * i
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def environment(script: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Where and when a run happens, and the command that repeats it.

    Args:
        script: The script's path from the repository root, e.g. ``"benchmarks/forms.py"``.
        argv: The script's arguments; None for ``sys.argv[1:]``.

    Returns:
        ``date`` (UTC, ISO 8601), ``platform`` (JAX's default backend), ``device`` (the first device's
        kind), ``device_count``, ``jax``, ``jaxlib``, ``python``, ``command`` (one shell line, run from the
        repository root), ``argv``, ``commit`` (None outside a git checkout) and ``host``: the CPU's model,
        its logical CPU count and :func:`python_loop_ms`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": jax.default_backend(),
        "device": device.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": platform.python_version(),
        "command": shlex.join(["PYTHONPATH=.", "python3", script, *argv]),
        "argv": argv,
        "commit": _commit(),
        "host": {"cpu": _cpu_model(), "cpus": os.cpu_count(), "python_loop_ms": python_loop_ms()},
    }


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Time of one unit of work (a call, or one iteration of a timed loop), from ``repeats`` samples.

    Attributes:
        median_s: Median over the samples, seconds per unit.
        min_s: Fastest sample, seconds per unit.
        max_s: Slowest sample, seconds per unit.
        spread: ``(max_s - min_s) / median_s``.
        compile_s: Seconds to lower and compile (None when the callable was not a ``jax.jit`` function:
            then its compilation happened in the warm-up).
        warmup_s: Seconds of the first untimed call after compilation.
        repeats: Number of samples.
        units: Units of work per sample (calls queued per sample times iterations per call).
        samples_s: Every sample, seconds per unit.
        trace: :func:`device_trace` of one more sample, when asked for (``trace=True``); else None.
    """

    median_s: float
    min_s: float
    max_s: float
    spread: float
    compile_s: float | None
    warmup_s: float
    repeats: int
    units: int
    samples_s: tuple[float, ...]
    trace: dict[str, Any] | None = None

    def as_row(self) -> dict[str, Any]:
        """The fields as a dict, to merge into a report row (the trace's fields under ``trace_``)."""
        row = asdict(self)
        row.update({f"trace_{k}": v for k, v in (row.pop("trace") or {}).items()})
        return row


def _check_count(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def time_jitted(
    fn: Callable[..., Any],
    *args: Any,
    repeats: int = 10,
    warmup: int = 1,
    calls: int = 1,
    iterations: int = 1,
    carry: bool = False,
    compiler_options: dict[str, Any] | None = None,
    trace: bool = False,
    monitor: contextlib.AbstractContextManager | None = None,
    trace_top: int = 10,
) -> Timing:
    """Times ``fn(*args)``: compilation apart, then the median of ``repeats`` samples blocked until ready.

    Args:
        fn: A ``jax.jit`` function (compiled ahead of time here, its compile time reported) or any callable
            returning JAX arrays (its first call, which compiles, is then part of the warm-up).
        *args: The arguments.
        repeats: Timed samples.
        warmup: Untimed calls before the samples.
        calls: Calls queued back to back in one sample (blocked on once, at the end).
        iterations: Units of work inside one call (a loop's trip count); times are divided by it.
        carry: Each call's result replaces the first arguments of the next call (a tuple replaces as many
            as it has elements), for functions that donate their inputs, such as a step over a state.
        compiler_options: XLA options of this one compilation (``fn`` must be a ``jax.jit`` function).
        trace: Run one more sample under ``jax.profiler`` and keep its :func:`device_trace` (per unit).
        monitor: A context manager entered around the timed samples only (e.g. a :class:`GpuMonitor`).
        trace_top: How many of the traced sample's costliest kernels the trace lists.

    Returns:
        The :class:`Timing` of one unit: one call divided by ``iterations``.
    """
    _check_count("repeats", repeats, 1)
    _check_count("warmup", warmup, 0)
    _check_count("calls", calls, 1)
    _check_count("iterations", iterations, 1)
    compile_s = None
    if hasattr(fn, "lower"):
        start = time.perf_counter()
        fn = fn.lower(*args).compile(compiler_options=compiler_options or None)
        compile_s = time.perf_counter() - start
    elif compiler_options:
        raise TypeError(f"compiler_options need a jax.jit function, got {fn!r}")

    def call(args):
        out = fn(*args)
        if not carry:
            return out, args
        head = out if isinstance(out, tuple) else (out,)
        return out, (*head, *args[len(head) :])

    warmup_s = 0.0
    for n in range(warmup):
        start = time.perf_counter()
        out, args = call(args)
        jax.block_until_ready(out)
        if n == 0:
            warmup_s = time.perf_counter() - start

    def sample() -> None:
        nonlocal args
        for _ in range(calls):
            out, args = call(args)
        jax.block_until_ready(out)

    units = calls * iterations
    samples = []
    with monitor or contextlib.nullcontext():
        for _ in range(repeats):
            start = time.perf_counter()
            sample()
            samples.append((time.perf_counter() - start) / units)
    median = statistics.median(samples)
    return Timing(
        median_s=median,
        min_s=min(samples),
        max_s=max(samples),
        spread=(max(samples) - min(samples)) / median if median > 0 else 0.0,
        compile_s=compile_s,
        warmup_s=warmup_s,
        repeats=repeats,
        units=units,
        samples_s=tuple(samples),
        trace=device_trace(sample, units, trace_top) if trace else None,  # after the samples: the GPU's clock is up
    )


def time_loop(
    body: Callable[[Any], Any],
    init: Any,
    iterations: int,
    *,
    repeats: int = 5,
    unroll: int = 1,
    compiler_options: dict[str, Any] | None = None,
    trace: bool = False,
) -> Timing:
    """Times one iteration of ``body`` inside a jitted ``lax.fori_loop`` of ``iterations`` iterations.

    The loop's carry is donated, and each sample starts from the last one's result, so a kernel that
    updates a state in place runs as it would in a decode loop, and no per-call dispatch is timed.

    Args:
        body: ``carry -> carry`` (same structure, shapes and dtypes).
        init: The first carry: an array or a tuple of arrays (consumed: donated).
        iterations: Loop trip count.
        repeats: Timed samples (loops).
        unroll: ``lax.fori_loop``'s ``unroll``.
        compiler_options: XLA options of the loop's compilation.
        trace: Also trace one more loop (:func:`device_trace`, per iteration).

    Returns:
        The :class:`Timing` of one iteration.
    """
    _check_count("iterations", iterations, 1)
    single = not isinstance(init, tuple)
    args = (init,) if single else init

    def loop(*carry):
        def step(_, c):
            out = body(c[0] if single else c)
            return (out,) if single else tuple(out)

        return jax.lax.fori_loop(0, iterations, step, carry, unroll=unroll)

    jitted = jax.jit(loop, donate_argnums=tuple(range(len(args))))
    return time_jitted(
        jitted,
        *args,
        repeats=repeats,
        iterations=iterations,
        carry=True,
        compiler_options=compiler_options,
        trace=trace,
    )


# ---------------------------------------------------------------------------------------------------------
# Hardware floors
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ceilings:
    """The rates a floor divides by.

    Attributes:
        copy_bytes_per_s: Device memory bandwidth, bytes read plus bytes written per second (a copy).
        matmul_flops_per_s: Dense bfloat16 matrix-unit rate, FLOPs per second (a multiply-add is 2 FLOPs).
        vector_flops_per_s: float32 rate outside the matrix units, FLOPs per second.
        source: ``"nominal"`` (the figures below) or ``"measured"`` (:func:`measure_ceilings`).
    """

    copy_bytes_per_s: float
    matmul_flops_per_s: float
    vector_flops_per_s: float
    source: str = "nominal"


# One NVIDIA H200: copy bandwidth as measured for a device-to-device copy in a jitted loop (4.27 TB/s of the
# 4.8 TB/s data sheet), the bf16 matrix rate as measured for 8192^3 products (600-700 TFLOP/s: 700), and the
# float32 FMA rate of the CUDA cores (132 SMs x 128 lanes x 2 FLOPs x ~1.98 GHz = 67 TFLOP/s).
NOMINAL_H200 = Ceilings(copy_bytes_per_s=4.27e12, matmul_flops_per_s=700e12, vector_flops_per_s=67e12)


def measure_ceilings(small: bool = False, repeats: int = 5) -> Ceilings:
    """Measures the copy bandwidth and the bf16 matrix rate of the default device.

    The copy: ``x <- x * a`` on 1 GiB of float32 (``small``: 4 MiB), in place, 10 passes in one jitted loop
    (a per-call timing adds the dispatch and a fresh allocation per pass). The matrix rate: a chain of 10
    dependent products of 8192 x 8192 bf16 matrices (``small``: 256), bf16 out (float32 accumulation inside the
    product), the right-hand matrix scaled by 1/sqrt(n) so that the chain stays finite, unrolled in one jitted
    call: nothing but the products runs. (A float32 result scaled and cast to bf16 after each product read 608
    TFLOP/s on an H200 where a prefill's own products ran at 683 or more in the same process; the same chain of
    bf16 products as a loop of one product an iteration read 682 to 715 on an H100 where the unrolled chain read
    739 to 748 in the same process: BENCHMARKS.md.) The float32 vector rate is not measured: it is
    :data:`NOMINAL_H200`'s.

    Args:
        small: Tiny sizes, to check a script on a CPU.
        repeats: Timed samples of each.
    """
    n = 256 if small else 8192
    words = (1 << 20) if small else (1 << 28)
    passes = 10
    b = (jax.random.normal(jax.random.key(2), (n, n), jnp.float32) / math.sqrt(n)).astype(jnp.bfloat16)

    def product(x):  # the next product needs this one: none can be hoisted or merged
        return jnp.dot(x, b)

    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    matmul = time_loop(product, a, passes, repeats=repeats, unroll=passes)
    x = jax.random.normal(jax.random.key(3), (words,), jnp.float32)
    copy = time_loop(lambda x: x * jnp.float32(1.0001), x, passes, repeats=repeats)
    return Ceilings(
        copy_bytes_per_s=2 * words * 4 / copy.median_s,
        matmul_flops_per_s=2 * n**3 / matmul.median_s,
        vector_flops_per_s=NOMINAL_H200.vector_flops_per_s,
        source="measured",
    )


@dataclass(frozen=True)
class Floor:
    """The least time a piece of work can take: its bytes at the bandwidth or its FLOPs at the rate.

    Attributes:
        seconds: ``max(bytes_moved / bandwidth, flops / flop_rate)``.
        bytes_moved: Bytes that must cross the memory bus (read plus written).
        flops: FLOPs that must be done.
        bound: ``"bytes"`` or ``"flops"``, whichever gives ``seconds``.
    """

    seconds: float
    bytes_moved: float
    flops: float
    bound: str

    def fraction(self, seconds: float) -> float:
        """``floor / seconds``: the fraction of the hardware floor a measured time reaches (1 is the floor)."""
        return self.seconds / seconds if seconds > 0 and math.isfinite(seconds) else float("nan")


def hardware_floor(
    *,
    bytes_moved: float = 0.0,
    flops: float = 0.0,
    bandwidth: float | None = None,
    flop_rate: float | None = None,
) -> Floor:
    """The floor of a piece of work: the larger of ``bytes_moved / bandwidth`` and ``flops / flop_rate``.

    Args:
        bytes_moved: Bytes read plus written (needs ``bandwidth`` when positive).
        flops: FLOPs (needs ``flop_rate`` when positive).
        bandwidth: Bytes per second, e.g. ``Ceilings.copy_bytes_per_s``.
        flop_rate: FLOPs per second, e.g. ``Ceilings.matmul_flops_per_s``.
    """
    for name, count, rate in (("bytes_moved", bytes_moved, bandwidth), ("flops", flops, flop_rate)):
        if count < 0:
            raise ValueError(f"{name} must be >= 0, got {count}")
        if count and not (rate and rate > 0):
            raise ValueError(f"{name}={count} needs a positive rate, got {rate!r}")
    by_bytes = bytes_moved / bandwidth if bytes_moved else 0.0
    by_flops = flops / flop_rate if flops else 0.0
    return Floor(
        max(by_bytes, by_flops), float(bytes_moved), float(flops), "bytes" if by_bytes >= by_flops else "flops"
    )


# ---------------------------------------------------------------------------------------------------------
# The GPU's clock and power while timing
# ---------------------------------------------------------------------------------------------------------
class GpuMonitor:
    """Samples one GPU's SM clock, power draw and temperature with ``nvidia-smi`` while entered.

    A GPU that reaches its power limit lowers its clock, and the same program then takes longer: the samples say
    whether a timing ran at full clock. After the block, :attr:`stats` holds :func:`gpu_sample_stats` of the
    samples; it stays empty where ``nvidia-smi`` is missing (a CPU) or printed no sample.

    Args:
        interval_ms: ``nvidia-smi --loop-ms``: the time between samples (at best; it is a separate process).
        gpu: The GPU's index for ``nvidia-smi --id``.
    """

    QUERY = "clocks.sm,power.draw,temperature.gpu"

    def __init__(self, interval_ms: int = 100, gpu: int = 0) -> None:
        self.interval_ms = interval_ms
        self.gpu = gpu
        self.stats: dict[str, float] = {}
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> GpuMonitor:
        self.stats = {}
        exe = shutil.which("nvidia-smi")
        if exe is not None:
            command = [exe, f"--id={self.gpu}", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits"]
            command.append(f"--loop-ms={self.interval_ms}")
            if shutil.which("stdbuf"):  # a line per sample even into a pipe, so that stopping it loses none
                command = ["stdbuf", "-oL", *command]
            self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(signal.SIGINT)  # what ends nvidia-smi's loop (Ctrl+C); a stronger signal if it lingers
        try:
            out, _ = process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        self.stats = gpu_sample_stats(out.splitlines())


def gpu_sample_stats(lines: Sequence[str]) -> dict[str, float]:
    """Summary of ``nvidia-smi`` CSV samples ``"clock MHz, power W, temperature C"`` (lines that do not parse, such
    as ``[N/A]``, are skipped): ``gpu_samples``, the SM clock's median, min and max (``gpu_sm_mhz_*``), the power's
    median and max (``gpu_power_w_*``) and the highest temperature (``gpu_temp_c_max``); empty without samples."""
    rows = []
    for line in lines:
        try:
            sm, power, temp = (float(part) for part in line.split(","))
        except ValueError:
            continue
        rows.append((sm, power, temp))
    if not rows:
        return {}
    sm, power, temp = (np.array(column) for column in zip(*rows, strict=True))
    return {
        "gpu_samples": len(rows),
        "gpu_sm_mhz_median": float(np.median(sm)),
        "gpu_sm_mhz_min": float(sm.min()),
        "gpu_sm_mhz_max": float(sm.max()),
        "gpu_power_w_median": float(np.median(power)),
        "gpu_power_w_max": float(power.max()),
        "gpu_temp_c_max": float(temp.max()),
    }


# ---------------------------------------------------------------------------------------------------------
# Device traces
# ---------------------------------------------------------------------------------------------------------
def device_trace(run: Callable[[], Any], units: int, top: int = 10) -> dict[str, Any]:
    """Kernels on the GPU's busiest stream during one ``run()``, per unit of work (e.g. per token).

    Args:
        run: Does the work once and blocks on its result (warm it up first: an idle GPU's clock is low).
        units: Units of work in one run.
        top: How many of the costliest kernels to list.

    Returns:
        ``main`` (the kernel with the largest summed time) and ``main_us`` (its median duration),
        ``other_us`` (all other kernels' time per unit), ``kernels`` (launches per unit), ``kernel_us``
        (summed kernel time per unit), ``span_us`` (first start to last end, per unit), ``wall_us`` (the
        host's time for ``run()`` under the profiler, per unit), ``busy`` (kernel
        time over span) and ``top`` (the costliest kernels: µs per unit, launches per unit, name); an
        empty dict when no GPU stream shows in the trace (on a CPU).
    """
    from jax.profiler import ProfileData

    directory = tempfile.mkdtemp()
    jax.profiler.start_trace(directory)
    start = time.perf_counter()
    run()
    wall = (time.perf_counter() - start) * 1e6
    jax.profiler.stop_trace()
    files = sorted(Path(directory).rglob("*.xplane.pb"))
    if not files:
        return {}
    streams = []
    for plane in ProfileData.from_file(str(files[-1])).planes:
        if plane.name.startswith("/device:GPU"):
            streams += [list(line.events) for line in plane.lines if line.name.startswith("Stream")]
    streams = [events for events in streams if events]
    if not streams:
        return {}
    events = max(streams, key=len)
    durations: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        durations[e.name].append(e.duration_ns / 1e3)
    main = max(durations, key=lambda n: sum(durations[n]))
    busy = sum(sum(d) for d in durations.values())
    span = (max(e.start_ns + e.duration_ns for e in events) - min(e.start_ns for e in events)) / 1e3
    costliest = sorted(durations.items(), key=lambda item: -sum(item[1]))[:top]
    return {
        "main": main,
        "main_us": float(np.median(durations[main])),
        "other_us": (busy - sum(durations[main])) / units,
        "kernels": len(events) / units,
        "kernel_us": busy / units,
        "span_us": span / units,
        "wall_us": wall / units,
        "busy": busy / span if span > 0 else float("nan"),
        "top": [(sum(d) / units, len(d) / units, name) for name, d in costliest],
    }


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """One column of a printed table: ``header``, the row's ``key``, a format spec, a scale factor, a width.

    Text is left-aligned, numbers right-aligned; a missing value prints blank.
    """

    header: str
    key: str
    fmt: str = ""
    scale: float = 1.0
    width: int = 9

    def cell(self, row: dict[str, Any]) -> str:
        width = max(len(self.header), self.width)
        value = row.get(self.key)
        if value is None:
            return " " * width
        if isinstance(value, bool) or not isinstance(value, int | float):
            return str(value).ljust(width)
        return format(value * self.scale if self.scale != 1 else value, self.fmt).rjust(width)

    def head(self) -> str:
        return self.header.rjust(max(len(self.header), self.width))


def _jsonable(x: Any) -> Any:
    """``x`` with tuples as lists, numpy scalars as Python numbers and non-finite floats as None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, bool | int | float | str) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
    return repr(x)


@dataclass
class Report:
    """A benchmark run's results: the environment, the settings, tables of rows; printed and written as JSON.

    Attributes:
        benchmark: The script's name, e.g. ``"forms"``.
        script: The script's path from the repository root.
        settings: The parsed arguments.
        json_path: Where the JSON goes (rewritten after every change), or None.
        argv: The script's arguments (None: ``sys.argv[1:]``), for the command line.
    """

    benchmark: str
    script: str
    settings: dict[str, Any]
    json_path: str | Path | None = None
    argv: Sequence[str] | None = None
    data: dict[str, Any] = field(init=False)
    columns: dict[str, list[Column]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.data = {
            "benchmark": self.benchmark,
            "environment": environment(self.script, self.argv),
            "settings": dict(self.settings),
            "tables": {},
        }
        env = self.data["environment"]
        print(f"# {self.benchmark}: {env['device']} ({env['platform']}), jax {env['jax']}, {env['date']}")
        print(f"# {env['command']}", flush=True)

    def set(self, key: str, value: Any) -> None:
        """Records a fact of the run at the top level of the JSON (e.g. ``"ceilings"``)."""
        self.data[key] = value
        self.save()

    def table(self, name: str, columns: Sequence[Column]) -> None:
        """Starts a table: prints its header; its rows come with :meth:`add`."""
        self.columns[name] = list(columns)
        self.data["tables"].setdefault(name, [])
        print(f"\n## {name}")
        print("  ".join(c.head() for c in columns), flush=True)

    def add(self, name: str, row: dict[str, Any]) -> dict[str, Any]:
        """Adds a row to table ``name`` (started by :meth:`table`), prints it and rewrites the JSON."""
        if name not in self.columns:
            raise ValueError(f"table {name!r} was not started; started: {sorted(self.columns)}")
        self.data["tables"][name].append(row)
        print("  ".join(c.cell(row) for c in self.columns[name]), flush=True)
        self.save()
        return row

    def note(self, text: str) -> None:
        """Prints a line of commentary (a skipped or failed case) and keeps it in the JSON's ``notes``."""
        self.data.setdefault("notes", []).append(text)
        print(f"# {text}", flush=True)
        self.save()

    def save(self) -> None:
        """Writes the JSON file (when a path was given)."""
        if self.json_path is None:
            return
        path = Path(self.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(_jsonable(self.data), indent=1, allow_nan=False) + "\n")
        tmp.replace(path)


def add_arguments(parser: argparse.ArgumentParser, repeats: int, ceilings: str = "nominal") -> None:
    """Adds the options every benchmark script shares: ``--json``, ``--repeats`` and ``--ceilings``."""
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed samples per measurement")
    parser.add_argument(
        "--ceilings",
        choices=("nominal", "measured"),
        default=ceilings,
        help="the floors' rates: an H200's nominal figures, or measured on this device first",
    )


def ceilings_from_arguments(args: argparse.Namespace, report: Report) -> Ceilings:
    """The ceilings ``--ceilings`` asks for (measured at tiny sizes off a GPU), recorded in the report."""
    if args.ceilings == "measured":
        ceilings = measure_ceilings(small=jax.default_backend() != "gpu", repeats=args.repeats)
    else:
        ceilings = NOMINAL_H200
    report.set("ceilings", asdict(ceilings))
    print(
        f"# ceilings ({ceilings.source}): copy {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s, bf16 matmul "
        f"{ceilings.matmul_flops_per_s / 1e12:.0f} TFLOP/s, float32 vector {ceilings.vector_flops_per_s / 1e12:.0f} "
        "TFLOP/s",
        flush=True,
    )
    return ceilings
