"""Prefill and decode speed of the xLSTM-7B preset with random bfloat16 weights (no download).

Run from the repository root on a GPU::

    PYTHONPATH=. python3 benchmarks/generate.py [--out DIR] [--cases ...] [--profile N,...] [--hlo N,...]
    PYTHONPATH=. python benchmarks/generate.py --smoke          # tiny config, CPU, seconds

Measures in one run (one process, so that the ratios between variants are fair):

- the two ceilings of the device: a large bf16 matrix product (TFLOP/s) and a device-to-device copy
  (TB/s, bytes read + written);
- decode ms/token for each case of ``--cases``, ``STEP:BLOCKS:GRAPHS:B`` with STEP a decode step name
  (``recurrent``: the XLA step; ``recurrent_pallas``: the Pallas kernel; a ``+fused`` or ``+unfused`` suffix
  sets ``decode_fused`` True or False, none leaves the config's default: see ``xLSTMLMConfig``), BLOCKS
  ``unrolled`` or ``scan`` (``nn.scan`` over the blocks), GRAPHS a name of ``XLA_OPTIONS`` (XLA settings such
  as command buffers, i.e. CUDA graphs, passed as compiler options of that one compilation) and B the batch.
  Each case is timed over the jitted ``lax.while_loop`` of :func:`xlstm_jax.generation.generate` (greedy, no
  stop token, after a 16-token prompt), against the floor: every weight byte read once per token at the measured copy
  bandwidth (the embedding contributes one row only), and that floor plus reading and writing the float32
  states once. For each case the compiled program is also inspected: its kernels (fusions and custom
  calls) and its largest non-matrix-product kernels (a copy of a weight there would be an extra pass over
  it per token). Command buffers are formed after the HLO, so they do not show there; ``--profile`` does
  not show them either (XLA turns them off while profiling);
- prefill tokens/s for the prompt lengths of ``--prefill`` at batch 1 (blocks under ``nn.scan``, the
  chunkwise backend, logits of the last position only), with the model FLOPs over the time as a fraction
  of the measured bf16 matrix ceiling;
- with ``--profile N[,N...]``: a ``jax.profiler`` trace of decode cases N (0-based), summarised on the spot
  (kernels per token, their summed time against the wall time, the costliest kernels); with ``--hlo``
  the optimised HLO of the listed cases is written next to ``results.json``.

Weights are drawn on the device by one jitted function in the stacked (``nn.scan``) layout (a dozen
leaves: fast to compile) and sliced for unrolled blocks. Each case runs after a warm-up (compilation) and
reports the median of repeats; cases are skipped once ``--budget-s`` is spent. Results go to stdout and,
with ``--out``, to ``results.json`` (rewritten after every case).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.generation import SamplingConfig, _decode_loop, _prefill
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import BACKENDS
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.layer import STEP_FUNCTIONS
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.model import ModelStates, xLSTMLMModel

# XLA settings of the decode loop's compilation, by name, passed as compiler options of that one
# compilation (the rest of the run is unaffected). "default": this XLA's defaults. "graphs": command
# buffers (CUDA graphs) for every kind of thunk that can be captured, the while loop included (one graph
# with conditional nodes for the whole decode loop), from one kernel up. "graphs_body": the same without
# WHILE/CONDITIONAL (the loop body replayed as graphs, the loop itself on the host). "cublas": no Triton
# GEMM fusions, so every matrix product is a cuBLAS call (the autotuner otherwise picks per product);
# "exhaustive": the autotuner tries every tiling of XLA's Triton GEMMs (not only its short list);
# "cublaslt": the same through cuBLASLt.
XLA_OPTIONS: dict[str, dict[str, object]] = {
    "default": {},
    "graphs": {
        "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
        "xla_gpu_graph_min_graph_size": 1,
    },
    "graphs_body": {
        "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN",
        "xla_gpu_graph_min_graph_size": 1,
    },
    "exhaustive": {"xla_gpu_exhaustive_tiling_search": True},
    "cublas": {"xla_gpu_enable_triton_gemm": False},
    "cublaslt": {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_cublaslt": True},
}

DEFAULT_CASES = (
    "recurrent:unrolled:default:1",
    "recurrent:unrolled:cublas:1",
    "recurrent:unrolled:default:16",
    "recurrent:unrolled:cublas:16",
    "recurrent_pallas:unrolled:default:1",
    "recurrent_pallas+unfused:unrolled:default:1",
    "recurrent:unrolled:graphs:1",
    "recurrent_pallas:unrolled:default:16",
    "recurrent:scan:default:1",
)


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
    # The copy: x <- x * a in place (donated), 10 passes in one jitted loop, so that neither the per-call
    # dispatch nor a fresh 1 GiB allocation per pass is timed (timed per call, this measured ~3.6 TB/s on an
    # H200 against ~4.27 TB/s for the same kernel in a loop: benchmarks/step_trace.py).
    words = (1 << 20) if small else (1 << 28)  # 1 GiB of float32
    x = jax.random.normal(jax.random.key(3), (words,), jnp.float32)
    a = jnp.float32(1.0001)
    copies = jax.jit(lambda x: jax.lax.fori_loop(0, reps, lambda _, x: x * a, x), donate_argnums=(0,))
    holder = [copies(x)]

    def run():
        holder[0] = copies(holder[0])
        holder[0].block_until_ready()

    run()
    t = median_seconds(run, 5)
    return {"bf16_matmul_tflops": tflops, "copy_tbps": 2 * x.nbytes * reps / t / 1e12}


def random_params(config: xLSTMLMConfig, seed: int = 0):
    """Random weights on the device in the stacked layout (``config.scan_blocks`` must be True).

    Kernels (in, out) and the embedding are normal, kernels scaled by 1/sqrt(in); gate biases normal;
    norm weights 1. One jitted function over the ~dozen stacked leaves: seconds to compile.
    """
    if not config.scan_blocks:
        raise ValueError("random_params draws the stacked layout: use a config with scan_blocks=True")
    model = xLSTMLMModel(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 1), jnp.int32))["params"])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)

    @jax.jit
    def make(key):
        keys = jax.random.split(key, len(leaves))
        out = []
        for k, (path, leaf) in zip(keys, leaves, strict=True):
            name = jax.tree_util.keystr(path)
            stacked = "blocks" in name
            core = leaf.shape[1:] if stacked else leaf.shape
            if len(core) >= 2:  # kernels (in, out) and the embedding (V, D)
                scale = 1.0 if core[0] == config.vocab_size else 1.0 / math.sqrt(core[0])
                out.append((jax.random.normal(k, leaf.shape, jnp.float32) * scale).astype(leaf.dtype))
            elif "bias" in name:  # gate biases
                out.append(jax.random.normal(k, leaf.shape, leaf.dtype))
            else:  # norm weights
                out.append(jnp.ones(leaf.shape, leaf.dtype))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), out)

    return make(jax.random.key(seed))


def unstack_blocks(config: xLSTMLMConfig, params: dict) -> dict:
    """The unrolled layout (``blocks_0`` ... ``blocks_{L-1}``) of stacked params (separate buffers)."""
    out = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(config.num_blocks):
        out[f"blocks_{i}"] = jax.tree_util.tree_map(lambda x, i=i: jnp.copy(x[i]), params["blocks"])
    return out


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


_SHAPE = re.compile(r"\b(pred|s8|u8|s32|u32|s64|bf16|f16|f32|f64)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "f64": 8}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")


def hlo_report(text: str) -> dict:
    """Kernel-level facts of an optimised HLO module (``Compiled.as_text()``).

    Counts, over the computations that are not fusion bodies, the fusions and custom calls (each one
    kernel or library call); lists the largest fusion and copy outputs that are
    not matrix products (a weight-sized one inside the decode loop would be a copy of a weight per token).
    """
    comps: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and not line.startswith(" "):
            name = header.group(1)
            comps[name] = []
        elif name is not None and line.strip() and line.strip() != "}":
            comps[name].append(line)
    called = set(re.findall(r"calls=%?([\w.\-]+)", text))
    fused = {c for c in called if "fus" in c or c.startswith("command_buffer")}
    ops: collections.Counter = collections.Counter()
    big: list[tuple[int, str]] = []
    for comp, lines in comps.items():
        if comp in fused:
            continue
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            instr, shape, opcode = m.group(1), m.group(2), m.group(3)
            ops[opcode] += 1
            if opcode in ("fusion", "copy", "transpose") and "gemm" not in line and "__cublas" not in line:
                nbytes = sum(
                    _ITEMSIZE[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _SHAPE.findall(shape)
                )
                big.append((nbytes, f"{comp}/{instr}: {shape[:80]}"))
    big.sort(reverse=True)
    return {
        "fusions": ops["fusion"],
        "custom_calls": ops["custom-call"],
        "copies": ops["copy"],
        "while_loops": ops["while"],
        "largest_non_matmul_outputs": [f"{b / 1e6:.1f} MB {s}" for b, s in big[:5]],
    }


def profile_summary(trace_dir: str, tokens: int) -> dict:
    """GPU kernels of a ``jax.profiler`` trace: per token, their count, summed time and the costliest names."""
    from jax.profiler import ProfileData

    files = sorted(Path(trace_dir).rglob("*.xplane.pb"))
    if not files:
        return {"error": f"no xplane.pb under {trace_dir}"}
    data = ProfileData.from_file(str(files[-1]))
    summary: dict = {"lines": {}}
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            events = list(line.events)
            summary["lines"][f"{plane.name} | {line.name}"] = len(events)
            if not line.name.startswith("Stream") or not events:
                continue
            by_name: collections.Counter = collections.Counter()
            count: collections.Counter = collections.Counter()
            for ev in events:
                by_name[ev.name] += ev.duration_ns
                count[ev.name] += 1
            start = min(ev.start_ns for ev in events)
            end = max(ev.start_ns + ev.duration_ns for ev in events)
            busy = sum(by_name.values())
            summary[f"{plane.name} | {line.name}"] = {
                "kernels_per_token": len(events) / tokens,
                "kernel_us_per_token": busy / 1e3 / tokens,
                "span_us_per_token": (end - start) / 1e3 / tokens,
                "busy_fraction": busy / max(end - start, 1),
                "top": [
                    f"{t / 1e3 / tokens:8.1f} us/token  x{count[n] / tokens:5.1f}  {n[:90]}"
                    for n, t in by_name.most_common()
                ],
            }
    return summary


def bench_decode_case(config, params, states, logits, tokens: int, repeats: int, graphs: str, profile_dir=None):
    """Seconds per token of the decode loop compiled with ``XLA_OPTIONS[graphs]``, and its HLO report."""
    stop = jnp.zeros((0,), jnp.int32)
    fresh = lambda: jax.block_until_ready(ModelStates(*(jnp.copy(x) for x in states)))  # noqa: E731
    static = (config, SamplingConfig(), tokens, 0, False)
    t0 = time.perf_counter()
    lowered = _decode_loop.lower(*static, params, fresh(), logits, jax.random.key(0), stop)
    compiled = lowered.compile(compiler_options=XLA_OPTIONS[graphs] or None)
    compile_s = time.perf_counter() - t0
    text = compiled.as_text()
    report = hlo_report(text)
    times = []
    for rep in range(repeats + 1):
        s = fresh()
        start = time.perf_counter()
        out = compiled(params, s, logits, jax.random.key(rep), stop)
        jax.block_until_ready(out.tokens)
        if int(out.t) != tokens:
            raise RuntimeError(f"decode loop ran {int(out.t)} steps, expected {tokens}")
        if not np.all(np.isfinite(np.asarray(out.logits))):
            raise RuntimeError("decode produced non-finite logits")
        if rep:  # the first run loads the program
            times.append(time.perf_counter() - start)
    if profile_dir is not None:
        s = fresh()
        jax.profiler.start_trace(profile_dir)
        jax.block_until_ready(compiled(params, s, logits, jax.random.key(99), stop).tokens)
        jax.profiler.stop_trace()
    return float(np.median(times)) / tokens, compile_s, report, text


def _step_and_fusion(step: str) -> tuple[str, bool | None]:
    """``(step backend, decode_fused)`` of a case's STEP: ``name``, ``name+fused`` or ``name+unfused``."""
    for suffix, fused in (("+fused", True), ("+unfused", False)):
        if step.endswith(suffix):
            return step.removesuffix(suffix), fused
    return step, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for results.json")
    parser.add_argument("--smoke", "--tiny", action="store_true", help="tiny config, for a CPU smoke test")
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip the cases left after this")
    parser.add_argument("--prefill", default="128,1024,8192", help="prompt lengths ('' to skip)")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="decode cases STEP:BLOCKS:GRAPHS:B")
    parser.add_argument("--tokens", type=int, default=None, help="decode tokens per timed loop")
    parser.add_argument("--profile", default="", help="profile decode cases N,... (0-based)")
    parser.add_argument("--hlo", default="", help="write the optimised HLO of decode cases N,... to --out")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    results: dict = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "argv": sys.argv[1:]}

    cases = []
    for spec in (c for c in args.cases.split(",") if c):
        step, blocks, graphs, B = spec.split(":")
        known_step = _step_and_fusion(step)[0] in STEP_FUNCTIONS
        if not known_step or blocks not in ("unrolled", "scan") or graphs not in XLA_OPTIONS:
            raise ValueError(
                f"bad case {spec!r}: STEP in {sorted(STEP_FUNCTIONS)} (optionally +fused or +unfused), BLOCKS "
                "unrolled|scan, "
                f"GRAPHS in {sorted(XLA_OPTIONS)}, B an int"
            )
        cases.append((step, blocks, graphs, int(B)))

    def save():
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=2))

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.budget_s

    results["ceilings"] = measure_ceilings(args.smoke)
    peak, bw = results["ceilings"]["bf16_matmul_tflops"], results["ceilings"]["copy_tbps"]
    print(f"# {results['device']}, jax {jax.__version__}: bf16 matmul {peak:.0f} TFLOP/s, copy {bw:.2f} TB/s")
    save()

    prefill_backend = "chunkwise" if "chunkwise" in BACKENDS else "parallel_stabilized"
    chunk = getattr(BACKENDS[prefill_backend].config_class(), "chunk_size", 64)  # for the FLOP count
    if args.smoke:
        config = xLSTMLMConfig.tiny(dtype="bfloat16", param_dtype="bfloat16", prefill_backend=prefill_backend)
        tokens, reps = 8, 2
    else:
        config = xLSTMLMConfig.xlstm_7b(prefill_backend=prefill_backend)
        tokens, reps = 64, 3
    tokens = args.tokens or tokens
    lengths = tuple(int(x) for x in args.prefill.split(",") if x)

    t0 = time.perf_counter()
    params = jax.block_until_ready(random_params(config))
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    results["params"] = {"count": config.num_params(), "bytes": weight_bytes, "init_s": time.perf_counter() - t0}
    print(f"# {config.num_params() / 1e9:.2f}e9 parameters, {weight_bytes / 1e9:.2f} GB, prefill: {prefill_backend}")
    save()

    # Decode. The prompt's states and logits come from a (scanned) prefill of 16 tokens per batch size.
    read_bytes = matmul_params(config) * jnp.dtype(config.param_dtype).itemsize + config.embedding_dim * 2
    starts = {}
    for B in sorted({c[3] for c in cases}):
        ids = jax.random.randint(jax.random.key(B), (B, 16), 0, config.vocab_size, jnp.int32)
        starts[B] = jax.block_until_ready(_prefill(config, params, ids, None))
    params_u = unstack_blocks(config, params) if any(c[1] == "unrolled" for c in cases) else None
    results["decode"] = []
    print(
        f"{'decode step':>17s} {'blocks':>8s} {'graphs':>11s} {'B':>3s} {'ms/token':>9s} {'x floor':>8s} "
        f"{'x +states':>9s} {'compile s':>9s} {'kernels':>7s}"
    )
    profiled = {int(x) for x in args.profile.split(",") if x}
    hlo_cases = {int(x) for x in args.hlo.split(",") if x}
    for n, (step, blocks, graphs, B) in enumerate(cases):
        label = f"{step:>17s} {blocks:>8s} {graphs:>11s} {B:3d}"
        if over_budget():
            print(f"{label} skipped (time budget)")
            results["decode"].append({"case": [step, blocks, graphs, B], "skipped": "time budget"})
            continue
        base, fused = _step_and_fusion(step)
        cfg = config.replace(step_backend=base, scan_blocks=blocks == "scan", decode_fused=fused)
        profile_dir = tempfile.mkdtemp() if n in profiled else None
        floor = read_bytes / (bw * 1e12)
        floor_states = (read_bytes + 2 * state_bytes(config, B)) / (bw * 1e12)
        logits, states = starts[B]
        try:
            t, compile_s, report, text = bench_decode_case(
                cfg,
                params if blocks == "scan" else params_u,
                states,
                logits,
                tokens,
                reps,
                graphs,
                profile_dir,
            )
        except Exception as e:  # report and go on: one failing case must not lose the others
            print(f"{label} FAILED: {type(e).__name__}: {str(e)[:300]}")
            results["decode"].append({"case": [step, blocks, graphs, B], "error": repr(e)[:1000]})
            save()
            continue
        row = {
            "case": [step, blocks, graphs, B],
            "ms_per_token": t * 1e3,
            "floor_ms": floor * 1e3,
            "floor_with_states_ms": floor_states * 1e3,
            "compile_s": compile_s,
            "hlo": report,
        }
        results["decode"].append(row)
        kernels = report["fusions"] + report["custom_calls"]
        print(f"{label} {t * 1e3:9.3f} {t / floor:8.2f} {t / floor_states:9.2f} {compile_s:9.1f} {kernels:7d}")
        save()
        if n in hlo_cases and args.out is not None:
            (args.out / f"hlo_{n}_{step}_{blocks}_{graphs}_{B}.txt").write_text(text)
        if profile_dir is not None:
            row["profile"] = profile_summary(profile_dir, tokens)
            for key, value in row["profile"].items():
                if isinstance(value, dict) and "top" in value:
                    print(f"# profile {key}: " + json.dumps({k: v for k, v in value.items() if k != "top"}))
                    print("\n".join(f"#   {line}" for line in value["top"][:30]))
            save()
    print(f"# floor {read_bytes / (bw * 1e12) * 1e3:.3f} ms/token ({read_bytes / 1e9:.2f} GB at {bw:.2f} TB/s)")
    del params_u

    print(f"{'prefill S':>10s} {'ms':>9s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'of peak':>8s}")
    results["prefill"] = []
    for S in lengths:
        if over_budget():
            print(f"{S:10d} skipped (time budget)")
            continue
        try:
            t = bench_prefill(config, params, S, reps)
        except Exception as e:
            print(f"{S:10d} FAILED: {type(e).__name__}: {str(e)[:200]}")
            results["prefill"].append({"S": S, "error": repr(e)[:500]})
            continue
        flops = prefill_flops(config, S, chunk)
        row = {"S": S, "ms": t * 1e3, "tokens_per_s": S / t, "tflops": flops / t / 1e12, "flops": flops}
        row["fraction_of_peak"] = row["tflops"] / peak
        results["prefill"].append(row)
        print(f"{S:10d} {t * 1e3:9.2f} {S / t:10.0f} {row['tflops']:8.1f} {row['fraction_of_peak']:8.1%}")
        save()
    results["total_s"] = time.perf_counter() - t_start
    print(f"# total {results['total_s']:.0f} s")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
