"""Prefill and decode speed of the xLSTM-7B preset with random bfloat16 weights (no download).

Run from the repository root on a GPU::

    PYTHONPATH=. python3 benchmarks/generate.py [--out DIR]

Measures in one run:

- the two ceilings of the device: a large bf16 matrix product (TFLOP/s) and a device-to-device copy
  (TB/s, bytes read + written);
- prefill tokens/s for prompts of 128, 1024 and 8192 tokens at batch 1 (the chunkwise prefill backend,
  logits of the last position only), with the model FLOPs over the time as a fraction of the measured
  bf16 matrix ceiling;
- decode ms/token at batch 1 and 16 with the XLA step (``recurrent``) and the Pallas step
  (``recurrent_pallas``, if registered), timed over the jitted ``lax.while_loop`` of
  :func:`xlstm_jax.generation.generate` (greedy, no stop token), against the floor: every weight byte
  read once per token at the measured copy bandwidth (the embedding contributes one row only), and
  that floor plus reading and writing the float32 states once.

Weights are drawn on the device inside one jitted function (normal, scaled by 1/sqrt(fan-in); norm
weights 1), so nothing of 14 GB crosses the host. Each case runs after a warm-up (compilation) and
reports the median of repeats. ``--tiny`` runs the same code on a tiny config (for a CPU smoke test).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.generation import SamplingConfig, _decode_loop, _prefill
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import BACKENDS
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.model import ModelStates, xLSTMLMModel


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` (which must block until its device work is done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_ceilings(small: bool) -> dict:
    """A bf16 matrix product (TFLOP/s) and a device copy (TB/s, read + written), on random data."""
    n = 512 if small else 8192
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
    reps = 10

    @jax.jit
    def matmuls(a, b):
        # A chain x <- (x b) / sqrt(n): each product needs the last, so none can be hoisted out of the loop.
        def body(_, x):
            return (jnp.dot(x, b, preferred_element_type=jnp.float32) / math.sqrt(n)).astype(jnp.bfloat16)

        return jax.lax.fori_loop(0, reps, body, a)

    matmuls(a, b).block_until_ready()
    t = median_seconds(lambda: matmuls(a, b).block_until_ready(), 5)
    tflops = 2 * n**3 * reps / t / 1e12
    words = (1 << 20) if small else (1 << 30)  # 4 GiB of float32
    x = jax.random.normal(jax.random.key(3), (words,), jnp.float32)
    copy = jax.jit(lambda x: x * 1.0001)
    copy(x).block_until_ready()
    t = median_seconds(lambda: copy(x).block_until_ready(), 10)
    return {"bf16_matmul_tflops": tflops, "copy_tbps": 2 * x.nbytes / t / 1e12}


def random_params(config: xLSTMLMConfig, seed: int = 0):
    """Random weights on the device, in one jitted function (no host transfer)."""
    model = xLSTMLMModel(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 1), jnp.int32))["params"])
    leaves, treedef = jax.tree_util.tree_flatten(shapes)

    @jax.jit
    def make(key):
        keys = jax.random.split(key, len(leaves))
        out = []
        for k, leaf in zip(keys, leaves, strict=True):
            stacked = config.scan_blocks and len(leaf.shape) >= 2 and leaf.shape[0] == config.num_blocks
            core = leaf.shape[1:] if stacked else leaf.shape
            if len(core) >= 2:  # kernels (in, out) and the embedding (V, D)
                scale = 1.0 if core[0] == config.vocab_size else 1.0 / math.sqrt(core[0])
                out.append((jax.random.normal(k, leaf.shape, jnp.float32) * scale).astype(leaf.dtype))
            elif len(core) == 1 and core[0] == config.num_heads:  # gate biases
                out.append(jax.random.normal(k, leaf.shape, leaf.dtype))
            else:  # norm weights
                out.append(jnp.ones(leaf.shape, leaf.dtype))
        return jax.tree_util.tree_unflatten(treedef, out)

    return make(jax.random.key(seed))


def matmul_params(config: xLSTMLMConfig) -> int:
    """Weights that take part in a matrix product for every token (all but the embedding)."""
    return config.num_params() - config.vocab_size * config.embedding_dim


def prefill_flops(config: xLSTMLMConfig, S: int, chunk: int) -> float:
    """Model FLOPs of a prefill of S tokens (batch 1, LM head on the last token only).

    Projections and FFN: 2 per weight per token. The chunkwise cell per layer and head: the two
    intra-chunk products q kᵀ and (gated scores) v over the causal half of an L x L block,
    ``S L (DHQK + DHV)``, plus the inter-chunk read-out ``q C`` and the state update ``kᵀ v``,
    ``4 S DHQK DHV``.
    """
    D, V = config.embedding_dim, config.vocab_size
    block_weights = matmul_params(config) - V * D - D
    cell = (
        config.num_blocks
        * config.num_heads
        * S
        * (chunk * (config.qk_head_dim + config.v_head_dim) + 4 * config.qk_head_dim * config.v_head_dim)
    )
    return 2.0 * block_weights * S + cell + 2.0 * V * D


def state_bytes(config: xLSTMLMConfig, B: int) -> int:
    dqk, dv = config.qk_head_dim, config.v_head_dim
    return 4 * config.num_blocks * B * config.num_heads * (dqk * dv + dqk + 1)


def bench_prefill(config, params, S: int, repeats: int) -> float:
    ids = jax.random.randint(jax.random.key(S), (1, S), 0, config.vocab_size, jnp.int32)

    def run():
        logits, states = _prefill(config, params, ids, None)
        jax.block_until_ready((logits, states))

    run()
    return median_seconds(run, repeats)


def bench_decode(config, params, B: int, tokens: int, repeats: int) -> float:
    """Seconds per token of the decode loop after a 16-token prompt (states copied before each run)."""
    ids = jax.random.randint(jax.random.key(B), (B, 16), 0, config.vocab_size, jnp.int32)
    logits, states = _prefill(config, params, ids, None)
    stop = jnp.zeros((0,), jnp.int32)
    loop = functools.partial(_decode_loop, config, SamplingConfig(), tokens, 0, False, params)
    times = []
    for rep in range(repeats + 1):
        fresh = jax.block_until_ready(ModelStates(*(jnp.copy(x) for x in states)))
        start = time.perf_counter()
        out = loop(fresh, logits, jax.random.key(rep), stop)
        jax.block_until_ready(out.tokens)
        if int(out.t) != tokens:
            raise RuntimeError(f"decode loop ran {int(out.t)} steps, expected {tokens}")
        if rep:  # the first run compiles
            times.append(time.perf_counter() - start)
    return float(np.median(times)) / tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for results.json")
    parser.add_argument("--tiny", action="store_true", help="smoke test on a tiny config (CPU)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip remaining cases after this")
    parser.add_argument("--prefill", default="128,1024,8192", help="prompt lengths ('' to skip)")
    parser.add_argument(
        "--decode-blocks",
        choices=("scan", "unrolled", "both"),
        default="both",
        help="decode with nn.scan over the blocks, unrolled blocks, or both",
    )
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    results: dict = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}

    def save():
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=2))

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.budget_s

    results["ceilings"] = measure_ceilings(args.tiny)
    peak, bw = results["ceilings"]["bf16_matmul_tflops"], results["ceilings"]["copy_tbps"]
    print(f"# {results['device']}, jax {jax.__version__}: bf16 matmul {peak:.0f} TFLOP/s, copy {bw:.2f} TB/s")
    save()

    prefill_backend = "chunkwise" if "chunkwise" in BACKENDS else "parallel_stabilized"
    chunk = getattr(BACKENDS[prefill_backend].config_class(), "chunk_size", 64)  # for the FLOP count
    if args.tiny:
        config = xLSTMLMConfig.tiny(dtype="bfloat16", param_dtype="bfloat16", prefill_backend=prefill_backend)
        lengths, batches, tokens, reps = tuple(int(x) for x in args.prefill.split(",") if x), (1, 4), 8, 2
    else:
        config = xLSTMLMConfig.xlstm_7b(prefill_backend=prefill_backend)
        lengths, batches, tokens, reps = tuple(int(x) for x in args.prefill.split(",") if x), (1, 16), 64, 3
    t0 = time.perf_counter()
    # Always draw the stacked (nn.scan) layout and slice it for unrolled cases: drawing the ~480 per-layer
    # leaves in one jitted function took over 170 s to compile on the H200 (2026-11-29).
    params = jax.block_until_ready(random_params(config))
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    results["params"] = {"count": config.num_params(), "bytes": weight_bytes, "init_s": time.perf_counter() - t0}
    print(f"# {config.num_params() / 1e9:.2f}e9 parameters, {weight_bytes / 1e9:.2f} GB, prefill: {prefill_backend}")
    save()

    print(f"{'prefill S':>10s} {'ms':>9s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'of peak':>8s}")
    results["prefill"] = []
    for S in lengths:
        if over_budget():
            print(f"{S:10d} skipped (time budget)")
            continue
        try:
            t = bench_prefill(config, params, S, reps)
        except Exception as e:  # report and go on: one failing case must not lose the others
            print(f"{S:10d} FAILED: {type(e).__name__}: {str(e)[:200]}")
            results["prefill"].append({"S": S, "error": repr(e)[:500]})
            continue
        flops = prefill_flops(config, S, chunk)
        row = {"S": S, "ms": t * 1e3, "tokens_per_s": S / t, "tflops": flops / t / 1e12, "flops": flops}
        row["fraction_of_peak"] = row["tflops"] / peak
        results["prefill"].append(row)
        print(f"{S:10d} {t * 1e3:9.2f} {S / t:10.0f} {row['tflops']:8.1f} {row['fraction_of_peak']:8.1%}")
        save()

    steps = ["recurrent"] + (["recurrent_pallas"] if "recurrent_pallas" in BACKENDS else [])
    read_bytes = matmul_params(config) * jnp.dtype(config.param_dtype).itemsize + config.embedding_dim * 2
    print(f"{'decode':>24s} {'B':>3s} {'ms/token':>9s} {'floor ms':>9s} {'x floor':>8s} {'+states':>8s} {'x':>6s}")
    results["decode"] = []
    for step in steps if config.scan_blocks and args.decode_blocks != "unrolled" else ():
        for B in batches:
            if over_budget():
                print(f"{step:>24s} {B:3d} skipped (time budget)")
                continue
            cfg = config.replace(step_backend=step)
            floor = read_bytes / (bw * 1e12)
            floor_states = (read_bytes + 2 * state_bytes(config, B)) / (bw * 1e12)
            try:
                t = bench_decode(cfg, params, B, tokens, reps)
            except Exception as e:
                print(f"{step:>24s} {B:3d} FAILED: {type(e).__name__}: {str(e)[:200]}")
                results["decode"].append({"step": step, "B": B, "error": repr(e)[:500]})
                continue
            row = {
                "step": step,
                "B": B,
                "ms_per_token": t * 1e3,
                "floor_ms": floor * 1e3,
                "floor_with_states_ms": floor_states * 1e3,
            }
            results["decode"].append(row)
            print(
                f"{step:>24s} {B:3d} {t * 1e3:9.3f} {floor * 1e3:9.3f} {t / floor:8.2f} "
                f"{floor_states * 1e3:8.3f} {t / floor_states:6.2f}"
            )
            save()
    # The XLA step with the blocks unrolled (no nn.scan): per-layer weights are separate buffers rather
    # than slices of stacked ones inside a loop.
    unrolled = config.replace(scan_blocks=False)
    if config.scan_blocks and args.decode_blocks != "scan":
        params_u = {k: v for k, v in params.items() if k != "blocks"}
        params_u.update(
            {
                f"blocks_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], params["blocks"])
                for i in range(config.num_blocks)
            }
        )
        del params
    else:
        params_u = params
    cases = [(step, B) for step in steps for B in batches] if args.decode_blocks != "scan" else []
    for step, B in cases:
        name = f"{step} unrolled"
        if over_budget():
            print(f"{name:>24s} {B:3d} skipped (time budget)")
            continue
        floor = read_bytes / (bw * 1e12)
        floor_states = (read_bytes + 2 * state_bytes(config, B)) / (bw * 1e12)
        try:
            t = bench_decode(unrolled.replace(step_backend=step), params_u, B, tokens, reps)
        except Exception as e:
            print(f"{name:>24s} {B:3d} FAILED: {type(e).__name__}: {str(e)[:200]}")
            results["decode"].append({"step": name, "B": B, "error": repr(e)[:500]})
            continue
        row = {
            "step": name,
            "B": B,
            "ms_per_token": t * 1e3,
            "floor_ms": floor * 1e3,
            "floor_with_states_ms": floor_states * 1e3,
        }
        results["decode"].append(row)
        print(
            f"{name:>24s} {B:3d} {t * 1e3:9.3f} {floor * 1e3:9.3f} {t / floor:8.2f} "
            f"{floor_states * 1e3:8.3f} {t / floor_states:6.2f}"
        )
        save()
    results["total_s"] = time.perf_counter() - t_start
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
