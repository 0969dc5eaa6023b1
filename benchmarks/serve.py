"""The serving engine under load: continuous batching against the bare decode step and static batching.

Measures the serving figures of BENCHMARKS.md (the xLSTM-7B preset with random bfloat16 weights, on an H200)::

    PYTHONPATH=. python3 benchmarks/serve.py --json serve.json

and on a CPU with the tiny preset (a smoke test, seconds): ``PYTHONPATH=. python benchmarks/serve.py --tiny``.

One set of ``--requests`` requests is drawn with ``--seed``: prompt lengths uniform in ``--prompt-len LO HI``,
output lengths uniform in ``--output-len LO HI`` (both inclusive), prompt tokens uniform over the vocabulary.
Every request is greedy with no stop token, so each produces exactly its output length.

The run compiles two sets of programs, each once: the :class:`xlstm_jax.serving.Engine`'s (decode step, prefill
chunk, slot insertion and copy; a second engine with a prefix cache shares them, as the engine's programs are
cached per model, runtime and shape) and :func:`xlstm_jax.generation.generate`'s at the static batch's shape
(prefill and decode loop; the step table's timing reuses them). The parts come in order of importance, and the
JSON is rewritten after every row, so a run stopped part way keeps what it measured:

``step``, row ``engine``: the engine's own decode step over all ``--slots`` slots (every slot active, greedy),
the program it runs while serving, ``--engine-steps`` calls queued back to back (the device's time per step);
row ``engine+sync``: the same with the host waiting for each step's tokens, as the serving loop does.

``saturated``: ``--slots`` requests submitted at once, each generating ``2 * output max`` tokens, so that all
slots run together for a while; ``full_tokens_per_s`` is the output rate while every slot is held, from the
engine's counters sampled every ``--monitor-ms``: the rate at ``--slots`` concurrent streams.

``prefix``: a shared system prompt of ``--system-tokens`` random tokens followed by a user suffix of ``--suffix-len LO
HI`` tokens, ``--prefix-requests`` requests sent one after another (each after the last has finished, so no request
queues), ``--prefix-output`` tokens each; time to first token with no prefix cache, and with a cache of
``--prefix-cache-bytes`` into which ``Engine.cache_prefix`` put the system prompt first: row ``on`` with the engine's
default chunk shapes (``--chunk-tokens`` and its halvings down to 16), row ``on, C`` with the one shape
``--chunk-tokens``, row ``on, switch 5 ms`` as ``on`` at Python's default switch interval (the run sets
``--switch-interval-ms``, 0.5 by default, as ``xlstm-jax serve`` does), row ``on, short chunks as command buffers`` as
``on`` with ``Engine(short_chunk_command_buffers=True)``; where XLA can keep a program's scratch buffers in place
(``stable_scratch_supported()``), rows ``off, stable scratch`` and ``on, stable scratch`` with
``Engine(stable_scratch=True)`` (run with ``XLA_PYTHON_CLIENT_ALLOCATOR=vmm``, without which XLA records their command
buffers again as before; the engine warns); with ``--stable-scratch`` every engine of the run is built so, and the
prefix part runs those two rows only (no build without it to compile). ``speedup`` is the p50 of the ``off`` row of the
same build (stable scratch or not) over the p50 with; ``hits`` the cache's hit count; ``engine TTFT`` the mean of the
engine's own histogram (submit to the token's send, no client in it). Table ``chunks``: one prefill chunk in each shape,
``cache_prefix`` of a new random prompt that fills it, waited for (median of ``--repeats``); ``program ms``, the chunk
program alone on the engine's buffers (no copies in or out, no host work of the engine's); and from a device trace of
one more chunk (GPU only) the summed time of its kernels, their number and the fraction of the chunk's span the GPU was
busy.

``step``, row ``generate``: the bare decode step at batch ``--slots``, timed as ``benchmarks/generate.py``
times it: one ``generate`` call of the first static batch for N/2 + 1 and for N new tokens (N its token buffer,
``--step-tokens``), the time per token the difference over the extra tokens. ``--slots`` over that time is the
step-limited output rate, the most any scheduler can draw from this step at that batch.

``static``: the requests through ``generate`` in batches of ``--slots`` in arrival order (prompts left-padded to
the longest allowed prompt), each batch decoding its longest output; output tokens/s counts the tokens the
requests asked for (what a client receives), over the batches' summed time (compilation excluded: the step
timing's calls compiled the batch shape of ``--slots`` rows and its token buffer, one untimed call compiles any
other).

The engine prefills up to ``--prefill-rows`` waiting requests together (``max_prefill_rows``); with several
values the first serves every part and the rates part runs once per value (column ``rows``), on the same
arrivals.

``rates``: the engine (no prefix cache) with the requests arriving as a Poisson process at each rate of
``--rates`` (requests/s; ``inf``: all at once), seeded. A client coroutine per request submits it at its
arrival time and reads its stream (``async for``); times are taken as the events arrive. Per rate: output
tokens/s (all tokens over first arrival to last token), time to first token (submit to first event) and
inter-token latency (between a request's consecutive events), each p50 and p99 over requests (TTFT) or gaps
(ITL); ``mean_batch`` the tokens per decode step. A rate whose row would not end (its arrival span plus its
tokens at the saturated row's output rate) within ``--budget-s`` of the run's start is skipped with a note.

``--parts`` runs a subset (step, saturated, prefix, generate, static, rates; rates needs saturated, generate and
static). The JSON's ``targets`` (rewritten as each part ends) sets the saturated rate against the step-limited rate of
``generate``'s step (``saturated_of_step``), of the engine's own step (``saturated_of_engine_step``) and the
static rate, and the prefix speedup, beside the wanted 0.85, 2 and 5; ``phases`` holds the seconds each part
took (compilation included); ``engine_compilations`` (``Engine.compilations()``) and ``generate_compilations``
show that nothing compiled twice.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from benchmarks.generate import PRESETS, decode_per_token, noise_note, random_params
from benchmarks.harness import Column, Report, add_arguments, device_trace, time_jitted
from xlstm_jax import generation
from xlstm_jax.generation import MIN_TOKEN_BUFFER, generate
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig
from xlstm_jax.serving import SWITCH_INTERVAL_S, Engine, SamplingParams
from xlstm_jax.serving.engine import stable_scratch_supported

TINY = {  # --tiny: every size small enough for a CPU in seconds
    "slots": 4,
    "requests": 8,
    "prompt_len": [3, 12],
    "output_len": [8, 256],  # a token buffer of 256: generate's step time is a difference over 127 tokens
    "monitor_ms": 2.0,
    "rates": [50.0, math.inf],
    "chunk_tokens": 32,  # chunk shapes 16 and 32
    "system_tokens": 40,
    "suffix_len": [2, 5],
    "prefix_requests": 3,
    "prefix_output": 2,
    "repeats": 5,
    "engine_steps": 8,
}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation) of ``values``; None when empty."""
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else None


def draw_requests(
    n: int, prompt_len: Sequence[int], output_len: Sequence[int], vocab_size: int, seed: int
) -> list[tuple[list[int], int]]:
    """``n`` requests (prompt ids, output length), lengths uniform in the inclusive ranges, ids uniform."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_len[0], prompt_len[1] + 1, n)
    outputs = rng.integers(output_len[0], output_len[1] + 1, n)
    return [(rng.integers(0, vocab_size, int(s)).tolist(), int(o)) for s, o in zip(lengths, outputs, strict=True)]


def poisson_offsets(n: int, rate: float, seed: int) -> np.ndarray:
    """Arrival times (s from the first) of a Poisson process of ``rate`` requests/s; all 0 for ``inf``."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


async def _client(engine: Engine, prompt: list[int], max_tokens: int, seed: int) -> dict[str, Any]:
    submitted = time.perf_counter()
    stream = engine.submit(prompt, SamplingParams(max_tokens=max_tokens, seed=seed))
    times, reason = [], None
    async for event in stream:
        if event.token_id is not None:
            times.append(time.perf_counter())
        reason = event.finish_reason
    return {"submitted": submitted, "times": times, "reason": reason, "expected": max_tokens}


async def _drive(
    engine: Engine, requests: Sequence[tuple[list[int], int]], offsets: np.ndarray | None, monitor_s: float
) -> tuple[list[dict[str, Any]], list[tuple[float, dict[str, Any]]]]:
    """Submits each request at its offset (None: one after another) and reads every stream; samples stats()."""
    samples: list[tuple[float, dict[str, Any]]] = []
    done = asyncio.Event()

    async def monitor() -> None:
        while not done.is_set():
            samples.append((time.perf_counter(), engine.stats()))
            await asyncio.sleep(monitor_s)

    watcher = asyncio.create_task(monitor())
    start = time.perf_counter()
    tasks = []
    for i, (prompt, max_tokens) in enumerate(requests):
        if offsets is None:
            tasks.append(await _client(engine, prompt, max_tokens, i))
            continue
        delay = start + offsets[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_client(engine, prompt, max_tokens, i)))
    records = tasks if offsets is None else list(await asyncio.gather(*tasks))
    done.set()
    await watcher
    samples.append((time.perf_counter(), engine.stats()))
    for r in records:
        if r["reason"] != "length" or len(r["times"]) != r["expected"]:
            raise RuntimeError(
                f"a request ended with {r['reason']!r} after {len(r['times'])} tokens, not 'length' after "
                f"{r['expected']} (engine error: {engine.error!r})"
            )
    return records, samples


def summarize(records: list[dict[str, Any]], samples: list[tuple[float, dict[str, Any]]], slots: int) -> dict:
    """Output rate, TTFT and ITL percentiles of a run's client records; the rate while every slot was held."""
    ttft = [r["times"][0] - r["submitted"] for r in records]
    itl = [b - a for r in records for a, b in zip(r["times"], r["times"][1:], strict=False)]
    tokens = sum(len(r["times"]) for r in records)
    span = max(r["times"][-1] for r in records) - min(r["submitted"] for r in records)
    full_t = full_tokens = full_steps = 0.0
    for (t0, s0), (t1, s1) in zip(samples, samples[1:], strict=False):
        if s0["slots_in_use"] == slots and s1["slots_in_use"] == slots:
            full_t += t1 - t0
            full_tokens += s1["tokens_generated_total"] - s0["tokens_generated_total"]
            full_steps += s1["decode_steps_total"] - s0["decode_steps_total"]
    first, last = samples[0][1], samples[-1][1]
    steps = last["decode_steps_total"] - first["decode_steps_total"]
    return {
        "requests": len(records),
        "output_tokens": tokens,
        "span_s": span,
        "tokens_per_s": tokens / span,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
        "decode_steps": steps,
        "mean_batch": (last["tokens_generated_total"] - first["tokens_generated_total"]) / steps if steps else None,
        "prefill_chunks": last["prefill_chunks_total"] - first["prefill_chunks_total"],
        "full_s": full_t,
        "full_tokens_per_s": full_tokens / full_t if full_t > 0 else None,
        "full_step_ms": 1e3 * full_t / full_steps if full_steps else None,
    }


STEP_COLUMNS = [
    Column("program", "program", width=11),
    Column("batch", "batch", width=6),
    Column("ms/step", "ms_per_step", ".3f"),
    Column("tokens/s", "tokens_per_s", ".0f"),
    Column("spread", "spread", ".2f"),
    Column("N/2+1 spread", "short_spread", ".2f"),
    Column("N spread", "long_spread", ".2f"),
    Column("first call s", "first_call_s", ".1f"),
]
SATURATED_COLUMNS = [
    Column("requests", "requests", width=8),
    Column("tokens", "output_tokens", width=8),
    Column("tokens/s", "tokens_per_s", ".0f"),
    Column("full tok/s", "full_tokens_per_s", ".0f"),
    Column("full ms/step", "full_step_ms", ".3f"),
    Column("of engine step", "of_engine_step", ".3f"),
    Column("batch", "mean_batch", ".1f", width=6),
    Column("TTFT p50 ms", "ttft_p50_s", ".1f", 1e3),
    Column("ITL p50 ms", "itl_p50_s", ".2f", 1e3),
    Column("ITL p99 ms", "itl_p99_s", ".2f", 1e3),
]
STATIC_COLUMNS = [
    Column("batches", "batches", width=7),
    Column("requests", "requests", width=8),
    Column("tokens", "output_tokens", width=8),
    Column("s", "seconds", ".2f"),
    Column("tokens/s", "tokens_per_s", ".0f"),
]
RATE_COLUMNS = [
    Column("rate/s", "rate", width=9),
    Column("rows", "prefill_rows", width=4),
    Column("requests", "requests", width=8),
    Column("tokens/s", "tokens_per_s", ".0f"),
    Column("of step", "of_step", ".3f"),
    Column("of static", "of_static", ".2f"),
    Column("batch", "mean_batch", ".1f", width=6),
    Column("TTFT p50 ms", "ttft_p50_s", ".1f", 1e3),
    Column("TTFT p99 ms", "ttft_p99_s", ".1f", 1e3),
    Column("ITL p50 ms", "itl_p50_s", ".2f", 1e3),
    Column("ITL p99 ms", "itl_p99_s", ".2f", 1e3),
]
PREFIX_COLUMNS = [
    Column("cache", "cache", width=10),
    Column("requests", "requests", width=8),
    Column("TTFT p50 ms", "ttft_p50_s", ".1f", 1e3),
    Column("TTFT p99 ms", "ttft_p99_s", ".1f", 1e3),
    Column("engine TTFT ms", "engine_ttft_mean_s", ".1f", 1e3),
    Column("prefilled/req", "prefill_tokens_per_request", ".0f"),
    Column("hits", "hits", width=5),
    Column("speedup", "speedup", ".2f"),
]


CHUNK_COLUMNS = [
    Column("tokens", "tokens", width=6),
    Column("ms", "ms", ".2f"),
    Column("spread", "spread", ".2f"),
    Column("program ms", "program_ms", ".2f"),
    Column("kernel ms", "kernel_ms", ".2f"),
    Column("kernels", "kernels", ".0f"),
    Column("busy", "busy", ".2f"),
]
PYTHON_SWITCH_MS = 5.0  # the interpreter's default switch interval
PARTS = ("step", "saturated", "prefix", "generate", "static", "rates")


def _pair(name: str):
    def parse(values: list[int]) -> list[int]:
        if len(values) != 2 or not 1 <= values[0] <= values[1]:
            raise ValueError(f"{name} must be two integers 1 <= LO <= HI, got {values}")
        return values

    return parse


def engine_step_rows(engine: Engine, steps: int, repeats: int) -> list[dict[str, Any]]:
    """The engine's decode step over all its slots (all active, greedy), ``steps`` calls per sample.

    Row ``engine`` queues the calls back to back (the device's time per step); row ``engine+sync`` waits for each
    step's tokens on the host, as the serving loop does. The engine must be idle (not started): the steps
    overwrite its slots' states and logits, which a request's admission overwrites again.
    """
    N = engine.num_slots
    rows = []
    for program, run in (
        ("engine", engine.step_all_slots),
        ("engine+sync", lambda: np.asarray(engine.step_all_slots())),
    ):
        timing = time_jitted(run, repeats=repeats, calls=steps)
        rows.append(
            {
                "program": program,
                "batch": N,
                "ms_per_step": timing.median_s * 1e3,
                "tokens_per_s": N / timing.median_s,
                "spread": timing.spread,
                "first_call_s": timing.warmup_s,
                "steps": steps,
            }
        )
    return rows


def prefix_row(engine: Engine, chats: list[tuple[list[int], int]], monitor_s: float) -> dict[str, Any]:
    """Sends ``chats`` one after another through ``engine``; their TTFT, prefix-cache hits, tokens prefilled."""
    before = engine.stats()
    with engine:
        records, samples = asyncio.run(_drive(engine, chats, None, monitor_s))
    after = engine.stats()
    row = summarize(records, samples, engine.num_slots)
    ttft = [
        after["time_to_first_token_seconds"][k] - before["time_to_first_token_seconds"][k] for k in ("sum", "count")
    ]
    row.update(
        hits=after["prefix_cache_hits_total"] - before["prefix_cache_hits_total"],
        prefill_tokens_per_request=(after["prefill_tokens_total"] - before["prefill_tokens_total"]) / len(chats),
        engine_ttft_mean_s=ttft[0] / ttft[1] if ttft[1] else None,
    )
    return row


def saturated_row(
    engine: Engine, requests: list[tuple[list[int], int]], tokens: int, engine_step_rate: float | None, monitor_s: float
) -> dict[str, Any]:
    """``requests`` (their prompts) submitted at once, each generating ``tokens`` tokens: the rate while every
    slot is held."""
    with engine:
        records, samples = asyncio.run(
            _drive(engine, [(prompt, tokens) for prompt, _ in requests], np.zeros(len(requests)), monitor_s)
        )
    sat = summarize(records, samples, engine.num_slots)
    sat["of_engine_step"] = _ratio(sat["full_tokens_per_s"], engine_step_rate)
    return sat


def prefix_part(engine: Engine, make_engine, vocab_size: int, a, monitor_s: float, report, targets) -> Engine:
    """The prefix rows (no cache; the cache with every chunk shape; the cache with one shape) and the chunk
    table; returns the last engine made."""
    rng = np.random.default_rng(a.seed + 1)
    system = rng.integers(0, vocab_size, a.system_tokens).tolist()
    chats = [
        (system + rng.integers(0, vocab_size, int(n)).tolist(), a.prefix_output)
        for n in rng.integers(a.suffix_len[0], a.suffix_len[1] + 1, a.prefix_requests)
    ]
    report.table("prefix", PREFIX_COLUMNS)
    on = a.prefix_cache_bytes
    if a.stable_scratch:  # every engine of the run is a stable-scratch build: its off and on rows only
        off = report.add("prefix", {"cache": "off, stable scratch", **prefix_row(engine, chats, monitor_s)})
        offs = {True: off}
        variants = [("on, stable scratch", on, {}, a.switch_interval_ms)]
    else:
        offs = {False: report.add("prefix", {"cache": "off", **prefix_row(engine, chats, monitor_s)})}
        variants = [("on", on, {}, a.switch_interval_ms)]
    if stable_scratch_supported() and not a.stable_scratch:  # every chunk shape as command buffers recorded once
        variants += [("off, stable scratch", 0, {"stable_scratch": True}, a.switch_interval_ms)]
        variants += [("on, stable scratch", on, {"stable_scratch": True}, a.switch_interval_ms)]
    variants += [] if a.stable_scratch else [
        (f"on, {a.chunk_tokens}", on, {"min_prefill_chunk_tokens": a.chunk_tokens}, a.switch_interval_ms),
        (f"on, switch {PYTHON_SWITCH_MS:g} ms", on, {}, PYTHON_SWITCH_MS),
        ("on, short chunks as command buffers", on, {"short_chunk_command_buffers": True}, a.switch_interval_ms),
    ]  # fmt: skip
    for label, cache_bytes, kwargs, switch_ms in variants:
        del engine  # its slot states make room; a new engine reuses the compiled programs
        gc.collect()
        engine = make_engine(cache_bytes, **kwargs)  # compiles only the slot copy, once
        system_prefilled = engine.cache_prefix(system) if cache_bytes else None
        sys.setswitchinterval(switch_ms / 1e3)
        try:
            row = prefix_row(engine, chats, monitor_s)
        finally:
            sys.setswitchinterval(a.switch_interval_ms / 1e3)
        stable = kwargs.get("stable_scratch", a.stable_scratch)
        if not cache_bytes:  # the uncached row the cached rows of the same build are set against
            offs[stable] = report.add("prefix", {"cache": label, **row})
            continue
        row.update(system_prefilled=system_prefilled, speedup=_ratio(offs[stable]["ttft_p50_s"], row["ttft_p50_s"]))
        report.add("prefix", {"cache": label, **row})
        if label in ("on", "on, stable scratch") and cache_bytes and not kwargs:  # the build's own on row
            targets["prefix_ttft_speedup"] = row["speedup"]
            report.set("targets", dict(targets))
            report.table("chunks", CHUNK_COLUMNS)
            for chunk in chunk_rows(engine, vocab_size, a.repeats, a.seed + 2):
                report.add("chunks", chunk)
    return engine


def chunk_rows(engine: Engine, vocab_size: int, repeats: int, seed: int) -> list[dict[str, Any]]:
    """The time of one prefill chunk in each of the engine's shapes: ``cache_prefix`` of a new random prompt that
    fills the shape, waited for (one chunk from zero states, in the caller's thread), median of ``repeats``; and,
    from a device trace of one more chunk (GPU only; None elsewhere), the summed time of its kernels, how many
    it launched and the fraction of the chunk's span the GPU was busy: a wall time well above the kernel time
    is time the GPU waited for the host. ``program_ms``: the chunk program alone (:func:`chunk_program_s`)."""
    rng = np.random.default_rng(seed)

    def one(size: int) -> float:
        prompt = rng.integers(0, vocab_size, size).tolist()
        start = time.perf_counter()
        engine.cache_prefix(prompt)
        jax.block_until_ready(engine.prefix_cache.get(prompt))
        return time.perf_counter() - start

    rows = []
    for size in engine.prefill_chunk_shapes:
        times = [one(size) for _ in range(repeats)]
        median = float(np.median(times))
        trace = device_trace(lambda size=size: one(size), units=1)
        rows.append(
            {
                "tokens": size,
                "ms": median * 1e3,
                "spread": (max(times) - min(times)) / median,
                "program_ms": chunk_program_s(engine, size, repeats) * 1e3,
                "kernel_ms": trace["kernel_us"] / 1e3 if trace else None,
                "kernels": trace.get("kernels"),
                "busy": trace.get("busy"),
            }
        )
    return rows


def chunk_program_s(engine: Engine, size: int, repeats: int) -> float:
    """The engine's prefill chunk program for one request of ``size`` tokens alone, on the engine's own buffers of
    that shape (the ones every such chunk runs in), without the copies in and out or the engine's host work:
    median of ``repeats`` calls, each waited for, seconds. (The engine's internals, read here for timing only.)"""
    times = []
    with engine._chunk_lock:
        work, tokens = engine._chunk_work.pop(1), engine._chunk_tokens.pop((1, size))
        try:
            for _ in range(repeats):
                start = time.perf_counter()
                work, tokens = engine._chunk_program(size)(
                    engine.config, engine.runtime, engine._layout, engine.params, work, tokens
                )
                jax.block_until_ready(work)
                times.append(time.perf_counter() - start)
        finally:
            engine._chunk_work[1], engine._chunk_tokens[(1, size)] = work, tokens
    return float(np.median(times))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark; returns the report's data (what ``--json`` writes). The interpreter's switch interval
    is ``--switch-interval-ms`` during the run and restored after it."""
    previous = sys.getswitchinterval()
    try:
        return _main(argv)
    finally:
        sys.setswitchinterval(previous)


def _main(argv: Sequence[str] | None) -> dict:
    started = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="xlstm_7b", help="model config (random weights)")
    p.add_argument("--tiny", action="store_true", help="xLSTMLMConfig.tiny() and small sizes (a CPU smoke test)")
    p.add_argument("--slots", type=int, default=128, help="the engine's num_slots and the static batch")
    p.add_argument("--requests", type=int, default=256, help="requests per rate (and of the static batches)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[64, 512], metavar=("LO", "HI"))
    p.add_argument("--output-len", type=int, nargs=2, default=[64, 256], metavar=("LO", "HI"))
    p.add_argument("--rates", type=float, nargs="+", default=[8.0, 32.0, 128.0, math.inf], help="requests/s")
    p.add_argument("--chunk-tokens", type=int, default=256, help="the engine's prefill_chunk_tokens")
    p.add_argument(
        "--prefill-rows", type=int, nargs="+", default=[4],
        help="the engine's max_prefill_rows: the first for every part; the rates part runs once per value",
    )  # fmt: skip
    p.add_argument("--system-tokens", type=int, default=2000, help="the shared system prompt's length")
    p.add_argument("--suffix-len", type=int, nargs=2, default=[16, 64], metavar=("LO", "HI"))
    p.add_argument("--prefix-requests", type=int, default=16)
    p.add_argument("--prefix-output", type=int, default=16, help="tokens generated per prefix-case request")
    p.add_argument("--prefix-cache-bytes", type=int, default=8 << 30)
    p.add_argument("--monitor-ms", type=float, default=10.0, help="how often the engine's counters are sampled")
    p.add_argument("--step-tokens", type=int, default=None, help="N of generate's step timing (default: its buffer)")
    p.add_argument("--engine-steps", type=int, default=32, help="engine decode steps per timed sample")
    p.add_argument(
        "--budget-s", type=float, default=450.0, help="rates rows must end (by estimate) this many s after the start"
    )
    p.add_argument(
        "--switch-interval-ms", type=float, default=SWITCH_INTERVAL_S * 1e3,
        help="sys.setswitchinterval for the run, as `xlstm-jax serve` sets it (the prefix part also runs Python's 5)",
    )  # fmt: skip
    p.add_argument(
        "--stable-scratch", action="store_true",
        help="every engine with Engine(stable_scratch=True); the prefix part runs its off and on rows only",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="the parts to run (default: all)")
    add_arguments(p, repeats=3)
    a = p.parse_args(argv)
    parts = set(a.parts)
    if "rates" in parts and not {"saturated", "generate", "static"} <= parts:
        p.error("--parts rates needs saturated, generate and static too (its estimate and ratios use them)")
    if a.stable_scratch and not stable_scratch_supported():
        p.error(f"--stable-scratch needs XLA's command buffer update mode SKIP_TEMP, not in jax {jax.__version__}")
    if a.tiny:
        defaults = p.parse_args([])
        for key, value in TINY.items():  # only what the command line left at its default
            if getattr(a, key) == getattr(defaults, key):
                setattr(a, key, value)
    for name in ("prompt_len", "output_len", "suffix_len"):
        _pair("--" + name.replace("_", "-"))(getattr(a, name))
    for name in (
        "slots", "requests", "chunk_tokens", "system_tokens", "prefix_requests", "prefix_output", "engine_steps",
    ):  # fmt: skip
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if min(a.prefill_rows) < 1:
        raise ValueError(f"--prefill-rows must be >= 1, got {a.prefill_rows}")
    if any(not rate > 0 for rate in a.rates):
        raise ValueError(f"--rates must be positive (or inf), got {a.rates}")
    if not a.budget_s > 0:
        raise ValueError(f"--budget-s must be > 0, got {a.budget_s}")
    if not a.switch_interval_ms > 0:
        raise ValueError(f"--switch-interval-ms must be > 0, got {a.switch_interval_ms}")
    sys.setswitchinterval(a.switch_interval_ms / 1e3)
    buffer = max(MIN_TOKEN_BUFFER, 1 << (a.output_len[1] - 1).bit_length())
    n_step = buffer if a.step_tokens is None else a.step_tokens
    if n_step < 4:
        raise ValueError(f"--step-tokens must be >= 4, got {n_step}")

    report = Report("serve", "benchmarks/serve.py", vars(a), a.json, argv)
    phases: dict[str, float] = {}
    clock = [time.perf_counter()]

    def phase(name: str) -> None:
        """Records the seconds since the last phase ended under ``name`` (and the run's elapsed seconds)."""
        now = time.perf_counter()
        phases[name] = now - clock[0]
        phases["elapsed"] = now - started
        clock[0] = now
        report.set("phases", dict(phases))

    def say(text: str) -> None:
        """Prints what comes next with the run's elapsed seconds (a stopped run's log shows where it was)."""
        print(f"# [{time.perf_counter() - started:.0f} s] {text}", flush=True)

    config = xLSTMLMConfig.tiny() if a.tiny else PRESETS[a.preset]()
    runtime = RuntimeConfig()
    report.set(
        "model", {"preset": "tiny" if a.tiny else a.preset, "params": config.num_params(), "config": repr(config)}
    )
    params = jax.block_until_ready(random_params(config, runtime, a.seed))
    requests = draw_requests(a.requests, a.prompt_len, a.output_len, config.vocab_size, a.seed)
    report.set("workload", {"prompt_len": a.prompt_len, "output_len": a.output_len, "distribution": "uniform"})
    targets: dict[str, Any] = {
        "saturated_of_step": None,
        "saturated_of_engine_step": None,
        "saturated_of_static": None,
        "prefix_ttft_speedup": None,
        "wanted": {"saturated_of_step": 0.85, "saturated_of_static": 2.0, "prefix_ttft_speedup": 5.0},
    }
    phase("params")

    # -- the engine: its decode step, the saturated row, the prefix rows --------------------------------
    monitor_s = a.monitor_ms / 1e3
    longest = max(a.prompt_len[1], a.system_tokens + a.suffix_len[1])
    queue = max(a.requests, a.slots)

    def make_engine(prefix_cache_bytes: int, **kwargs: Any) -> Engine:
        engine = Engine(
            config, params, num_slots=a.slots, runtime=runtime, max_prompt_tokens=longest,
            prefill_chunk_tokens=a.chunk_tokens, max_queue=queue, prefix_cache_bytes=prefix_cache_bytes,
            **{"max_prefill_rows": a.prefill_rows[0], "stable_scratch": a.stable_scratch, **kwargs},
        )  # fmt: skip
        engine.warmup()
        return engine

    say("the engine: compiling its programs (Engine.warmup)")
    engine = make_engine(0)
    phase("engine_warmup")
    engine_step_rate, sat = None, None
    if "step" in parts:
        report.table("step", STEP_COLUMNS)
        engine_rows = [report.add("step", row) for row in engine_step_rows(engine, a.engine_steps, a.repeats)]
        engine_step_rate = engine_rows[0]["tokens_per_s"]
        phase("engine_step")
    if "saturated" in parts:
        say(f"the saturated row: {a.slots} requests at once")
        sat = saturated_row(engine, requests[: a.slots], 2 * a.output_len[1], engine_step_rate, monitor_s)
        report.table("saturated", SATURATED_COLUMNS)
        report.add("saturated", sat)
        targets["saturated_of_engine_step"] = sat["of_engine_step"]
        report.set("targets", dict(targets))
        phase("saturated")
    if "prefix" in parts:
        say("the prefix rows")
        engine = prefix_part(engine, make_engine, config.vocab_size, a, monitor_s, report, targets)
        phase("prefix")
    del engine  # its slot states make room
    gc.collect()
    report.set("engine_compilations", Engine.compilations())

    # -- generate's decode step, then static batching with generate (the same compiled programs) ---------
    if not parts & {"generate", "static", "rates"}:
        return report.data
    batches = [requests[i : i + a.slots] for i in range(0, len(requests), a.slots)]

    def run_batch(batch, tokens):
        out = generate(
            config, params, [prompt for prompt, _ in batch], tokens, stop_tokens=(), pad_to_multiple_of=a.prompt_len[1],
            runtime=runtime,
        )  # fmt: skip
        return out.tokens, out.num_generated

    def token_buffer(tokens: int) -> int:
        return max(MIN_TOKEN_BUFFER, 1 << (tokens - 1).bit_length())

    full_rate = None if sat is None else sat["full_tokens_per_s"]
    compiled = set()
    if "generate" in parts:
        say("generate's decode step (its first call compiles generate)")
        step_batch = (batches[0] * math.ceil(a.slots / len(batches[0])))[: a.slots]  # exactly `slots` rows
        per_token, facts = decode_per_token(lambda n: run_batch(step_batch, n), n_step, a.repeats, False)
        if per_token is None:
            raise RuntimeError(noise_note("generate's decode step", facts, "--step-tokens"))
        step_rate = a.slots / per_token
        report.table("step", STEP_COLUMNS)  # the table again: its last row
        report.add(
            "step",
            {"program": "generate", "batch": a.slots, "ms_per_step": per_token * 1e3, "tokens_per_s": step_rate,
             **facts},
        )  # fmt: skip
        targets["saturated_of_step"] = _ratio(full_rate, step_rate)
        report.set("targets", dict(targets))
        compiled = {(a.slots, token_buffer(n)) for n in (n_step // 2 + 1, n_step)}  # by the step's timing
        phase("generate_step")
    if "static" not in parts:
        return report.data

    say("static batching")
    report.table("static", STATIC_COLUMNS)
    shapes = {}  # one batch of each (rows, token buffer) not compiled yet: compiled by an untimed call
    for batch in batches:
        most = max(o for _, o in batch)
        if (len(batch), token_buffer(most)) not in compiled:
            shapes.setdefault((len(batch), token_buffer(most)), (batch, most))
    first_calls = {}
    for shape, (batch, most) in shapes.items():
        start = time.perf_counter()
        jax.block_until_ready(run_batch(batch, most))
        first_calls[str(shape)] = time.perf_counter() - start
    static_s = 0.0
    for batch in batches:
        start = time.perf_counter()
        tokens, num = jax.block_until_ready(run_batch(batch, max(o for _, o in batch)))
        static_s += time.perf_counter() - start
        if not np.all(np.asarray(num) == tokens.shape[1]):
            raise RuntimeError(f"generate stopped early: {np.asarray(num)} tokens of {tokens.shape[1]}")
    static_tokens = sum(o for _, o in requests)
    static_rate = static_tokens / static_s
    report.add(
        "static",
        {
            "batches": len(batches),
            "requests": len(requests),
            "output_tokens": static_tokens,
            "seconds": static_s,
            "tokens_per_s": static_rate,
            "first_calls_s": first_calls,
        },
    )
    targets["saturated_of_static"] = _ratio(full_rate, static_rate)
    report.set("targets", dict(targets))
    report.set(
        "generate_compilations",
        {"prefill": generation._prefill._cache_size(), "decode_loop": generation._decode_loop._cache_size()},
    )
    phase("static")
    if "rates" not in parts:
        return report.data

    # -- the engine under Poisson arrivals, while --budget-s lasts ----------------------------------------
    report.table("rates", RATE_COLUMNS)
    deadline = started + a.budget_s
    tokens = sum(o for _, o in requests)
    for rows in a.prefill_rows:
        engine = None
        for n, rate in enumerate(a.rates):
            label = "inf" if math.isinf(rate) else rate
            offsets = poisson_offsets(len(requests), rate, a.seed + n)  # the same arrivals for every rows value
            estimate = float(offsets[-1]) + tokens / sat["tokens_per_s"]
            left = deadline - time.perf_counter()
            if estimate > left:
                report.note(
                    f"rates {label}, prefill rows {rows}: skipped: its row would take about {estimate:.0f} s "
                    f"(arrivals over {offsets[-1]:.0f} s, {tokens} tokens at the saturated row's rate), "
                    f"{left:.0f} s of --budget-s left"
                )
                continue
            say(f"rate {label}, prefill rows {rows}: about {estimate:.0f} s")
            if engine is None:
                gc.collect()  # the last engine's slot states make room
                engine = make_engine(0, max_prefill_rows=rows)
            with engine:
                records, samples = asyncio.run(_drive(engine, requests, offsets, monitor_s))
            row = {"rate": label, "prefill_rows": rows, **summarize(records, samples, a.slots)}
            row.update(of_step=row["tokens_per_s"] / step_rate, of_static=row["tokens_per_s"] / static_rate)
            report.add("rates", row)
    report.set("engine_compilations", Engine.compilations())
    phase("rates")
    return report.data


if __name__ == "__main__":
    main()
