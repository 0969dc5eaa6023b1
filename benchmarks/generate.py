"""Prefill and decode speed of the xLSTM language model with random weights (no download).

Reproduces BENCHMARKS.md's table of the language model (the xLSTM-7B preset, bfloat16, on an H200)::

    PYTHONPATH=. python3 benchmarks/generate.py --json generate.json

and on a CPU with the tiny preset (a smoke test, seconds): ``PYTHONPATH=. python benchmarks/generate.py
--preset tiny --tokens 4 --prefill 16 --cases auto:unrolled:auto:1 auto:scan:auto:2``.

Everything runs through the public API: :func:`xlstm_jax.generation.generate` (and, with ``--stream``,
:func:`xlstm_jax.generation.stream`) for decoding, :func:`xlstm_jax.generation.prefill` for prompts, with a
:class:`~xlstm_jax.models.xlstm_parallel.runtime.RuntimeConfig` per case, timed by ``benchmarks/harness.py``.

Decode: each case ``STEP:BLOCKS:FUSION:B`` of ``--cases`` sets ``RuntimeConfig(step_backend=STEP,
scan_blocks=BLOCKS == "scan", decode_fusion=FUSION)`` (STEP ``auto``, ``recurrent`` or ``recurrent_pallas``;
BLOCKS ``unrolled`` or ``scan``; FUSION ``auto``, ``on`` or ``off``) and a batch of B random 16-token
prompts, greedy, no stop token. ``generate`` is timed for N/2 + 1 and for N new tokens (N = ``--tokens``;
median of ``--repeats`` calls each, after a first call that compiles; both lengths share one compiled loop
when N is a power of two); the time per token is the difference over the N/2 - 1 extra tokens, so the
prompt's prefill and the fixed per-call costs cancel. The first call's time is reported as ``first_call_s``
(compilation included). Floor per token: every weight byte read once, at the copy bandwidth
(the embedding contributes one row, unless it is tied to the LM head; xLSTM-7B: 6.87e9 parameters, 13.32
GB read per token in bf16), and that plus the float32 states read and written once,
``2·4·L·B·NH·(DHQK·DHV + DHQK + 1)`` bytes (xLSTM-7B: 269 MB per sequence). At 4.27 TB/s the weights alone
take 3.12 ms per token.

Prefill: the prompt lengths of ``--prefill`` at batch 1 (blocks under ``nn.scan``, the chunkwise form with
chunk size ``--chunk-size``, logits of the last position only). Floor: the model FLOPs at the bf16 matrix
rate (2 per weight per token for the projections and FFN; per layer and head the chunkwise cell's
``S·L·(DHQK + DHV) + 4·S·DHQK·DHV``; the LM head on the last token, ``2·V·D``), or the weights read once at
the copy bandwidth if longer.

``--profile I ...`` traces decode cases I (0-based) with ``jax.profiler`` (one more N-token ``generate``
call; per token, the prompt's prefill included) and prints their kernels per token and the costliest.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import (
    Column,
    Floor,
    Report,
    add_arguments,
    ceilings_from_arguments,
    hardware_floor,
    time_jitted,
)
from xlstm_jax.generation import generate, prefill, stream
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.model import xLSTMLMModel
from xlstm_jax.models.xlstm_parallel.runtime import STEP_BACKENDS, DecodeFusion, KernelMode, RuntimeConfig

PROMPT_LENGTH = 16
DEFAULT_CASES = (  # the default runtime at four batch sizes; at B=1 and 16 the XLA step and no decode fusion
    "auto:unrolled:auto:1",
    "auto:unrolled:auto:16",
    "auto:unrolled:auto:32",
    "auto:unrolled:auto:128",
    "recurrent:unrolled:auto:1",
    "auto:unrolled:off:1",
    "recurrent:unrolled:auto:16",
    "auto:unrolled:off:16",
)
PRESETS = {
    "xlstm_7b": lambda: xLSTMLMConfig.xlstm_7b(),
    "tiny": lambda: xLSTMLMConfig.tiny(dtype="bfloat16", param_dtype="bfloat16"),
}


def case(text: str) -> tuple[str, str, str, int]:
    """``"STEP:BLOCKS:FUSION:B"`` checked: a step backend, ``unrolled`` or ``scan``, a fusion mode, a batch."""
    parts = text.split(":")
    fusions = [m.value for m in DecodeFusion]
    ok = len(parts) == 4 and parts[0] in STEP_BACKENDS and parts[1] in ("unrolled", "scan") and parts[2] in fusions
    if not ok or not parts[3].isdigit() or int(parts[3]) < 1:
        raise argparse.ArgumentTypeError(
            f"bad case {text!r}: expected STEP:BLOCKS:FUSION:B with STEP in {list(STEP_BACKENDS)}, BLOCKS unrolled "
            f"or scan, FUSION in {fusions}, B a positive integer"
        )
    try:  # combinations the runtime config refuses (fusion 'on' with scanned blocks)
        RuntimeConfig(step_backend=parts[0], scan_blocks=parts[1] == "scan", decode_fusion=parts[2])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad case {text!r}: {exc}") from None
    return parts[0], parts[1], parts[2], int(parts[3])


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw(key: jax.Array, shape: tuple[int, ...], dtype: str, scale: float) -> jax.Array:
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def random_params(config: xLSTMLMConfig, runtime: RuntimeConfig, seed: int = 0) -> dict:
    """Random weights on the device, laid out for ``runtime.scan_blocks``.

    Matrices (in, out) are normal scaled by 1/sqrt(in), the embedding (V, D) and the gate biases normal, the
    norm weights 1. Each leaf is drawn by one small jitted function per distinct shape (fast to compile).
    """
    model = xLSTMLMModel(config, runtime)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 1), jnp.int32))["params"])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for key, (path, leaf) in zip(keys, leaves, strict=True):
        name = jax.tree_util.keystr(path)
        stacked = runtime.scan_blocks and "['blocks']" in name  # a leading axis of size L
        core = leaf.shape[1:] if stacked else leaf.shape
        if len(core) >= 2:
            scale = 1.0 if core[0] == config.vocab_size else 1.0 / math.sqrt(core[0])
        elif "bias" in name:
            scale = 1.0
        else:  # norm weights
            out.append(jnp.ones(leaf.shape, leaf.dtype))
            continue
        out.append(_draw(key, tuple(leaf.shape), jnp.dtype(leaf.dtype).name, scale))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), out)


def weight_bytes_per_token(config: xLSTMLMConfig) -> int:
    """Weight bytes a decode step must read: all but the embedding, of which one row (all of it when tied)."""
    V, D = config.vocab_size, config.embedding_dim
    weights = config.num_params() if config.tie_word_embeddings else config.num_params() - V * D + D
    return weights * config.jnp_param_dtype.itemsize


def state_bytes(config: xLSTMLMConfig, B: int) -> int:
    """Bytes of the mLSTM states (c, n, m) of every block for a batch of B."""
    dqk, dv = config.qk_head_dim, config.v_head_dim
    per_head = dqk * dv + dqk + 1
    return config.jnp_state_dtype.itemsize * config.num_blocks * B * config.num_heads * per_head


def prefill_flops(config: xLSTMLMConfig, S: int, chunk: int) -> float:
    """Model FLOPs of a prefill of S tokens at batch 1 with the LM head on the last token only.

    Projections and FFN: 2 per weight per token. The chunkwise cell per layer and head: the causal halves of
    q·kᵀ and (gated scores)·v on L x L blocks, ``S·L·(DHQK + DHV)``, plus the read-out q·C and the chunk
    summaries kᵀv, ``4·S·DHQK·DHV``. The LM head: ``2·V·D``.
    """
    V, D = config.vocab_size, config.embedding_dim
    head = 0 if config.tie_word_embeddings else V * D
    block_weights = config.num_params() - V * D - D - head
    dqk, dv = config.qk_head_dim, config.v_head_dim
    cell = config.num_blocks * config.num_heads * S * (min(chunk, S) * (dqk + dv) + 4 * dqk * dv)
    return 2.0 * block_weights * S + cell + 2.0 * V * D


def decode_per_token(
    run: Callable[[int], Any], tokens: int, repeats: int, trace: bool, attempts: int = 3
) -> tuple[float | None, dict[str, Any]]:
    """Seconds per token from ``run(n)`` (decodes n tokens and blocks) at N/2 + 1 and N tokens, and the timings.

    Both lengths round up to the same power-of-two token buffer of ``generate`` when N is a power of two,
    so one compilation serves both. The per-token time is the difference of the two medians over the
    difference in tokens. On a loaded host (a CI runner) noise can swamp that difference; when it comes out
    zero or negative both lengths are timed again, at most ``attempts`` times in all. ``facts["attempts"]``
    counts them and ``facts["difference_s"]`` holds the last difference per token.

    Returns:
        ``(seconds per token, facts)``; None for the time where every attempt's difference was zero or negative
        (noise, not a time: :func:`noise_note` words it for the report).
    """
    lengths = (tokens // 2 + 1, tokens)
    done = 0
    while True:
        short, long = (time_jitted(lambda n=n: run(n), repeats=repeats, trace=trace and n == tokens) for n in lengths)
        per_token = (long.median_s - short.median_s) / (lengths[1] - lengths[0])
        done += 1
        if per_token > 0 or done >= attempts:
            break
    facts = {
        "tokens": list(lengths),
        "attempts": done,
        "difference_s": per_token,
        "first_call_s": short.warmup_s,
        "short_median_s": short.median_s,
        "short_spread": short.spread,
        "long_median_s": long.median_s,
        "long_spread": long.spread,
        **{k: v for k, v in long.as_row().items() if k.startswith("trace_")},
    }
    return (per_token if per_token > 0 else None), facts


def noise_note(label: str, facts: dict[str, Any], tokens_flag: str = "--tokens") -> str:
    """The report's note for a case whose time per token :func:`decode_per_token` could not resolve;
    ``tokens_flag`` is the script's option that sets N."""
    return (
        f"{label}: N={facts['tokens'][1]} tokens took no longer than N/2+1 in {facts['attempts']} attempts "
        f"(difference {facts['difference_s'] * 1e3:.4f} ms a token): noise, no time given; raise {tokens_flag} or "
        "--repeats"
    )


DECODE_COLUMNS = [
    Column("case", "case", width=28),
    Column("ms/token", "ms_per_token", ".3f"),
    Column("floor ms", "floor_ms", ".3f"),
    Column("floor/t", "floor_fraction", ".3f"),
    Column("+states/t", "floor_with_states_fraction", ".3f"),
    Column("N/2+1 spread", "short_spread", ".2f"),
    Column("N spread", "long_spread", ".2f"),
    Column("first call s", "first_call_s", ".1f"),
]
PREFILL_COLUMNS = [
    Column("S", "S", width=6),
    Column("ms", "median_s", ".2f", 1e3),
    Column("spread", "spread", ".2f"),
    Column("first call s", "warmup_s", ".1f"),
    Column("tokens/s", "tokens_per_s", ".0f"),
    Column("TFLOP/s", "flops_per_s", ".1f", 1e-12),
    Column("floor/t", "floor_fraction", ".3f"),
]


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark; returns the report's data (what ``--json`` writes)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="xlstm_7b", help="model config (random weights)")
    p.add_argument("--cases", type=case, nargs="*", default=[case(c) for c in DEFAULT_CASES])
    p.add_argument("--tokens", type=int, default=64, help="N: generate is timed at N/2 + 1 and N new tokens")
    p.add_argument("--stream", action="store_true", help="also time xlstm_jax.generation.stream per case")
    p.add_argument("--prefill", type=int, nargs="*", default=[128, 1024, 8192], help="prompt lengths")
    p.add_argument("--chunk-size", type=int, default=256, help="chunk size of the chunkwise prefill")
    p.add_argument("--kernel-mode", choices=[m.value for m in KernelMode], default="auto")
    p.add_argument("--profile", type=int, nargs="*", default=[], help="trace decode cases I ... (0-based)")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="skip the cases left after this")
    add_arguments(p, repeats=3, ceilings="measured")
    a = p.parse_args(argv)
    if a.tokens < 2:
        p.error(f"--tokens must be >= 2, got {a.tokens}")
    deadline = time.time() + a.budget_s
    report = Report("generate", "benchmarks/generate.py", vars(a), a.json, argv)
    ceilings = ceilings_from_arguments(a, report)
    config = PRESETS[a.preset]()
    base = RuntimeConfig(prefill_backend_kwargs=(("chunk_size", a.chunk_size),), kernel_mode=a.kernel_mode)
    report.set("model", {"preset": a.preset, "params": config.num_params(), "config": repr(config)})

    params: dict[bool, dict] = {}

    def params_for(scan: bool) -> dict:  # one layout on the device at a time
        if scan not in params:
            params.clear()
            params[scan] = jax.block_until_ready(random_params(config, base.replace(scan_blocks=scan)))
        return params[scan]

    report.table("decode", DECODE_COLUMNS)
    weights = weight_bytes_per_token(config)
    for n, (step, blocks, fusion, B) in enumerate(a.cases):
        label = f"{step}:{blocks}:{fusion}:{B}"
        if time.time() > deadline:
            report.note(f"decode {label}: skipped (--budget-s spent)")
            continue
        runtime = base.replace(step_backend=step, scan_blocks=blocks == "scan", decode_fusion=fusion)
        floor = hardware_floor(bytes_moved=weights, bandwidth=ceilings.copy_bytes_per_s)
        with_states = hardware_floor(
            bytes_moved=weights + 2 * state_bytes(config, B), bandwidth=ceilings.copy_bytes_per_s
        )
        ids = np.asarray(jax.random.randint(jax.random.key(B), (B, PROMPT_LENGTH), 0, config.vocab_size))
        loops = {"generate": None, "stream": None} if a.stream else {"generate": None}
        try:
            weights_tree = params_for(blocks == "scan")

            def run_generate(tokens, runtime=runtime, ids=ids, weights_tree=weights_tree):
                out = generate(config, weights_tree, ids, tokens, stop_tokens=(), runtime=runtime)
                return out.tokens, out.num_generated

            def run_stream(tokens, runtime=runtime, ids=ids, weights_tree=weights_tree):
                return list(stream(config, weights_tree, ids, tokens, stop_tokens=(), runtime=runtime))

            loops["generate"] = decode_per_token(run_generate, a.tokens, a.repeats, n in a.profile)
            tokens, num = run_generate(a.tokens)
            if not (np.all(np.asarray(num) == a.tokens) and tokens.shape == (B, a.tokens)):
                raise RuntimeError(f"generate gave {np.asarray(num)} tokens and shape {tokens.shape}, not {a.tokens}")
            if a.stream:
                loops["stream"] = decode_per_token(run_stream, a.tokens, a.repeats, False)
        except Exception as exc:  # one failing case must not lose the others
            report.note(f"decode {label}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
            continue
        for loop, (per_token, facts) in loops.items():
            row = {"case": label + ("" if loop == "generate" else " stream"), "loop": loop, "B": B}
            resolved = per_token is not None
            if not resolved:
                report.note(noise_note(f"decode {row['case']}", facts))
            row.update(step=step, blocks=blocks, fusion=fusion, **facts)
            row.update(
                ms_per_token=per_token * 1e3 if resolved else None,
                floor_ms=floor.seconds * 1e3,
                floor_with_states_ms=with_states.seconds * 1e3,
                floor_fraction=floor.fraction(per_token) if resolved else None,
                floor_with_states_fraction=with_states.fraction(per_token) if resolved else None,
                weight_bytes=weights,
                state_bytes=state_bytes(config, B),
            )
            report.add("decode", row)
            if row.get("trace_kernels") is not None:
                print(
                    f"# profile: {row['trace_kernels']:.0f} kernels/token, {row['trace_kernel_us']:.1f} us of kernels "
                    f"in a span of {row['trace_span_us']:.1f} us/token (busy {row['trace_busy']:.0%}); costliest:"
                )
                for us, launches, kernel in row["trace_top"]:
                    print(f"#   {us:8.1f} us/token  x{launches:5.1f}  {kernel[:100]}")

    report.table("prefill", PREFILL_COLUMNS)
    runtime = base.replace(scan_blocks=True)
    for S in a.prefill:
        if time.time() > deadline:
            report.note(f"prefill S={S}: skipped (--budget-s spent)")
            continue
        try:
            weights_tree = params_for(True)
            ids = jax.random.randint(jax.random.key(S), (1, S), 0, config.vocab_size, jnp.int32)
            run = lambda ids=ids, w=weights_tree: prefill(config, w, ids, runtime=runtime)
            timing = time_jitted(run, repeats=a.repeats)
        except Exception as exc:
            report.note(f"prefill S={S}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
            continue
        flops = prefill_flops(config, S, a.chunk_size)
        floor: Floor = hardware_floor(
            bytes_moved=config.num_params() * config.jnp_param_dtype.itemsize,
            flops=flops,
            bandwidth=ceilings.copy_bytes_per_s,
            flop_rate=ceilings.matmul_flops_per_s,
        )
        row = {"S": S, **timing.as_row(), "flops": flops, "floor_s": floor.seconds, "floor_bound": floor.bound}
        row.update(
            tokens_per_s=S / timing.median_s,
            flops_per_s=flops / timing.median_s,
            floor_fraction=floor.fraction(timing.median_s),
        )
        report.add("prefill", row)
    return report.data


if __name__ == "__main__":
    main()
