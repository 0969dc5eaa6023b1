"""The training loop: interruption and resume lose nothing, the validation loss is the held-out loss, the
metric records hold what they say, and the exported model loads with load_hf."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.numerics import TOL
from tests.training import tiny_run
from xlstm_jax.models.xlstm_parallel.hf import load_hf
from xlstm_jax.models.xlstm_parallel.model import xLSTMLMModel
from xlstm_jax.training.checkpoint import TrainCheckpointer
from xlstm_jax.training.config import DataConfig, TrainConfig
from xlstm_jax.training.data import make_batch_iterator
from xlstm_jax.training.flops import flops_per_token
from xlstm_jax.training.loop import METRICS_NAME, PeakRate, train
from xlstm_jax.training.optim import OptimizerConfig, make_schedule
from xlstm_jax.training.step import cross_entropy

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

STEPS = 4
INTERRUPT_AT = 3


class _Interrupt:
    """An on_record callback that presses Ctrl-C when the training record of step INTERRUPT_AT arrives."""

    def __call__(self, record):
        if record["kind"] == "train" and record["step"] == INTERRUPT_AT:
            raise KeyboardInterrupt


def _config(tmp, name, **changes) -> TrainConfig:
    return TrainConfig(
        model="tiny",
        model_overrides=tiny_run.MODEL_OVERRIDES,
        data=DataConfig(
            kind="text",
            paths=(str(tmp / "corpus"),),
            seq_len=tiny_run.SEQ_LEN,
            batch_size=tiny_run.BATCH_SIZE,
            validation_fraction=tiny_run.VALIDATION_FRACTION,
        ),
        optimizer=OptimizerConfig(**tiny_run.OPTIMIZER),
        steps=STEPS,
        log_every=1,
        eval_every=2,
        eval_batches=2,
        checkpoint_dir=str(tmp / name / "checkpoints"),
        checkpoint_every=100,  # only the interruption and the end save
        log_dir=str(tmp / name / "logs"),
        **changes,
    )


def _jsonl(config: TrainConfig) -> list[dict]:
    with open(f"{config.log_dir}/{METRICS_NAME}") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run; a run interrupted at step 3 (what it left on disk); its resumption to step 4."""
    tmp = tmp_path_factory.mktemp("loop")
    tiny_run.write_corpus(tmp / "corpus")
    whole = train(_config(tmp, "whole"), progress=False)

    parted = _config(tmp, "parted")
    with pytest.raises(KeyboardInterrupt):
        train(parted, progress=False, on_record=_Interrupt())
    with TrainCheckpointer(parted.checkpoint_dir, save_every=1, max_to_keep=1) as ckpt:
        saved_steps = ckpt.all_steps()
    left = _jsonl(parted)

    resumed_config = parted.replace(resume=True, export_hf=str(tmp / "hf"))
    resumed = train(resumed_config, progress=False)
    return {"whole": whole, "saved_steps": saved_steps, "left": left, "resumed": resumed, "config": resumed_config}


def _losses(records):
    return [(r["kind"], r["step"], r["loss"]) for r in records]


def test_interruption_saves_the_last_step_and_the_metrics(runs):
    assert runs["saved_steps"] == [INTERRUPT_AT]
    assert [(r["kind"], r["step"]) for r in runs["left"]] == [
        ("train", 1),
        ("train", 2),
        ("validation", 2),
        ("train", 3),
    ]


def test_resumed_run_continues_exactly(runs):
    """Interrupted at step 3 and resumed, the run computes what the uninterrupted run did: the same losses at
    every step (the same data position, the same state) and the same final parameters, bit for bit."""
    resumed, whole = runs["resumed"], runs["whole"]
    assert (resumed.start_step, resumed.step) == (INTERRUPT_AT, STEPS)
    assert _losses(runs["left"] + resumed.records) == _losses(whole.records)
    leaves = zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(whole.state.params), strict=True)
    assert all(np.array_equal(a, b) for a, b in leaves)
    assert _jsonl(runs["config"]) == runs["left"] + resumed.records  # appended, nothing lost


def test_validation_loss_is_the_loss_on_the_held_out_documents(runs):
    """The last validation record equals the masked next-token loss of the trained model on the first
    eval_batches batches of the validation split, computed here with the model directly."""
    config, result = runs["config"], runs["resumed"]
    source = config.data.source(result.model_config)
    it = make_batch_iterator(
        source,
        seq_len=config.data.seq_len,
        global_batch_size=config.data.batch_size,
        shuffle=False,
        num_epochs=1,
        split="validation",
        validation_fraction=config.data.validation_fraction,
        num_threads=0,
        prefetch=0,
    )
    batches = [next(it) for _ in range(config.eval_batches)]
    it.close()
    model = xLSTMLMModel(result.model_config)
    apply = jax.jit(lambda params, ids, segments: model.apply({"params": params}, ids, segment_ids=segments))
    params = jax.device_get(result.state.params)
    total = count = 0.0
    for batch in batches:  # the log-softmax in float64 from the model's float32 logits
        logits = np.asarray(apply(params, batch["input_ids"], batch["segment_ids"])).astype(np.float64)
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        target = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        total += float(((log_z - target) * batch["loss_mask"]).sum())
        count += float(batch["loss_mask"].sum())
    record = result.validation_records[-1]
    assert record["step"] == STEPS and record["tokens"] == count
    assert abs(record["loss"] - total / count) <= TOL["float32"].max_err * total / count


def test_train_records_hold_what_they_say(runs):
    result, config = runs["resumed"], runs["config"]
    schedule = make_schedule(config.optimizer_config)
    fpt = flops_per_token(result.model_config, config.data.seq_len)
    assert result.flops_per_token == fpt
    assert isinstance(result.peak, PeakRate) and result.peak.source == "CPU float32 matmul, measured"
    first = runs["whole"].train_records[0]
    assert first["tokens_per_s"] is None and first["compile_s"] > 0  # the compiling step is not timed as training
    for r in runs["whole"].train_records[1:] + result.train_records:
        assert set(r) >= {"loss", "grad_norm", "learning_rate", "tokens_per_s", "mfu"}
        assert np.isfinite(r["loss"]) and r["loss"] > 0 and r["grad_norm"] > 0
        # the rate of the step's update: the schedule at the step count before it
        np.testing.assert_allclose(r["learning_rate"], float(schedule(r["step"] - 1)), rtol=1e-6)
        if r["tokens_per_s"] is not None:
            assert r["tokens_per_s"] > 0
            np.testing.assert_allclose(r["mfu"], fpt * r["tokens_per_s"] / result.peak.flops_per_s, rtol=1e-12)


def test_export_hf_loads_with_load_hf(runs):
    config, params = load_hf(runs["config"].export_hf)
    assert config == runs["resumed"].model_config
    trained = jax.tree_util.tree_leaves_with_path(jax.device_get(runs["resumed"].state.params))
    loaded = dict(jax.tree_util.tree_leaves_with_path(params))
    assert len(loaded) == len(trained)
    for path, value in trained:
        assert np.array_equal(loaded[path], value), jax.tree_util.keystr(path)


def test_fine_tuning_starts_from_the_hugging_face_weights(tmp_path):
    """With a Hugging Face directory as the model, the first step's loss is that directory's model's loss on
    the first batch (the step reports the loss before its update), and the export holds the updated weights."""
    tiny_run.write_corpus(tmp_path / "corpus")
    hf_dir = FIXTURES / "xlstm_tiny"
    config = TrainConfig(
        model=str(hf_dir),
        data=DataConfig(
            kind="text",
            paths=(str(tmp_path / "corpus"),),
            tokenizer=str(hf_dir / "tokenizer.json"),
            seq_len=tiny_run.SEQ_LEN,
            batch_size=tiny_run.BATCH_SIZE,
            validation_fraction=tiny_run.VALIDATION_FRACTION,
        ),
        optimizer=OptimizerConfig(**{**tiny_run.OPTIMIZER, "warmup_steps": 0}),  # a first update at the full rate
        steps=1,
        eval_every=0,
        log_every=1,
        export_hf=str(tmp_path / "tuned"),
    )
    result = train(config, progress=False)

    model_config, params = load_hf(hf_dir)
    assert result.model_config == model_config
    it = make_batch_iterator(
        config.data.source(model_config),
        seq_len=config.data.seq_len,
        global_batch_size=config.data.batch_size,
        seed=config.seed,
        validation_fraction=config.data.validation_fraction,
        vocab_size=model_config.vocab_size,
        prefetch=0,
    )
    batch = next(it)
    it.close()
    model = xLSTMLMModel(model_config)
    logits = jax.jit(lambda p, ids, segment_ids: model.apply({"params": p}, ids, segment_ids=segment_ids))(
        params, batch["input_ids"], batch["segment_ids"]
    )  # jitted: eager Flax dispatch compiles op by op
    total, count = cross_entropy(logits, batch["targets"], batch["loss_mask"])
    expected = float(total / count)
    assert abs(result.train_records[0]["loss"] - expected) <= TOL["float32"].max_err * expected

    _, tuned = load_hf(config.export_hf)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(params), strict=True)]
    assert any(changed)
