"""The train step: masked cross-entropy, gradient accumulation, dtypes, one compilation, batch checks."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.numerics import TOL, assert_close
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.model import xLSTMLMModel
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig
from xlstm_jax.training.init import init_params
from xlstm_jax.training.optim import OptimizerConfig, make_optimizer, make_schedule
from xlstm_jax.training.step import check_batch, create_train_state, cross_entropy, make_train_step

RUNTIME = RuntimeConfig(prefill_backend_kwargs=(("chunk_size", 8),))  # S=16: two chunks
OPT = OptimizerConfig(learning_rate=1e-3, warmup_steps=2, total_steps=20)
B, S = 4, 16


def make_batch(seed: int, vocab: int = 99) -> dict[str, np.ndarray]:
    """Random tokens; rows 0-1 count few targets, rows 2-3 all, so micro-batches count different numbers."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (B, S + 1)).astype(np.int32)
    mask = np.ones((B, S), np.float32)
    mask[0, 3:] = 0.0
    mask[1, :10] = 0.0
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "segment_ids": np.ones((B, S), np.int32),
        "loss_mask": mask,
    }


def nll_reference(logits, targets, mask) -> tuple[float, float]:
    """The masked cross-entropy sum and count in float64, written out."""
    logits = np.asarray(logits, np.float64)
    total = 0.0
    for b, t in np.ndindex(targets.shape):
        row = logits[b, t]
        total += mask[b, t] * (np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[targets[b, t]])
    return total, float(np.sum(mask))


def test_cross_entropy_matches_hand_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32) * 3
    targets = rng.integers(0, 5, (2, 3)).astype(np.int32)
    mask = np.array([[1, 0, 1], [0, 1, 1]], np.float32)
    total, count = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    want_total, want_count = nll_reference(logits, targets, mask)
    assert total.dtype == jnp.float32 and count.dtype == jnp.float32
    assert float(count) == want_count == 4.0
    assert_close("masked nll sum", np.array(want_total), np.asarray(total), TOL["float32"])
    # Masked positions take no part: changing their logits changes nothing.
    changed = logits.copy()
    changed[0, 1] += 100.0
    changed[1, 0] = -50.0
    assert float(cross_entropy(jnp.asarray(changed), jnp.asarray(targets), jnp.asarray(mask))[0]) == float(total)


def test_cross_entropy_is_stable_for_large_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 4, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (1, 4)).astype(np.int32)
    mask = np.ones((1, 4), np.float32)
    small = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))[0]
    large = cross_entropy(jnp.asarray(logits + 1e4), jnp.asarray(targets), jnp.asarray(mask))[0]
    assert np.isfinite(float(large))
    # Shifting the logits by 1e4 costs their float32 rounding (ulp(1e4) = 1e-3 per logit), nothing more.
    assert abs(float(large) - float(small)) <= 4 * 7 * 1e-3


def test_cross_entropy_shape_errors():
    with pytest.raises(ValueError, match="targets.shape"):
        cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="integer"):
        cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3)), jnp.ones((2, 3)))


def loss_reference(logits, targets, mask, cap) -> tuple[float, np.ndarray]:
    """The masked cross-entropy sum of ``cap * tanh(logits / cap)`` (or of the logits, cap None) and its gradient in
    the logits, in float64 from the equations: (softmax(z) - onehot(target)) * mask * dz/dlogits."""
    x = np.asarray(jnp.asarray(logits, jnp.float32), np.float64)
    z = x if cap is None else cap * np.tanh(x / cap)
    shift = z.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(z - shift).sum(axis=-1, keepdims=True)) + shift
    onehot = np.arange(x.shape[-1]) == targets[..., None]
    nll = (log_z - z)[onehot].reshape(targets.shape)
    slope = np.ones_like(x) if cap is None else 1 - np.tanh(x / cap) ** 2
    grad = (np.exp(z - log_z) - onehot) * slope * mask[..., None]
    return float(np.sum(nll * mask)), grad


@pytest.mark.parametrize("cap", [None, 30.0, 100.0])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_entropy_and_gradient_match_float64(cap, dtype):
    """The loss and its gradient in the logits against float64 (loss_reference), soft-capped at 30 (one pass:
    shifted by the cap), at 100 (above CAP_SHIFT_MAX: shifted by the max) and uncapped; random logits of odd
    width with extremes (+-300 and +-1e4, which the cap saturates), masked positions, under jit; bf16 logits get
    a bf16 gradient."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(3, 5, 257)) * 8
    logits[0, 0, :4] = [300.0, -300.0, 1e4, -1e4]
    logits[2, 3, 100] = 1e4  # the target below
    targets = rng.integers(0, 257, (3, 5)).astype(np.int32)
    targets[2, 3] = 100
    mask = (rng.random((3, 5)) > 0.3).astype(np.float32)
    x = jnp.asarray(logits, dtype)
    fn = jax.jit(lambda x: cross_entropy(x, jnp.asarray(targets), jnp.asarray(mask), soft_cap=cap))
    (total, count), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(x)
    want, want_grad = loss_reference(x, targets, mask, cap)
    assert float(count) == float(mask.sum()) and total.dtype == jnp.float32 and grad.dtype == x.dtype
    assert_close("masked loss sum", np.array(want), np.asarray(total), TOL["float32-loss"], scale=abs(want))
    tol = TOL["float32-loss"] if dtype == "float32" else TOL["bfloat16-loss-grad"]
    assert_close("d loss / d logits", want_grad, grad, tol)


def test_cross_entropy_argument_errors():
    x, targets, mask = jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3))
    for cap in (0.0, -1.0, float("inf"), float("nan"), True, "30"):
        with pytest.raises(ValueError, match="soft_cap must be None or a positive finite number"):
            cross_entropy(x, targets, mask, soft_cap=cap)
    with pytest.raises(ValueError, match="logits must be floating"):
        cross_entropy(jnp.zeros((2, 3, 5), jnp.int32), targets, mask)


def test_step_loss_is_the_capped_logits_loss(float32_steps):
    """The step reads the model's raw logits and caps them inside the loss: its loss equals the cross-entropy of
    the model's (capped, float32) logits."""
    model, params, optimizer, one, _ = float32_steps
    batch = make_batch(3)
    _, metrics = one(create_train_state(params, optimizer, 0), batch)
    logits = model.apply({"params": params}, jnp.asarray(batch["input_ids"]))
    want, count = nll_reference(logits, batch["targets"], batch["loss_mask"])
    assert_close("step loss", np.array(want / count), np.asarray(metrics["loss"]), TOL["float32-model"])


def test_check_batch_errors():
    batch = make_batch(0)
    with pytest.raises(ValueError, match="loss_mask"):
        check_batch({k: v for k, v in batch.items() if k != "loss_mask"}, 1)
    with pytest.raises(ValueError, match="accum_steps=3"):
        check_batch(batch, 3)
    with pytest.raises(TypeError, match="targets"):
        check_batch({**batch, "targets": batch["targets"].astype(np.float32)}, 1)
    with pytest.raises(ValueError, match="shapes"):
        check_batch({**batch, "segment_ids": batch["segment_ids"][:, :5]}, 1)
    with pytest.raises(ValueError, match="accum_steps"):
        make_train_step(xLSTMLMModel(xLSTMLMConfig.tiny()), make_optimizer(OPT), accum_steps=0)


@pytest.fixture(scope="module")
def float32_steps():
    """(model, params, optimizer, step with accum 1, step with accum 2) of the float32 tiny model."""
    config = xLSTMLMConfig.tiny()
    model = xLSTMLMModel(config, RUNTIME)
    optimizer = make_optimizer(OPT)
    params = init_params(config, jax.random.PRNGKey(0))
    one = make_train_step(model, optimizer, schedule=make_schedule(OPT), donate=False)
    two = make_train_step(model, optimizer, schedule=make_schedule(OPT), accum_steps=2, donate=False)
    return model, params, optimizer, one, two


def test_accumulation_equals_one_batch(float32_steps):
    """Two micro-batches of 2 rows (counting 13 and 32 tokens) give the step of one batch of 4 rows."""
    _, params, optimizer, one, two = float32_steps
    state = create_train_state(params, optimizer, 0)
    batch = make_batch(2)
    state_one, metrics_one = one(state, batch)
    state_two, metrics_two = two(state, batch)
    for key in ("loss", "grad_norm"):
        assert_close(key, np.asarray(metrics_one[key], np.float64), metrics_two[key], TOL["float32-model"])
    assert float(metrics_one["tokens"]) == float(metrics_two["tokens"]) == float(batch["loss_mask"].sum())
    state_one, _ = one(state_one, batch)  # a second step: the first has learning rate 0 (warmup)
    state_two, _ = two(state_two, batch)
    # One scale for the whole tree (the largest parameter): tensors that start at zero (the gate kernels) hold
    # only Adam's first updates, lr * g / (|g| + eps), whose float32 differences would dominate a per-tensor scale.
    flat_one = np.concatenate([np.ravel(x) for x in jax.tree.leaves(state_one.params)]).astype(np.float64)
    flat_two = np.concatenate([np.ravel(x) for x in jax.tree.leaves(state_two.params)])
    assert_close("parameters after two steps", flat_one, flat_two, TOL["float32-model"])


def test_bfloat16_compute_float32_state_one_compilation():
    """The default mixed precision: bf16 compute, float32 parameters, optimiser state, loss; one compilation."""
    config = xLSTMLMConfig.tiny(dtype="bfloat16", param_dtype="float32")
    optimizer = make_optimizer(OPT)
    state = create_train_state(init_params(config, jax.random.PRNGKey(3)), optimizer, jax.random.PRNGKey(4))
    step = make_train_step(xLSTMLMModel(config, RUNTIME), optimizer, schedule=make_schedule(OPT))
    schedule = make_schedule(OPT)
    rng = np.asarray(state.rng)  # the state is donated: keep a host copy
    losses = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        for i in range(4):
            state, metrics = step(state, make_batch(10 + i))
            losses.append(float(metrics["loss"]))
            assert float(metrics["learning_rate"]) == float(schedule(i))
    assert step._cache_size() == 1
    assert int(state.step) == 4
    np.testing.assert_array_equal(state.rng, rng)
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    assert all(np.isfinite(losses)) and metrics["loss"].dtype == jnp.float32
