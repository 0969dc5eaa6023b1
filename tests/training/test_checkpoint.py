"""Checkpoints: bit-exact resume, damaged or partial checkpoints, export to and fine-tuning from Hugging Face."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.fixture import FIXTURE, peer
from tests.numerics import TOL, assert_close
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.hf import load_hf
from xlstm_jax.models.xlstm_parallel.model import xLSTMLMModel
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig
from xlstm_jax.training.checkpoint import DamagedCheckpointWarning, TrainCheckpointer, export_hf
from xlstm_jax.training.init import init_params
from xlstm_jax.training.optim import OptimizerConfig, make_optimizer, make_schedule
from xlstm_jax.training.step import create_train_state, cross_entropy, make_train_step

CONFIG = xLSTMLMConfig.tiny()  # the fixture's architecture, so the fine-tuning test reuses the compiled step
RUNTIME = RuntimeConfig(prefill_backend_kwargs=(("chunk_size", 8),))
OPT = OptimizerConfig(learning_rate=3e-3, warmup_steps=1, total_steps=6)
B, S = 4, 16


@functools.cache
def setup():
    """(model, optimizer, jitted donating step), built once for the module."""
    model = xLSTMLMModel(CONFIG, RUNTIME)
    optimizer = make_optimizer(OPT)
    return model, optimizer, make_train_step(model, optimizer, schedule=make_schedule(OPT))


def batch_at(position: int) -> dict[str, np.ndarray]:
    """The data pipeline's batch at ``position``: packed rows with two documents each and a padded tail."""
    rng = np.random.default_rng(100 + position)
    ids = rng.integers(3, CONFIG.vocab_size, (B, S + 1)).astype(np.int32)
    segments = np.ones((B, S), np.int32)
    segments[:, 9:] = 2
    segments[:, 14:] = 0  # padding
    mask = ((segments != 0) & (np.roll(segments, -1, axis=1) == segments)).astype(np.float32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": segments, "loss_mask": mask}


def fresh_state():
    _, optimizer, _ = setup()
    return create_train_state(init_params(CONFIG, jax.random.PRNGKey(0)), optimizer, jax.random.PRNGKey(1))


def run(state, start: int, stop: int):
    _, _, step = setup()
    losses = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        for position in range(start, stop):
            state, metrics = step(state, batch_at(position))
            losses.append(float(metrics["loss"]))
    return state, losses


def assert_trees_equal(a, b) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight():
    """Six steps without interruption: (state, losses)."""
    return run(fresh_state(), 0, 6)


def test_resume_is_bit_exact(straight, tmp_path):
    state, losses = run(fresh_state(), 0, 3)
    with TrainCheckpointer(tmp_path, save_every=3, max_to_keep=2) as ckpt:
        assert ckpt.save(state, {"position": 3}, final=True)
    del state
    # A new process: the target is only shapes and dtypes.
    _, optimizer, _ = setup()
    target = jax.eval_shape(
        lambda: create_train_state(init_params(CONFIG, jax.random.PRNGKey(0)), optimizer, jax.random.PRNGKey(1))
    )
    with TrainCheckpointer(tmp_path, save_every=3, max_to_keep=2) as ckpt:
        restored, data_state = ckpt.restore_latest(target)
    assert data_state == {"position": 3} and int(restored.step) == 3
    resumed, more = run(restored, data_state["position"], 6)
    state6, losses6 = straight
    assert losses + more == losses6
    assert_trees_equal(resumed, state6)


def test_export_round_trip(straight, tmp_path):
    """The trained model written as a Hugging Face directory loads back to the same function, bit for bit."""
    state, _ = straight
    export_hf(state.params, CONFIG, tmp_path)
    config, params = load_hf(tmp_path)
    assert config == CONFIG
    assert_trees_equal(params, state.params)
    model = xLSTMLMModel(config, RUNTIME)
    ids = jnp.asarray(batch_at(7)["input_ids"][:2, :11])
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(apply({"params": params}, ids), apply({"params": state.params}, ids))


def test_fine_tune_from_hugging_face():
    """Fine-tuning starts from the transformers fixture: its first loss is the loss of transformers' logits."""
    config, params = load_hf(FIXTURE, dtype="float32", param_dtype="float32")
    assert config == CONFIG
    _, optimizer, step = setup()
    ids = peer()["input_ids"][[0, 1, 0, 1], : S + 1]
    mask = np.ones((B, S), np.float32)
    mask[2:, 5:] = 0.0
    batch = {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "segment_ids": np.ones((B, S), np.int32),
        "loss_mask": mask,
    }
    state = create_train_state(params, optimizer, 0)
    losses = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        for _ in range(3):
            state, metrics = step(state, batch)
            losses.append(metrics["loss"])
    logits = jnp.asarray(peer()["logits"][[0, 1, 0, 1], :S])
    total, count = cross_entropy(logits, jnp.asarray(batch["targets"]), jnp.asarray(mask))
    assert_close("first loss", np.asarray(total / count, np.float64), losses[0], TOL["float32-model"])
    assert float(losses[2]) < float(losses[0])  # step 0 has learning rate 0 (warmup); step 1 learns


def small_state(step: int):
    """A small TrainState (no model) whose every leaf depends on ``step``."""
    optimizer = make_optimizer(OPT)
    params = {"dense": {"kernel": jnp.full((3, 5), float(step))}, "norm": {"weight": jnp.arange(4.0) + step}}
    state = create_train_state(params, optimizer, step)
    return state.replace(step=jnp.int32(step))


def save_steps(directory: Path, steps) -> None:
    with TrainCheckpointer(directory, save_every=1, max_to_keep=10) as ckpt:
        for step in steps:
            ckpt.save(small_state(step), {"position": 10 * step})
        ckpt.wait_until_finished()


def damage(directory: Path, step: int, how: str) -> None:
    path = directory / str(step)
    if how == "truncated":
        files = sorted(p for p in (path / "state").rglob("*") if p.is_file() and p.parent.name == "d")
        assert files
        for file in files:
            with open(file, "r+b") as f:
                f.truncate(max(file.stat().st_size // 2, 1))
    elif how == "deleted":
        files = sorted(p for p in (path / "state").rglob("*") if p.is_file() and p.parent.name == "d")
        for file in files:
            file.unlink()
    elif how == "uncommitted":
        (path / "commit_success.txt").unlink()
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated", "deleted", "uncommitted"])
def test_damaged_checkpoint_falls_back(tmp_path, how):
    save_steps(tmp_path, [1, 2, 3])
    damage(tmp_path, 3, how)
    target = jax.eval_shape(lambda: small_state(0))
    with TrainCheckpointer(tmp_path, save_every=1, max_to_keep=10) as ckpt:
        with pytest.warns(DamagedCheckpointWarning, match="checkpoint 3") as record:
            state, data_state = ckpt.restore_latest(target)
        assert ("commit_success" in str(record[0].message)) == (how == "uncommitted")
        assert int(state.step) == 2 and data_state == {"position": 20}
        assert_trees_equal(state, small_state(2))
        assert (tmp_path / "3.damaged").is_dir() and ckpt.all_steps() == [1, 2]
        ckpt.save(small_state(3), {"position": 30}, final=True)  # the step is free again
        assert ckpt.all_steps() == [1, 2, 3]


def test_all_damaged_raises_and_empty_gives_none(tmp_path):
    target = jax.eval_shape(lambda: small_state(0))
    with TrainCheckpointer(tmp_path / "empty", save_every=1, max_to_keep=3) as ckpt:
        assert ckpt.restore_latest(target) is None
    save_steps(tmp_path / "run", [1, 2])
    damage(tmp_path / "run", 1, "uncommitted")
    damage(tmp_path / "run", 2, "truncated")
    with (
        TrainCheckpointer(tmp_path / "run", save_every=1, max_to_keep=3) as ckpt,
        pytest.warns(DamagedCheckpointWarning),
        pytest.raises(ValueError, match="no checkpoint could be restored"),
    ):
        ckpt.restore_latest(target)


def test_save_every_and_max_to_keep(tmp_path):
    with TrainCheckpointer(tmp_path, save_every=2, max_to_keep=2) as ckpt:
        saved = [ckpt.save(small_state(step), {"position": step}) for step in range(1, 8)]
        ckpt.save(small_state(7), {"position": 7}, final=True)
        assert saved == [False, True, False, True, False, True, False]
        assert ckpt.all_steps() == [6, 7]
    with pytest.raises(ValueError, match="save_every"):
        TrainCheckpointer(tmp_path, save_every=0, max_to_keep=1)
    with TrainCheckpointer(tmp_path, save_every=1, max_to_keep=1) as ckpt, pytest.raises(TypeError, match="JSON"):
        ckpt.save(small_state(9), {"x": object()})
