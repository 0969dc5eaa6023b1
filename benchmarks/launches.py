"""Counts the kernels of the serving engine's prefill chunk programs as XLA compiles them for an H200.

A lone prefill chunk is host-bound: its first token waits while the host launches every kernel of the chunk
program one by one (BENCHMARKS.md, serving: 11.5 ms for 5.3 ms of kernels at 64 tokens). How many kernels a
program launches is therefore a figure of its own, and it can be read off the compiled program without running
it, and without a GPU: XLA compiles a GPU program for a described device (deviceless compilation, a PJRT
topology made from a target description: ``jax.experimental.topologies``). This script compiles the engine's
chunk program (``xlstm_jax.serving.engine``: one request's chunk of T tokens from given states, in the shape
the engine compiles for T; :func:`chunk_program_hlo`) for :data:`H200_TARGET`, or for the GPU present, and
counts the operations of the compiled program's entry computation that launch work on the device: fusions
(one kernel each), the GEMMs (XLA's Triton GEMM fusions and cuBLAS calls), Pallas kernels (Mosaic GPU and
Triton custom calls) and the rest (copies, in-place updates). Without a GPU XLA does not autotune its GEMMs, so
their number and kind can differ from the device's own compile (the 64-token chunk with in-kernel scores: 1061
operations counted here, 1006 kernels in a device trace of that program in BENCHMARKS.md).

Where there is no GPU it needs JAX's CUDA plugin (``pip install -e ".[cuda]"``, about 5 GB of CUDA libraries)
and ``JAX_PLATFORMS=cpu`` (the plugin then compiles without initialising a device)::

    JAX_PLATFORMS=cpu PYTHONPATH=. python3 benchmarks/launches.py --json launches.json

(on a GPU machine without ``JAX_PLATFORMS``: it compiles for the GPU present).

Table ``chunks``, a row per chunk of ``--tokens`` tokens of ``--preset`` (shapes only: nothing is computed) and
``chunkwise_mosaic`` ``scores`` setting (``auto``: its default, ``auto_scores``). Table ``cell``, a row per
``--cells`` shape BxS and pass: the ``chunkwise_mosaic`` cell alone at the preset's heads, forward and forward
plus backward (:func:`cell_program_hlo`), the programs ``benchmarks/chunkwise.py`` times. A loop's body counts
once per iteration (:func:`count_kernels`; ``loop iterations``). ``--device cpu`` compiles for the CPU instead
(a smoke run of this script; a CPU program's operations are not a GPU's kernels).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.chunkwise import shape
from benchmarks.generate import PRESETS
from benchmarks.harness import Column, Report
from xlstm_jax.kernels.chunkwise_mosaic import SCORES
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import create_mlstm_backend
from xlstm_jax.models.xlstm_parallel.model import ModelStates, xLSTMLMModel
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig

# An H200 SXM as XLA's GPU compiler describes a device (a TargetConfig in protobuf text): 132 SMs of compute
# capability 9.0, 227 KiB of shared memory a block, 50 MiB of L2, 4.8 TB/s of HBM3e; CUDA 12.8, cuDNN 9.8.
H200_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150754820096
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H200"
"""

# Operations that launch nothing: they name, group or reinterpret buffers.
_NO_LAUNCH = frozenset({"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all"})
_GEMM_FUSIONS = ("__triton_gemm", "__triton_nested_gemm_fusion", "__cudnn$fusion")
KINDS = ("fusion", "gemm", "pallas", "other")
_OP = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9-]*)\(")
_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.-]+) [^\n]*\{\n(.*?)\n\}$", re.S | re.M)


def computations(hlo: str) -> dict[str, str]:
    """The bodies of a compiled HLO module's computations by name; the entry computation's under ``"ENTRY"``."""
    found = {"ENTRY" if m.group(1) else m.group(2): m.group(3) for m in _COMPUTATION.finditer(hlo)}
    if "ENTRY" not in found:
        raise ValueError("the HLO text has no ENTRY computation")
    return found


def operations(body: str) -> list[tuple[str, str, str]]:
    """``(name, kind, line)`` of every operation of a computation's body that launches work on the device, in
    program order: kind is one of :data:`KINDS`, or ``"while"`` for a loop."""
    ops = []
    for line in body.splitlines():
        match = _OP.match(line)
        if match is None or match.group(2) in _NO_LAUNCH:
            continue
        name, op = match.groups()
        target = re.search(r'custom_call_target="([^"]+)"', line)
        fusion_kind = re.search(r'"kind":"([^"]+)"', line)
        if op == "custom-call" and target is not None:
            kind = _custom_call_kind(target.group(1))
        elif op == "fusion":
            kind = "gemm" if fusion_kind is not None and fusion_kind.group(1) in _GEMM_FUSIONS else "fusion"
        else:
            kind = "while" if op == "while" else "other"
        ops.append((name, kind, line))
    return ops


def _custom_call_kind(target: str) -> str:
    """cuBLAS and cuBLASLt products are GEMMs; Mosaic GPU and Triton (Pallas) calls are Pallas kernels."""
    if "cublas" in target or "gemm" in target:
        return "gemm"
    return "pallas" if target.startswith("mosaic_gpu") or "triton" in target else "other"


def count_kernels(hlo: str) -> dict[str, int]:
    """The kernels one call of a compiled program launches, by kind (:data:`KINDS`) and in total (``kernels``),
    with ``loops``, the loop iterations it runs.

    A loop (``while``) of known trip count n runs its body n times: its body's launches count n times (XLA runs
    such a loop without evaluating its condition, whose kernels are not counted). A loop of unknown trip count is
    an error here, as its launches cannot be counted from the program.
    """
    bodies = computations(hlo)
    counts: collections.Counter = collections.Counter()

    def count(name: str, times: int) -> None:
        for _, kind, line in operations(bodies[name]):
            if kind != "while":
                counts[kind] += times
                continue
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            if trips is None:
                raise ValueError(f"a loop of unknown trip count: {line.strip()[:200]}")
            counts["loops"] += times * int(trips.group(1))
            count(re.search(r"body=%([\w.-]+)", line).group(1), times * int(trips.group(1)))

    count("ENTRY", 1)
    return {"kernels": sum(counts[k] for k in KINDS), **{k: counts[k] for k in KINDS}, "loops": counts["loops"]}


def h200_device() -> Any:
    """A compile-only H200 (:data:`H200_TARGET`) of JAX's CUDA plugin.

    Raises:
        RuntimeError: JAX has no CUDA plugin to compile with.
    """
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc("1x1x1", "cuda", target_config=H200_TARGET, topology="1x1x1")
    except Exception as e:  # the plugin is missing or cannot make a topology
        raise RuntimeError(
            f"cannot compile for an H200 without a GPU ({e}): that takes JAX's CUDA plugin "
            '(pip install -e ".[cuda]") and JAX_PLATFORMS=cpu'
        ) from e
    return topology.devices[0]


class _CompileOnlyGpu:
    """What the library reads of JAX's first device to choose its GPU kernels (``device_supports_mosaic``)."""

    platform = "gpu"
    compute_capability = "9.0"
    device_kind = "NVIDIA H200"
    id = 0


@contextlib.contextmanager
def traced_for_gpu(deviceless: bool) -> Iterator[None]:
    """While tracing for a compile-only GPU, the library's kernel choices (``jax.default_backend()``,
    ``jax.devices()[0]``; the process's backend is the CPU) see an H200, as they would on the device."""
    if not deviceless:
        yield
        return
    default_backend, devices = jax.default_backend, jax.devices
    jax.default_backend = lambda: "gpu"
    jax.devices = lambda *args, **kwargs: [_CompileOnlyGpu()]
    try:
        yield
    finally:
        jax.default_backend, jax.devices = default_backend, devices


def chunk_program_hlo(preset: str, tokens: int, scores: str | None, device: Any, deviceless: bool) -> str:
    """The compiled HLO text of a prefill chunk of ``tokens`` tokens of ``preset`` for one request, with the
    ``chunkwise_mosaic`` backend's ``scores`` (None: its default), for ``device``.

    The serving engine's chunk program (``xlstm_jax.serving.engine``) restated with public names: the model from
    the states in the donated work buffers (states and last logits) to the states and the last position's
    float32 logits written back into them, the tokens and their padding mask donated and returned, compiled
    without command buffers as the engine compiles its shapes below the full one. Its count equals the engine
    program's (1061 kernels either way at 64 tokens).
    """
    config = PRESETS[preset]()
    kwargs = () if scores is None else (("scores", scores),)
    model = xLSTMLMModel(config, RuntimeConfig(prefill_backend="chunkwise_mosaic", prefill_backend_kwargs=kwargs))
    sharding = jax.sharding.SingleDeviceSharding(device)

    def placed(tree: Any) -> Any:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)

    def chunk(params, work, chunk_tokens):
        input_ids, valid = chunk_tokens
        logits, states = model.apply({"params": params}, input_ids, work[0], valid, return_states=True, last_only=True)
        return (ModelStates(*states), logits[:, 0].astype(jnp.float32)), chunk_tokens

    with traced_for_gpu(deviceless):
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 1), jnp.int32))["params"])
        work = jax.eval_shape(lambda: (ModelStates.zeros(config, 1), jnp.zeros((1, config.vocab_size), jnp.float32)))
        ids = (jax.ShapeDtypeStruct((1, tokens), jnp.int32), jax.ShapeDtypeStruct((1, tokens), bool))
        options = {"xla_gpu_enable_command_buffer": ""}
        program = jax.jit(chunk, donate_argnums=(1, 2), keep_unused=True, compiler_options=options)
        lowered = program.lower(placed(params), placed(work), placed(ids))
    return lowered.compile().as_text()


def cell_program_hlo(preset: str, B: int, S: int, grad: bool, device: Any, deviceless: bool) -> str:
    """The compiled HLO text of the ``chunkwise_mosaic`` backend with its defaults (on Hopper the Mosaic GPU
    kernels, elsewhere the XLA form) at ``preset``'s heads, B rows of S steps, bf16 q, k, v and float32 gates, no
    initial states, for ``device``: the forward, or with ``grad`` the gradients of ``sum(h)`` in every input
    (forward and backward)."""
    config = PRESETS[preset]()
    NH, DHQK, DHV = config.num_heads, config.qk_head_dim, config.v_head_dim
    sharding = jax.sharding.SingleDeviceSharding(device)
    shapes = [(DHQK, jnp.bfloat16), (DHQK, jnp.bfloat16), (DHV, jnp.bfloat16), (None, jnp.float32), (None, jnp.float32)]
    args = [jax.ShapeDtypeStruct((B, NH, S, *([d] if d else [])), t, sharding=sharding) for d, t in shapes]

    backend = create_mlstm_backend("chunkwise_mosaic")

    def loss(*x):
        return jnp.sum(backend(*x).astype(jnp.float32))

    program = jax.jit(jax.grad(loss, argnums=tuple(range(5))) if grad else backend)
    with traced_for_gpu(deviceless):
        lowered = program.lower(*args)
    return lowered.compile().as_text()


KIND_COLUMNS = [
    Column("kernels", "kernels", "d", width=7),
    Column("fusions", "fusion", "d", width=7),
    Column("GEMMs", "gemm", "d", width=6),
    Column("Pallas", "pallas", "d", width=6),
    Column("other", "other", "d", width=6),
    Column("loop iterations", "loops", "d", width=6),
]
CHUNK_COLUMNS = [
    Column("tokens", "tokens", "d", width=6),
    Column("scores", "scores", width=11),
    *KIND_COLUMNS,
    Column("per layer", "per_layer", ".1f", width=9),
]
CELL_COLUMNS = [Column("B", "B", "d", width=3), Column("S", "S", "d", width=6), Column("pass", "pass"), *KIND_COLUMNS]


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="xlstm_7b", help="model config (shapes only)")
    p.add_argument("--tokens", type=int, nargs="*", default=[16, 32, 64, 128, 256], help="chunk lengths")
    p.add_argument("--cells", type=shape, nargs="*", default=[(8, 2048), (8, 8192)], help="BxS of the cell programs")
    p.add_argument("--scores", nargs="+", default=["auto", *SCORES], choices=["auto", *SCORES])
    p.add_argument("--device", choices=["h200", "cpu"], default="h200", help="h200: the GPU present, else deviceless")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    a = p.parse_args(argv)
    if any(t < 1 for t in a.tokens):
        p.error(f"--tokens must be positive, got {a.tokens}")
    report = Report("launches", "benchmarks/launches.py", vars(a), a.json, argv)
    if a.device == "cpu":
        device, deviceless = jax.devices("cpu")[0], False
    elif jax.default_backend() == "gpu":
        device, deviceless = jax.devices()[0], False
    else:
        try:
            device, deviceless = h200_device(), True
        except RuntimeError as e:
            sys.exit(f"error: {e}")
    target = str(getattr(device, "device_kind", device))
    report.set("target", {"device": target, "deviceless": deviceless})
    how = "without a GPU: its GEMMs are not autotuned" if deviceless else "on this machine"
    report.note(f"compiled for {target}, {how}")
    layers = PRESETS[a.preset]().num_blocks
    if a.tokens:
        report.table("chunks", CHUNK_COLUMNS)
    for tokens in a.tokens:
        for scores in a.scores:
            hlo = chunk_program_hlo(a.preset, tokens, None if scores == "auto" else scores, device, deviceless)
            counts = count_kernels(hlo)
            report.add(
                "chunks", {"tokens": tokens, "scores": scores, **counts, "per_layer": counts["kernels"] / layers}
            )
    if a.cells:
        report.table("cell", CELL_COLUMNS)
    for B, S in a.cells:
        for grad in (False, True):
            counts = count_kernels(cell_program_hlo(a.preset, B, S, grad, device, deviceless))
            report.add("cell", {"B": B, "S": S, "pass": "fwd+bwd" if grad else "fwd", **counts})
    return report.data


if __name__ == "__main__":
    main()
