"""The training loop: from a :class:`~xlstm_jax.training.config.TrainConfig` to a trained, checkpointed model.

:func:`train` checks the config (:meth:`TrainConfig.validate`, before anything is built), then::

    mesh (make_mesh) -> data (make_batch_iterator: the training split and a fixed set of validation batches)
    -> model and parameters (init_params on their shards, or load_hf to fine-tune) -> TrainState
    -> restore the newest checkpoint (resume) -> jitted train_step, step after step
    -> every log_every steps: metrics to the progress bar, metrics.jsonl and TensorBoard
    -> every eval_every steps and at the end: the validation loss
    -> every checkpoint_every steps and at the end: a checkpoint (TrainCheckpointer)
    -> at the end: export_hf on request

**Metrics.** A training record holds the step, the mean ``loss`` of the steps since the last record, the last
step's ``grad_norm`` and ``learning_rate``, ``tokens_per_s`` (rows x S per step over the wall time of those
steps; the first step, which compiles, is timed apart as ``compile_s``) and ``mfu``. A validation record holds
the loss over the validation batches (``sum of token losses / counted tokens``). ``metrics.jsonl`` in the log
folder gets one JSON object per record, written and flushed at once; TensorBoard gets ``train/<name>`` and
``validation/loss`` scalars (``tensorboardX``, imported only when a log folder is given).

**MFU** is ``flops_per_token(model, S) x tokens/s / (devices x peak FLOP/s of one device)``
(:func:`xlstm_jax.training.flops.flops_per_token`: model FLOPs, recomputation not counted). The peak of one
device (:func:`peak_flops`), which the progress bar names: ``TrainConfig.peak_flops`` where given; else the
table :data:`PEAK_FLOPS` by device kind (the H100 and H200 entry is the bf16 matrix rate that BENCHMARKS.md
uses as the ceiling); on a CPU, a float32 matrix-product rate measured at the start of the run. Elsewhere MFU
is left out.

**Interruption.** On Ctrl-C (or any error) after the first step, the newest completed state is saved as a
checkpoint (where a checkpoint folder is given) before the exception propagates, and the metrics written so far
are on disk, so ``resume`` continues from there with the same data position.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.training.config import TrainConfig
from xlstm_jax.training.step import TrainState

__all__ = ["PEAK_FLOPS", "MetricsLog", "PeakRate", "TrainResult", "measure_matmul_flops", "peak_flops", "train"]

logger = logging.getLogger(__name__)

# Peak FLOP/s of one device by a part of its ``device_kind``: the bf16 matrix rate that BENCHMARKS.md takes as
# the H200's ceiling (its scripts measure 630-708 TFLOP/s); the H100 is the same chip at the same clocks.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (("H200", 700e12), ("H100", 700e12))

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "train_config.json"


@dataclass(frozen=True)
class PeakRate:
    """The peak FLOP/s of one device that MFU is measured against, and where the figure comes from."""

    flops_per_s: float
    source: str

    @property
    def label(self) -> str:
        """E.g. ``"700 TFLOP/s (H200 bf16, BENCHMARKS.md)"``."""
        value, unit = (
            (self.flops_per_s / 1e12, "TFLOP/s") if self.flops_per_s >= 1e12 else (self.flops_per_s / 1e9, "GFLOP/s")
        )
        return f"{value:.3g} {unit} ({self.source})"


@functools.lru_cache
def measure_matmul_flops(n: int = 512, chain: int = 8, repeats: int = 3) -> float:
    """The float32 matrix-product rate of the default device, FLOP/s: the best of ``repeats`` timed runs of a
    jitted chain of ``chain`` dependent (n, n) products (``2 n³`` FLOPs each), after one compiling run.
    Measured once per process and set of arguments."""
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / math.sqrt(n)

    @jax.jit
    def product_chain(x: jax.Array) -> jax.Array:
        for _ in range(chain):  # each product needs the previous one: none can be merged or skipped
            x = jnp.dot(x, b, precision=jax.lax.Precision.HIGHEST)
        return x

    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    jax.block_until_ready(product_chain(x))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(product_chain(x))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * chain / best


def peak_flops(given: float | None = None, device: Any = None) -> PeakRate | None:
    """The peak FLOP/s of one device for MFU: ``given``; else :data:`PEAK_FLOPS` by the device's kind; else on
    a CPU :func:`measure_matmul_flops`; else None (MFU is not reported).

    Args:
        given: A figure to use as it is (``TrainConfig.peak_flops``).
        device: The device (None: ``jax.devices()[0]``).
    """
    if given is not None:
        return PeakRate(float(given), "given")
    device = jax.devices()[0] if device is None else device
    for part, rate in PEAK_FLOPS:
        if part in device.device_kind:
            return PeakRate(rate, f"{part} bf16, BENCHMARKS.md")
    if device.platform == "cpu":
        return PeakRate(measure_matmul_flops(), "CPU float32 matmul, measured")
    return None


class MetricsLog:
    """Writes metric records to ``<log_dir>/metrics.jsonl`` (one JSON object a line, flushed at once) and as
    TensorBoard scalars (``<kind>/<name>`` at the record's step). With ``log_dir=None`` it only keeps them.

    Each record is a dict with ``kind`` (``"train"`` or ``"validation"``), ``step`` and numbers; others (None,
    strings) go to the JSONL file only.

    Attributes:
        records: Every record written, in order.
    """

    def __init__(self, log_dir: str | Path | None) -> None:
        self.records: list[dict[str, Any]] = []
        self._file = None
        self._writer = None
        if log_dir is not None and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            log_dir = Path(log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
            self._file = (log_dir / METRICS_NAME).open("a", encoding="utf-8")
            self._writer = SummaryWriter(str(log_dir))

    def write(self, record: Mapping[str, Any]) -> None:
        """Appends ``record`` to the file and to TensorBoard, and flushes both."""
        record = dict(record)
        self.records.append(record)
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in record.items():
            if name not in ("kind", "step") and isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(f"{record['kind']}/{name}", value, record["step"])
        self._writer.flush()

    def close(self) -> None:
        """Closes the file and the TensorBoard writer."""
        if self._file is not None:
            self._file.close()
            self._writer.close()
            self._file = self._writer = None


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model_config: The trained model's architecture.
        state: The final ``TrainState`` (its ``params`` on the run's mesh).
        start_step: The step the run started from (0, or the restored checkpoint's).
        records: Every metric record of this run (training and validation), as in ``metrics.jsonl``.
        flops_per_token: Model FLOPs of one trained token.
        peak: The per-device peak that MFU was measured against (None: MFU not reported).
    """

    model_config: xLSTMLMConfig
    state: TrainState
    start_step: int
    records: list[dict[str, Any]]
    flops_per_token: float
    peak: PeakRate | None

    @property
    def step(self) -> int:
        """The step the run ended at."""
        return int(jax.device_get(self.state.step))

    @property
    def train_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == "train"]

    @property
    def validation_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == "validation"]


def _validation_batches(config: TrainConfig, source: Any, vocab_size: int) -> list[dict[str, np.ndarray]]:
    """The first ``eval_batches`` batches of the validation split, in corpus order (the same every time)."""
    from xlstm_jax.training.data import make_batch_iterator

    data = config.data
    with make_batch_iterator(
        source,
        seq_len=data.seq_len,
        global_batch_size=data.batch_size,
        seed=config.seed,
        shuffle=False,
        num_epochs=1,
        split="validation",
        validation_fraction=data.validation_fraction,
        vocab_size=vocab_size,
        num_threads=data.num_threads,
        prefetch=0,
    ) as it:
        batches = []
        for batch in it:
            batches.append(batch)
            if len(batches) == config.eval_batches:
                break
    return batches


def _is_deleted(state: TrainState) -> bool:
    """Whether a leaf of ``state`` was donated to a step that did not return (it cannot be saved)."""
    return any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state))


class _Programs(NamedTuple):
    """The jitted functions of a run (see :func:`_programs`)."""

    abstract: TrainState
    shardings: TrainState
    init: Callable[[jax.Array], TrainState]
    init_from: Callable[[Any], TrainState]
    train_step: Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]
    eval_step: Callable[[Any, Mapping[str, jax.Array]], tuple[jax.Array, jax.Array]]


@functools.lru_cache(maxsize=8)
def _programs(
    model_config: xLSTMLMConfig, runtime: Any, optimizer_config: Any, accum_steps: int, seed: int, mesh: Any
) -> _Programs:
    """The state's shapes and shardings and the jitted initialisation, train step and validation step of a run.

    Kept for the process (per model, runtime, optimiser, accumulation, seed and mesh, all hashable), so that a
    later run with the same settings, e.g. one that resumes in the same process, reuses their compilations.
    """
    from xlstm_jax.models.xlstm_parallel.model import xLSTMLMModel
    from xlstm_jax.models.xlstm_parallel.sharding import batch_sharding
    from xlstm_jax.training.init import init_params
    from xlstm_jax.training.optim import make_optimizer, make_schedule
    from xlstm_jax.training.step import create_train_state, make_train_step, model_loss, train_state_shardings

    model = xLSTMLMModel(model_config, runtime)
    optimizer = make_optimizer(optimizer_config)

    def fresh(key: jax.Array) -> TrainState:
        return create_train_state(init_params(model_config, key, scan_blocks=runtime.scan_blocks), optimizer, seed)

    def start_from(params: Any) -> TrainState:
        return create_train_state(params, optimizer, seed)

    abstract = jax.eval_shape(fresh, jax.random.key(seed))
    shardings = train_state_shardings(abstract, model_config, mesh, optimizer)
    batch_sh = batch_sharding(mesh)
    train_step = make_train_step(
        model,
        optimizer,
        schedule=make_schedule(optimizer_config),
        accum_steps=accum_steps,
        state_shardings=shardings,
        batch_sharding=batch_sh,
    )

    @partial(jax.jit, in_shardings=(shardings.params, batch_sh))
    def eval_step(params: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return model_loss(model, params, batch)  # train_step's loss

    return _Programs(
        abstract,
        shardings,
        jax.jit(fresh, out_shardings=shardings),
        jax.jit(start_from, out_shardings=shardings),
        train_step,
        eval_step,
    )


def train(
    config: TrainConfig,
    *,
    progress: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Runs the training that ``config`` describes (see the module docstring).

    Args:
        config: The run's settings; checked with ``config.validate()`` before anything is built.
        progress: Show a progress bar (tqdm, on stderr) with the loss, tokens/s and MFU.
        on_record: Called with each metric record as it is written (e.g. to print it).

    Returns:
        A :class:`TrainResult`: the model config, the final state, and the metric records.

    Raises:
        ValueError: a bad setting (every one listed, before anything is built) or data that turns out bad
            while it is read (a token id out of range, an empty validation split).

    Example:
        >>> config = TrainConfig(model="tiny", data=DataConfig(kind="stdlib", seq_len=128), steps=300,
        ...                      checkpoint_dir="ckpt", log_dir="logs")
        >>> result = train(config)
        >>> result.validation_records[-1]["loss"]
    """
    config.validate()

    from tqdm.auto import tqdm

    from xlstm_jax.models.xlstm_parallel.hf import load_hf
    from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig
    from xlstm_jax.models.xlstm_parallel.sharding import make_mesh
    from xlstm_jax.training.checkpoint import TrainCheckpointer, export_hf
    from xlstm_jax.training.data import make_batch_iterator, to_global_batch
    from xlstm_jax.training.flops import flops_per_token

    data = config.data
    mesh = make_mesh(config.mesh)
    hf_params = None
    if config.is_preset:
        model_config = config.model_config()
    else:  # fine-tuning: the directory's config as load_hf reads it (a tied head may load untied)
        overrides = {"param_dtype": "float32", **dict(config.model_overrides)}
        model_config, hf_params = load_hf(config.model, scan_blocks=config.scan_blocks, **overrides)
    runtime = RuntimeConfig(
        remat=config.remat,
        scan_blocks=config.scan_blocks,
        prefill_backend_kwargs=(("backward", config.mlstm_backward),),
    )

    source = data.source(model_config)
    eval_batches = _validation_batches(config, source, model_config.vocab_size) if config.eval_every else []
    train_it = make_batch_iterator(
        source,
        seq_len=data.seq_len,
        global_batch_size=data.batch_size,
        seed=config.seed,
        validation_fraction=data.validation_fraction,
        vocab_size=model_config.vocab_size,
        num_threads=data.num_threads,
    )

    programs = _programs(model_config, runtime, config.optimizer_config, config.accum_steps, config.seed, mesh)
    log = MetricsLog(config.log_dir)
    checkpointer = None
    if config.checkpoint_dir is not None:
        checkpointer = TrainCheckpointer(
            config.checkpoint_dir, save_every=config.checkpoint_every, max_to_keep=config.checkpoint_keep
        )
    bar = state = None
    try:
        if config.resume:  # the checkpoint's arrays go straight onto their shards: nothing is initialised
            restored = checkpointer.restore_latest(programs.abstract, shardings=programs.shardings)
            if restored is None:
                raise ValueError(f"resume: no checkpoint in {config.checkpoint_dir}")
            state, data_state = restored
            if "train" in data_state:
                train_it.set_state(data_state["train"])
        elif hf_params is None:
            state = programs.init(jax.random.key(config.seed))
        else:
            state = programs.init_from(hf_params)
        del hf_params
        start_step = int(jax.device_get(state.step))
        if config.log_dir is not None and jax.process_index() == 0:
            (Path(config.log_dir) / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")

        train_step, eval_step = programs.train_step, programs.eval_step
        fpt = flops_per_token(model_config, data.seq_len)
        peak = peak_flops(config.peak_flops)
        tokens_per_step = data.batch_size * data.seq_len
        devices = mesh.devices.size

        def record(values: dict[str, Any]) -> None:
            log.write(values)
            if on_record is not None:
                on_record(values)

        def evaluate(step: int) -> None:
            total = count = 0.0
            for batch in eval_batches:
                loss_sum, tokens = eval_step(state.params, to_global_batch(batch, mesh))
                total, count = total + float(loss_sum), count + float(tokens)
            if count == 0:
                raise ValueError("the validation batches hold no counted token; raise data.validation_fraction")
            record({"kind": "validation", "step": step, "loss": total / count, "tokens": int(count)})

        desc = "train" if peak is None else f"train (MFU of {peak.label})"
        bar = tqdm(total=config.steps, initial=start_step, desc=desc, unit="step", disable=not progress, leave=True)
        with jax.set_mesh(mesh):
            pending: list[dict[str, jax.Array]] = []
            compile_s = None
            window_start = time.perf_counter()
            for step in range(start_step, config.steps):
                batch = to_global_batch(next(train_it), mesh)
                state, metrics = train_step(state, batch)
                done = step + 1
                if step == start_step:  # the first step compiles: timed apart
                    jax.block_until_ready(metrics)
                    compile_s = time.perf_counter() - window_start
                    window_start = time.perf_counter()
                    pending = [metrics]
                    timed_steps = 0
                else:
                    pending.append(metrics)
                    timed_steps += 1
                last = done == config.steps
                if done % config.log_every == 0 or last:
                    fetched = jax.device_get(pending)
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = timed_steps * tokens_per_step / elapsed if timed_steps else None
                    values = {
                        "kind": "train",
                        "step": done,
                        "loss": float(np.mean([m["loss"] for m in fetched])),
                        "grad_norm": float(fetched[-1]["grad_norm"]),
                        "learning_rate": float(fetched[-1]["learning_rate"]),
                        "tokens_per_s": tokens_per_s,
                        "mfu": None
                        if peak is None or tokens_per_s is None
                        else fpt * tokens_per_s / (devices * peak.flops_per_s),
                    }
                    if compile_s is not None:
                        values["compile_s"] = compile_s
                        compile_s = None
                    record(values)
                    postfix = f"loss {values['loss']:.3f}"
                    if tokens_per_s is not None:
                        postfix += f", {tokens_per_s:,.0f} tok/s"
                    if values["mfu"] is not None:
                        postfix += f", MFU {values['mfu']:.2%}"
                    bar.set_postfix_str(postfix, refresh=False)
                    pending, timed_steps, window_start = [], 0, time.perf_counter()
                if config.eval_every and (done % config.eval_every == 0 or last):
                    evaluate(done)
                    window_start = time.perf_counter()  # the validation is not training time
                if checkpointer is not None:
                    checkpointer.save(state, {"train": train_it.get_state()}, final=last)
                bar.update(1)
            if config.export_hf is not None:
                export_hf(state.params, model_config, config.export_hf)
    except BaseException:
        saveable = state is not None and not _is_deleted(state) and int(jax.device_get(state.step)) > 0
        if checkpointer is not None and saveable:
            logger.warning("saving the newest completed state (step %d) before stopping", int(state.step))
            checkpointer.save(state, {"train": train_it.get_state()}, final=True)
        raise
    finally:
        if bar is not None:
            bar.close()
        log.close()
        train_it.close()
        if checkpointer is not None:
            checkpointer.close()
    return TrainResult(model_config, state, start_step, log.records, fpt, peak)
