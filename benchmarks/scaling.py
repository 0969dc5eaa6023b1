"""Multi-device training and decoding of the xLSTM language model: correctness, scaling, 7B fit, decode.

On the first N local devices (``--devices N``; default all of them), four parts (``--parts``, all by default):

1. ``correctness``: one training step (``make_train_step``, AdamW, bfloat16 compute, float32 parameters) of a
   small model (``xLSTMLMConfig.tiny`` with 8 heads, so that a tensor axis of 2, 4 or 8 splits them) on each
   N-device mesh against the same step on one device without a mesh, from the same state and batch; then a
   checkpoint of the N-device state written with ``TrainCheckpointer`` and restored on one device and on the
   N devices. Table ``correctness`` columns: ``mesh`` (see below), ``mesh shape`` (data x fsdp x tensor),
   ``B``, ``S``, ``loss 1`` and ``loss N`` (the step's loss on one and on N devices), ``loss err``
   (``|loss N - loss 1| / |loss 1|``), ``update err`` (per parameter, ``max |u_N - u_1| / max |u_1|`` with
   ``u`` the step's change of the parameter; the largest over parameters), ``param err`` (the same for the
   parameters after the step, over ``max |p_1|``), ``tol`` (:func:`step_tolerance`), ``ok`` (all three within
   it). Table ``checkpoint``: ``mesh`` (where the state was saved), ``restored on`` (``1 device`` or
   ``N devices``), ``equal`` (every array of the state, the parameters, optimiser moments, step and key,
   bit-equal to the saved one) and ``max abs diff``.
2. ``scaling``: tokens/s of ``benchmarks/train.py``'s 1.3B-class model (its config and batches; D=2048, 24
   blocks, 4 heads, vocabulary 50304, S=4096, chunk 256) on one device and on N devices, weak scaling:
   ``--scaling-case B:remat`` gives the batch per device (the N-device step runs N*B rows) and the remat policy
   (default ``8:none``, train.py's first case).
   Table ``scaling`` columns: ``mesh``, ``devices``, ``B`` (global rows), ``step ms`` (median step),
   ``spread``, ``ktok/s`` (global tokens/s), ``efficiency`` (``tokens/s(N) / (N * tokens/s(1))``, the one-device
   row of the same run), ``>=0.9`` (whether the efficiency meets the 0.9 target), ``mfu`` (tokens/s times
   ``flops_per_token`` over N times the bf16 matrix rate measured in this run), ``compile s`` and
   ``program GiB`` (the compiled step's arguments, outputs and temporaries per device, from XLA's memory
   analysis).
3. ``fit7b``: the ``xlstm_7b`` preset (float32 parameters and AdamW state, bfloat16 compute) trained with FSDP
   over the N devices, at each ``--fit-cases B:remat`` (B per device; remat ``dots`` or ``full``; default
   ``2:full 2:dots``) at S = ``--fit-seq`` (4096). Table ``fit7b`` columns: ``mesh``, ``B`` (global), ``S``,
   ``remat``, ``status`` (``ok``, ``OOM`` or ``error``), ``step ms``, ``ktok/s``, ``mfu`` (as above),
   ``program GiB`` (as above) and ``peak GiB`` (the largest ``peak_bytes_in_use`` of
   ``device.memory_stats()`` over the devices, since the process started; None where the backend gives no
   statistics, as on a CPU). This part runs right after ``correctness``, before the larger scaling and
   decode buffers, so that its peak is its own.
4. ``decode``: xLSTM-7B (random bf16 weights, ``benchmarks/generate.py``'s ``random_params``) greedy decode
   with ``xlstm_jax.generation.generate``, timed as ``benchmarks/generate.py`` times it (``decode_per_token``:
   ``generate`` at N/2+1 and N new tokens, the difference per token; ``--tokens``): tensor parallelism over
   2 devices at batch 1 and 16 against one device, and data parallelism over the N devices at batch 128
   against one device. Table ``decode`` columns: ``case`` (``mode`` and devices), ``B``, ``status`` (``ok``,
   ``OOM``, ``error``, or ``noise`` where N tokens took no longer than N/2+1: no time given), ``ms/token``,
   ``ktok/s`` (B tokens per step over the step), ``speedup`` (the one-device ms/token of the same batch over
   this row's) and ``first call s`` (compilation included).

Meshes (``xlstm_jax.models.xlstm_parallel.sharding``): ``fsdpN`` is 1 x N x 1 (parameters and optimiser state
split N ways, the batch too), ``dataN`` is N x 1 x 1 (parameters replicated, the batch split), ``tensorT`` is
N/T x 1 x T with T the largest divisor of N that divides the model's heads (heads and FFN columns split T ways,
the batch over the N/T data groups); the tensor row is left out where T would be 1. ``one`` is one device
without a mesh.

Every table row records the shapes and dtypes, and the report the device kind, the device count and the jax
version (``benchmarks/harness.py``'s ``Report``). A failing case is a row with its status, and the run goes
on. Results: BENCHMARKS.md.

NVLink multicast stays off: the device machines' documentation requires it, so this module sets
``NCCL_NVLS_ENABLE=0`` with ``os.environ.setdefault`` before jax is imported (a value already in the
environment is kept); it changes no other NCCL variable.

On a machine of 2, 4 or 8 GPUs, everything in one run, or each part in its own run (each run stays within a
10-minute slot)::

    PYTHONPATH=. python3 benchmarks/scaling.py --json scaling.json
    PYTHONPATH=. python3 benchmarks/scaling.py --parts correctness scaling --json scaling_train.json
    PYTHONPATH=. python3 benchmarks/scaling.py --parts fit7b --json scaling_fit7b.json
    PYTHONPATH=. python3 benchmarks/scaling.py --parts decode --json scaling_decode.json

and with fewer devices than the machine has, e.g. ``--devices 2``. On a CPU with 8 host devices (tiny shapes
and the tiny preset everywhere, one block each; about a minute on 2 CPU cores)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. python3 benchmarks/scaling.py --small

Timing: compilation apart, ``--warmup`` untimed steps, then the median of ``--repeats`` steps, each blocked
until ready, the state donated from step to step (``benchmarks/harness.py``'s ``time_jitted``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (see the module docstring)
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # as benchmarks/train.py

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from benchmarks.generate import PRESETS, decode_per_token, noise_note, random_params
from benchmarks.harness import Column, Report, add_arguments, ceilings_from_arguments, time_jitted
from benchmarks.train import model_config, out_of_memory, parse_case, random_batch, resolve_model_arguments
from xlstm_jax.generation import generate
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.model import xLSTMLMModel
from xlstm_jax.models.xlstm_parallel.runtime import Remat, RuntimeConfig
from xlstm_jax.models.xlstm_parallel.sharding import MeshConfig, batch_sharding, make_mesh, shard_params
from xlstm_jax.training.checkpoint import TrainCheckpointer
from xlstm_jax.training.flops import flops_per_token
from xlstm_jax.training.init import init_params
from xlstm_jax.training.optim import OptimizerConfig, make_optimizer
from xlstm_jax.training.step import TrainState, create_train_state, make_train_step, train_state_shardings

PARTS = ("correctness", "scaling", "fit7b", "decode")
ORDER = ("correctness", "fit7b", "scaling", "decode")  # fit7b early: its peak memory is then its own
EFFICIENCY_TARGET = 0.9
BF16_U = 2.0**-9  # bfloat16's unit roundoff


def parse_remat_case(text: str) -> tuple[int, Remat]:
    """``"B:remat"`` -> ``(B, Remat)`` (train.py's case syntax; these steps take no micro-batches)."""
    if text.count(":") != 1:
        raise argparse.ArgumentTypeError(f"a case here is B:remat (no micro-batches), got {text!r}")
    B, remat, _ = parse_case(text)
    return B, remat


def step_tolerance(tokens: int) -> float:
    """Bound on the N-device step's loss, parameter update and parameters against the one-device step.

    Each is scaled as the correctness table says (by the one-device value's largest magnitude per parameter).
    Both steps compute in bfloat16 from the same state and batch and differ in the order of their sums: the
    batch's and the parameters' shards are reduced separately. The gradient of a parameter is a sum over the
    ``tokens = B * S`` positions, which XLA may accumulate in bfloat16 (u = 2^-9 per addition). Round-to-nearest
    errors are unbiased, so two orders of a sum of K terms differ by about ``sqrt(K) u`` of the sum's scale
    (tests/numerics.py's convention); the largest of a parameter's ~1e2 to 1e4 elements lies within 3 sigma:
    ``3 sqrt(tokens) u`` (0.105 at B=8, S=40; 0.052 at B=2). The update inherits it: the first Adam step with
    eps=1 (:data:`CORRECTNESS_OPTIMIZER`) is ``lr g / (|g| + 1)``, close to linear in g for these gradients.
    A sharding mistake (a reduction left out over 2 or more shards, a wrong shard) errs by 0.5 or more.
    """
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive int, got tokens={tokens!r}")
    return 3.0 * math.sqrt(tokens) * BF16_U


# The correctness step's optimiser: AdamW at a constant rate from step 0 (no warmup, whose first rate is 0),
# no clipping, eps=1 so that the first update follows the gradient rather than its sign (with eps=1e-8 a
# near-zero gradient element whose sign differs by rounding would move by 2 lr either way).
CORRECTNESS_OPTIMIZER = OptimizerConfig(
    learning_rate=1e-2, total_steps=10, warmup_steps=0, schedule="constant", eps=1.0, clip_norm=None
)
# benchmarks/train.py's optimiser for the timed steps: AdamW, no gradient clipping.
TIMED_OPTIMIZER = OptimizerConfig(total_steps=1000, warmup_steps=10, clip_norm=None)
DECODE_PROMPT = 16  # tokens per random prompt

CORRECTNESS_COLUMNS = [Column("mesh", "mesh", width=10), Column("mesh shape", "mesh_shape", width=10),
                       Column("B", "B", width=4), Column("S", "S", width=5), Column("loss 1", "loss_1", ".5f"),
                       Column("loss N", "loss_n", ".5f"), Column("loss err", "loss_err", ".2e"),
                       Column("update err", "update_err", ".2e"), Column("param err", "param_err", ".2e"),
                       Column("tol", "tol", ".1e"), Column("ok", "ok", width=5)]  # fmt: skip
CHECKPOINT_COLUMNS = [Column("mesh", "mesh", width=10), Column("restored on", "restored_on", width=11),
                      Column("equal", "equal", width=5), Column("max abs diff", "max_abs_diff", ".2e")]  # fmt: skip
SCALING_COLUMNS = [Column("mesh", "mesh", width=10), Column("devices", "devices", width=7), Column("B", "B", width=4),
                   Column("status", "status", width=6), Column("step ms", "median_s", ".1f", 1e3),
                   Column("spread", "spread", ".2f"), Column("ktok/s", "tokens_per_s", ".2f", 1e-3),
                   Column("efficiency", "efficiency", ".3f"), Column(">=0.9", "target_met", width=5),
                   Column("mfu", "mfu", ".3f"), Column("compile s", "compile_s", ".1f"),
                   Column("program GiB", "program_gib", ".2f")]  # fmt: skip
FIT_COLUMNS = [Column("mesh", "mesh", width=10), Column("B", "B", width=4), Column("S", "S", width=5),
               Column("remat", "remat", width=5), Column("status", "status", width=6),
               Column("step ms", "median_s", ".1f", 1e3), Column("ktok/s", "tokens_per_s", ".3f", 1e-3),
               Column("mfu", "mfu", ".3f"), Column("compile s", "compile_s", ".1f"),
               Column("program GiB", "program_gib", ".2f"), Column("peak GiB", "peak_gib", ".2f")]  # fmt: skip
DECODE_COLUMNS = [Column("case", "case", width=12), Column("B", "B", width=4), Column("status", "status", width=6),
                  Column("ms/token", "ms_per_token", ".3f"), Column("ktok/s", "tokens_per_s", ".3f", 1e-3),
                  Column("speedup", "speedup", ".2f"), Column("first call s", "first_call_s", ".1f")]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Meshes and training states
# ---------------------------------------------------------------------------------------------------------
def tensor_size(devices: int, heads: int) -> int:
    """The largest divisor T of ``devices`` that divides ``heads`` (1: no tensor split fits)."""
    return max(t for t in range(1, devices + 1) if devices % t == 0 and heads % t == 0)


def meshes(devices: Sequence[Any], heads: int) -> dict[str, MeshConfig]:
    """The N-device mesh configs by name: ``fsdpN``, ``dataN`` and, where heads allow, ``tensorT``."""
    n = len(devices)
    out = {f"fsdp{n}": MeshConfig(data=1, fsdp=n, tensor=1), f"data{n}": MeshConfig(data=n, fsdp=1, tensor=1)}
    t = tensor_size(n, heads)
    if t > 1:
        out[f"tensor{t}"] = MeshConfig(data=n // t, fsdp=1, tensor=t)
    return out


def shape_text(mesh: Any) -> str:
    """``"data x fsdp x tensor"`` of a mesh, e.g. ``"1x8x1"``."""
    return "x".join(str(mesh.shape[a]) for a in ("data", "fsdp", "tensor"))


def state_maker(config: xLSTMLMConfig, optimizer: Any, scan_blocks: bool) -> Callable[[jax.Array], TrainState]:
    """``key -> TrainState`` at step 0 (``init_params``' initialisation)."""
    return lambda key: create_train_state(init_params(config, key, scan_blocks=scan_blocks), optimizer, 0)


def program_gib(compiled: Any) -> float | None:
    """Per-device bytes of a compiled program's arguments, outputs and temporaries, GiB (None: not reported)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # backends without a memory analysis
        return None
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return total / 2**30


def peak_gib(devices: Sequence[Any]) -> float | None:
    """The largest ``peak_bytes_in_use`` over ``devices`` so far in this process, GiB (None without statistics)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) / 2**30 if peaks else None


def timed_step(
    config: xLSTMLMConfig,
    runtime: RuntimeConfig,
    devices: Sequence[Any],
    mesh_config: MeshConfig | None,
    B: int,
    S: int,
    a: argparse.Namespace,
) -> dict[str, Any]:
    """Times the training step of ``config`` at B global rows on one device (``mesh_config`` None) or a mesh.

    The state is created where it lives (each device draws its shards), the step compiled apart and timed with
    the state donated from step to step. Returns the timing's fields, ``program_gib`` and ``tokens_per_s``.
    """
    model = xLSTMLMModel(config, runtime)
    optimizer = make_optimizer(TIMED_OPTIMIZER)
    init = state_maker(config, optimizer, runtime.scan_blocks)
    batch = random_batch(B, S, config.vocab_size, seed=B)
    if mesh_config is None:
        with jax.default_device(devices[0]):
            state = jax.jit(init)(jax.random.key(0))
            batch = jax.device_put(batch, devices[0])
        step = make_train_step(model, optimizer)
        context: Any = contextlib.nullcontext()
    else:
        mesh = make_mesh(mesh_config, devices)
        shardings = train_state_shardings(jax.eval_shape(init, jax.random.key(0)), config, mesh, optimizer)
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
        batch = jax.device_put(batch, batch_sharding(mesh))
        step = make_train_step(model, optimizer, state_shardings=shardings, batch_sharding=batch_sharding(mesh))
        context = jax.set_mesh(mesh)
    with context:
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        memory = program_gib(compiled)
        # time_jitted's carry feeds the returned (state, metrics) back as the first two arguments.
        timing = time_jitted(lambda s, _m, b: compiled(s, b), state, None, batch, repeats=a.repeats,
                             warmup=a.warmup, carry=True)  # fmt: skip
    del state
    row = {**timing.as_row(), "compile_s": compile_s, "program_gib": memory}
    row["tokens_per_s"] = B * S / timing.median_s
    return row


def _failure(error: BaseException) -> dict[str, Any]:
    return {
        "status": "OOM" if out_of_memory(error) else "error",
        "error": f"{type(error).__name__}: {str(error)[:1500]}",
    }


# ---------------------------------------------------------------------------------------------------------
# Part 1: correctness
# ---------------------------------------------------------------------------------------------------------
def correctness_config(small: bool) -> xLSTMLMConfig:
    """The small model of the correctness part: ``tiny`` with 8 heads (DHQK = DHV = 16), bf16 compute (one
    block with ``small``)."""
    blocks = {"num_blocks": 1} if small else {}
    return xLSTMLMConfig.tiny(num_heads=8, qk_dim_factor=1.0, dtype="bfloat16", param_dtype="float32", **blocks)


def _leaf_errors(ref: Any, out: Any, base: Any | None = None) -> tuple[float, str]:
    """The largest over parameters of ``max |out - ref| / max |ref|`` (with ``base``: of the changes from
    ``base``), and that parameter's path."""
    worst, where = 0.0, ""
    bases = jax.tree.leaves(base) if base is not None else [None] * len(jax.tree.leaves(ref))
    leaves = jax.tree_util.tree_leaves_with_path(ref)
    for (path, r), o, b in zip(leaves, jax.tree.leaves(out), bases, strict=True):
        r, o = np.asarray(r, np.float64), np.asarray(o, np.float64)
        if b is not None:
            b = np.asarray(b, np.float64)
            r, o = r - b, o - b
        scale = float(np.max(np.abs(r)))
        if scale == 0.0:  # a parameter the step leaves alone (a zero-initialised FFN's gradients): exact match
            err = 0.0 if float(np.max(np.abs(o))) == 0.0 else math.inf
        else:
            err = float(np.max(np.abs(o - r))) / scale
        if err >= worst:
            worst, where = err, jax.tree_util.keystr(path)
    return worst, where


def run_correctness(report: Report, devices: Sequence[Any], a: argparse.Namespace) -> None:
    """Part 1: the N-device steps against the one-device step, and the checkpoint round trip."""
    config = correctness_config(a.small)
    runtime = RuntimeConfig(prefill_backend="chunkwise", prefill_backend_kwargs=(("chunk_size", a.correctness_chunk),))
    model = xLSTMLMModel(config, runtime)
    optimizer = make_optimizer(CORRECTNESS_OPTIMIZER)
    B, S = a.correctness_batch * len(devices), a.correctness_seq
    tol = step_tolerance(B * S)
    batch = random_batch(B, S, config.vocab_size, seed=11)
    # Packed documents and padding, so that segment_ids and loss_mask take part: three documents per row.
    segments = 1 + (np.arange(S)[None, :] * 3 // S) + np.zeros((B, 1), np.int64)
    mask = np.ones((B, S), np.float32)
    mask[:, 1:][segments[:, 1:] != segments[:, :-1]] = 0.0  # where the target starts a new document
    batch.update(segment_ids=jnp.asarray(segments, jnp.int32), loss_mask=jnp.asarray(mask))
    report.set("correctness_model", {**dataclasses.asdict(config), "B": B, "S": S, "optimizer": repr(optimizer)})
    report.set("correctness_optimizer", dataclasses.asdict(CORRECTNESS_OPTIMIZER))

    with jax.default_device(devices[0]):
        state0 = jax.jit(state_maker(config, optimizer, False))(jax.random.key(1))
        one_step = make_train_step(model, optimizer, donate=False)
        state1, metrics1 = one_step(state0, jax.device_put(batch, devices[0]))
    params0, params1 = jax.device_get(state0.params), jax.device_get(state1.params)
    loss1 = float(metrics1["loss"])

    report.table("correctness", CORRECTNESS_COLUMNS)
    saved: dict[str, tuple[Any, Any]] = {}
    for name, mesh_config in meshes(devices, config.num_heads).items():
        row: dict[str, Any] = {"mesh": name, "B": B, "S": S, "dtype": "bfloat16 compute, float32 parameters"}
        try:
            mesh = make_mesh(mesh_config, devices)
            row["mesh_shape"] = shape_text(mesh)
            shardings = train_state_shardings(state0, config, mesh, optimizer)
            step = make_train_step(model, optimizer, state_shardings=shardings,
                                   batch_sharding=batch_sharding(mesh), donate=False)  # fmt: skip
            with jax.set_mesh(mesh):
                stateN, metricsN = step(jax.device_put(state0, shardings), jax.device_put(batch, batch_sharding(mesh)))
            lossN = float(metricsN["loss"])
            row.update(loss_1=loss1, loss_n=lossN, loss_err=abs(lossN - loss1) / abs(loss1))
            paramsN = jax.device_get(stateN.params)
            row["update_err"], row["update_worst"] = _leaf_errors(params1, paramsN, params0)
            row["param_err"], row["param_worst"] = _leaf_errors(params1, paramsN)
            row.update(tol=tol, compared=True, status="ok")
            row["ok"] = max(row["loss_err"], row["update_err"], row["param_err"]) <= tol
            saved[name] = (stateN, shardings)
        except Exception as error:  # a failing mesh is a row; the others still run
            row.update(_failure(error), ok=False, compared=False)
            report.note(f"correctness {name}: {row['error'][:300]}")
        report.add("correctness", row)

    report.table("checkpoint", CHECKPOINT_COLUMNS)
    if not saved:
        report.note("checkpoint: no N-device state to save (every mesh failed)")
        return
    name = next(iter(saved))  # the FSDP state: every array split over the devices
    state, shardings = saved[name]
    one = SingleDeviceSharding(devices[0])
    targets = (("1 device", jax.tree.map(lambda _: one, state)), (f"{len(devices)} devices", shardings))
    with (
        tempfile.TemporaryDirectory() as tmp,
        TrainCheckpointer(Path(tmp) / "ckpt", save_every=1, max_to_keep=1, async_save=False) as ckpt,
    ):
        ckpt.save(state, {"position": 1}, final=True)
        step = int(jax.device_get(state.step))
        for where, target_shardings in targets:
            row = {"mesh": name, "restored_on": where, "step": step}
            try:
                restored, data = ckpt.restore(step, state, shardings=target_shardings)
                pairs = zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True)
                diffs = [_max_abs_diff(x, y) for x, y in pairs]
                placed = {d for x in jax.tree.leaves(restored.params) for d in x.sharding.device_set}
                row.update(equal=max(diffs) == 0.0, max_abs_diff=max(diffs), devices_holding=len(placed))
                row.update(data_state=data, compared=True, status="ok")
            except Exception as error:
                row.update(_failure(error), equal=False, compared=False)
                report.note(f"checkpoint restored on {where}: {row['error'][:300]}")
            report.add("checkpoint", row)


def _max_abs_diff(x: Any, y: Any) -> float:
    """``max |x - y|`` of two arrays of one shape, in float64 (0 for empty arrays)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"restored array has shape {y.shape}, the saved one {x.shape}")
    return float(np.max(np.abs(x - y), initial=0.0))


# ---------------------------------------------------------------------------------------------------------
# Part 2: training scaling
# ---------------------------------------------------------------------------------------------------------
def run_scaling(report: Report, devices: Sequence[Any], a: argparse.Namespace, matmul_rate: float) -> None:
    """Part 2: tokens/s of benchmarks/train.py's model on one device and on each N-device mesh."""
    train_args = argparse.Namespace(tiny=a.small, **dict.fromkeys(("D", "blocks", "heads", "vocab", "S", "chunk_size")))
    resolve_model_arguments(train_args)
    if a.small:
        train_args.blocks = 1  # one block: half the tiny model's compile time
    config = model_config(train_args)
    S, chunk = train_args.S, train_args.chunk_size
    per_device, remat = a.scaling_case
    runtime = RuntimeConfig(prefill_backend="chunkwise", prefill_backend_kwargs=(("chunk_size", chunk),),
                            scan_blocks=a.scan_blocks, remat=remat)  # fmt: skip
    fpt = flops_per_token(config, S, chunk_size=chunk)
    report.set("scaling_model", {**dataclasses.asdict(config), "num_params": config.num_params(), "S": S,
                                 "chunk_size": chunk, "flops_per_token": fpt, "batch_per_device": per_device,
                                 "remat": remat.value, "scan_blocks": a.scan_blocks})  # fmt: skip
    report.table("scaling", SCALING_COLUMNS)
    n = len(devices)
    cases: list[tuple[str, MeshConfig | None, int]] = [("one", None, 1)]
    cases += [(name, mc, n) for name, mc in meshes(devices, config.num_heads).items()]
    base = None
    for name, mesh_config, count in cases:
        B = per_device * count
        row: dict[str, Any] = {"mesh": name, "devices": count, "B": B, "S": S, "remat": remat.value,
                               "dtype": "bfloat16 compute, float32 parameters and AdamW state"}  # fmt: skip
        if mesh_config is not None:
            row["mesh_shape"] = "x".join(map(str, mesh_config.shape(n)))
        try:
            row.update(timed_step(config, runtime, devices[:count], mesh_config, B, S, a), status="ok")
        except Exception as error:
            row.update(_failure(error))
            report.note(f"scaling {name}: {row['error'][:300]}")
            report.add("scaling", row)
            continue
        row["mfu"] = row["tokens_per_s"] * fpt / (count * matmul_rate)
        if mesh_config is None:
            base = row["tokens_per_s"]
        elif base is not None:
            row["efficiency"] = row["tokens_per_s"] / (count * base)
            row["target_met"] = row["efficiency"] >= EFFICIENCY_TARGET
        report.add("scaling", row)


# ---------------------------------------------------------------------------------------------------------
# Part 3: 7B training fit
# ---------------------------------------------------------------------------------------------------------
def run_fit7b(report: Report, devices: Sequence[Any], a: argparse.Namespace, matmul_rate: float) -> None:
    """Part 3: a training step of the xlstm_7b preset (tiny with --small), FSDP over the N devices."""
    if a.small:
        config = xLSTMLMConfig.tiny(num_blocks=1, dtype="bfloat16", param_dtype="float32")
    else:
        config = xLSTMLMConfig.xlstm_7b(param_dtype="float32")  # bf16 compute, float32 weights and AdamW state
    S, chunk = a.fit_seq, a.fit_chunk
    fpt = flops_per_token(config, S, chunk_size=chunk)
    report.set("fit7b_model", {**dataclasses.asdict(config), "num_params": config.num_params(), "S": S,
                               "chunk_size": chunk, "flops_per_token": fpt, "scan_blocks": a.scan_blocks})  # fmt: skip
    report.table("fit7b", FIT_COLUMNS)
    n = len(devices)
    for per_device, remat in a.fit_cases:
        B = per_device * n
        row: dict[str, Any] = {"mesh": f"fsdp{n}", "mesh_shape": f"1x{n}x1", "B": B, "S": S, "remat": remat.value,
                               "dtype": "bfloat16 compute, float32 parameters and AdamW state"}  # fmt: skip
        runtime = RuntimeConfig(prefill_backend="chunkwise", prefill_backend_kwargs=(("chunk_size", chunk),),
                                scan_blocks=a.scan_blocks, remat=remat)  # fmt: skip
        try:
            row.update(timed_step(config, runtime, devices, MeshConfig(data=1, fsdp=n, tensor=1), B, S, a), status="ok")
            row["mfu"] = row["tokens_per_s"] * fpt / (n * matmul_rate)
        except Exception as error:
            row.update(_failure(error))
            report.note(f"fit7b B={B} remat={remat.value}: {row['error'][:300]}")
        row["peak_gib"] = peak_gib(devices)
        report.add("fit7b", row)


# ---------------------------------------------------------------------------------------------------------
# Part 4: decode
# ---------------------------------------------------------------------------------------------------------
def run_decode(report: Report, devices: Sequence[Any], a: argparse.Namespace) -> None:
    """Part 4: tensor-parallel decode over 2 devices (batch 1 and 16) and data-parallel decode at batch 128."""
    preset = "tiny" if a.small else "xlstm_7b"
    config = PRESETS[preset]()
    if a.small:
        config = dataclasses.replace(config, num_blocks=1)
    runtime = RuntimeConfig(step_backend="recurrent") if a.small else RuntimeConfig()
    report.set("decode_model", {"preset": preset, "params": config.num_params(), "dtype": config.dtype,
                                "param_dtype": config.param_dtype, "prompt": DECODE_PROMPT, "tokens": a.tokens,
                                "runtime": repr(runtime)})  # fmt: skip
    report.table("decode", DECODE_COLUMNS)
    n = len(devices)
    cases: list[tuple[str, int, MeshConfig | None, int]] = []  # (mode, devices, mesh, B)
    for B in a.tp_batches:
        cases.append(("one", 1, None, B))
        if n >= 2 and config.num_heads % 2 == 0:
            cases.append(("tensor", 2, MeshConfig(data=1, fsdp=1, tensor=2), B))
        else:
            report.note(f"decode tensor B={B}: needs 2 devices and an even head count (devices={n})")
    cases.append(("one", 1, None, a.dp_batch))
    if n >= 2:
        cases.append(("data", n, MeshConfig(data=n, fsdp=1, tensor=1), a.dp_batch))
    with jax.default_device(devices[0]):
        params = jax.block_until_ready(random_params(config, runtime))
    single: dict[int, float] = {}
    for mode, count, mesh_config, B in cases:
        row: dict[str, Any] = {"case": f"{mode}{count}" if mode != "one" else "one", "mode": mode, "devices": count,
                               "B": B, "dtype": config.dtype, "tokens": a.tokens}  # fmt: skip
        ids = np.asarray(jax.random.randint(jax.random.key(B), (B, DECODE_PROMPT), 0, config.vocab_size))
        try:
            if mesh_config is None:
                weights, context = params, contextlib.nullcontext()
            else:
                mesh = make_mesh(mesh_config, devices[:count])
                row["mesh_shape"] = shape_text(mesh)
                weights, context = shard_params(params, mesh, config), jax.set_mesh(mesh)

            def run(tokens: int, weights: Any = weights, ids: np.ndarray = ids) -> Any:
                out = generate(config, weights, ids, tokens, stop_tokens=(), runtime=runtime)
                return out.tokens, out.num_generated

            with context:
                per_token, facts = decode_per_token(run, a.tokens, a.repeats, False)
            row.update(facts)
            if per_token is None:
                row["status"] = "noise"
                report.note(noise_note(f"decode {row['case']} B={B}", facts))
            else:
                row.update(ms_per_token=per_token * 1e3, tokens_per_s=B / per_token, status="ok")
                if mesh_config is None:
                    single[B] = per_token
                elif B in single:
                    row["speedup"] = single[B] / per_token
        except Exception as error:
            row.update(_failure(error))
            report.note(f"decode {row['case']} B={B}: {row['error'][:300]}")
        report.add("decode", row)


# ---------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the parts asked for; returns the report's data (what ``--json`` writes)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=None, help="use the first N local devices (default: all)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run")
    p.add_argument("--small", action="store_true", help="tiny shapes, one-block tiny models (a CPU check)")
    p.add_argument("--scan-blocks", action="store_true", help="run the blocks under nn.scan (faster compilation)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps after compilation")
    p.add_argument("--scaling-case", type=parse_remat_case, default=None, help="B:remat, B per device (default 8:none)")
    p.add_argument("--fit-cases", nargs="+", type=parse_remat_case, default=None,
                   help="B:remat cases of the 7B step, B per device (default 2:full 2:dots)")  # fmt: skip
    p.add_argument("--fit-seq", type=int, default=None, help="S of the 7B step (default 4096; 32 with --small)")
    p.add_argument("--fit-chunk", type=int, default=None, help="chunk size of the 7B step (256; 16 with --small)")
    p.add_argument("--correctness-batch", type=int, default=1, help="rows per device of the correctness step")
    p.add_argument("--correctness-seq", type=int, default=40, help="S of the correctness step")
    p.add_argument("--correctness-chunk", type=int, default=16, help="chunk size of the correctness step")
    p.add_argument("--tokens", type=int, default=None, help="decode timed at N/2+1 and N tokens (64; 4: --small)")
    p.add_argument("--tp-batches", type=int, nargs="+", default=[1, 16], help="batches of the tensor-parallel decode")
    p.add_argument("--dp-batch", type=int, default=128, help="batch of the data-parallel decode")
    add_arguments(p, repeats=5, ceilings="measured")
    a = p.parse_args(argv)
    available = jax.local_device_count()
    if a.devices is None:
        a.devices = available
    if not 1 <= a.devices <= available:
        p.error(f"--devices must be in [1, {available}] (the local devices), got {a.devices}")
    if a.repeats < 1 or a.warmup < 0:
        p.error(f"--repeats must be >= 1 and --warmup >= 0, got {a.repeats} and {a.warmup}")
    a.scaling_case = a.scaling_case or parse_remat_case("1:none" if a.small else "8:none")
    a.fit_cases = a.fit_cases or [parse_remat_case(c) for c in (("1:full",) if a.small else ("2:full", "2:dots"))]
    a.fit_seq = (32 if a.small else 4096) if a.fit_seq is None else a.fit_seq
    a.fit_chunk = (16 if a.small else 256) if a.fit_chunk is None else a.fit_chunk
    a.tokens = (4 if a.small else 64) if a.tokens is None else a.tokens
    if a.tokens < 2:
        p.error(f"--tokens must be >= 2, got {a.tokens}")
    sizes = {"--correctness-batch": a.correctness_batch, "--correctness-seq": a.correctness_seq,
             "--correctness-chunk": a.correctness_chunk, "--fit-seq": a.fit_seq, "--fit-chunk": a.fit_chunk,
             "--dp-batch": a.dp_batch, "--tp-batches": min(a.tp_batches)}  # fmt: skip
    bad = {name: value for name, value in sizes.items() if value < 1}
    if bad:
        p.error(f"sizes must be positive integers, got {bad}")
    devices = jax.local_devices()[: a.devices]
    settings = {**vars(a), "scaling_case": f"{a.scaling_case[0]}:{a.scaling_case[1].value}",
                "fit_cases": [f"{b}:{r.value}" for b, r in a.fit_cases]}  # fmt: skip
    report = Report("scaling", "benchmarks/scaling.py", settings, a.json, argv)
    report.set("devices", {"used": len(devices), "available": available, "kind": devices[0].device_kind,
                           "platform": devices[0].platform, "jax": jax.__version__,
                           "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE")})  # fmt: skip
    print(f"# {len(devices)} of {available} {devices[0].device_kind} devices; parts {a.parts}", flush=True)
    matmul_rate = None
    if {"scaling", "fit7b"} & set(a.parts):
        with jax.default_device(devices[0]):
            matmul_rate = ceilings_from_arguments(a, report).matmul_flops_per_s
    for part in ORDER:
        if part not in a.parts:
            continue
        start = time.perf_counter()
        if part == "correctness":
            run_correctness(report, devices, a)
        elif part == "scaling":
            run_scaling(report, devices, a, matmul_rate)
        elif part == "fit7b":
            run_fit7b(report, devices, a, matmul_rate)
        else:
            run_decode(report, devices, a)
        report.set(f"{part}_s", time.perf_counter() - start)
    return report.data


if __name__ == "__main__":
    main()
