"""The optimiser: config checks, schedule values at key steps, the weight-decay mask, clipping before AdamW."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.numerics import TOL, assert_close
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.training.init import init_params
from xlstm_jax.training.optim import OptimizerConfig, decay_mask, make_optimizer, make_schedule
from xlstm_jax.training.step import global_norm


@pytest.mark.parametrize(
    ("changes", "error", "field"),
    [
        ({"learning_rate": 0.0}, ValueError, "learning_rate"),
        ({"learning_rate": "1e-3"}, TypeError, "learning_rate"),
        ({"total_steps": 0}, ValueError, "total_steps"),
        ({"total_steps": 10.0}, TypeError, "total_steps"),
        ({"warmup_steps": 11, "total_steps": 10}, ValueError, "warmup_steps"),
        ({"schedule": "linear"}, ValueError, "schedule"),
        ({"schedule": "wsd", "total_steps": 10, "warmup_steps": 9, "decay_fraction": 0.5}, ValueError, "warmup_steps"),
        ({"decay_fraction": 0.0}, ValueError, "decay_fraction"),
        ({"min_lr_ratio": 1.5}, ValueError, "min_lr_ratio"),
        ({"b2": 1.0}, ValueError, "b2"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"clip_norm": 0.0}, ValueError, "clip_norm"),
        ({"clip_norm": float("nan")}, TypeError, "clip_norm"),
        ({"decay_embedding": 1}, TypeError, "decay_embedding"),
    ],
)
def test_config_errors_name_the_field(changes, error, field):
    with pytest.raises(error, match=field):
        OptimizerConfig(**changes)


def test_config_is_hashable_and_replace_checks():
    config = OptimizerConfig()
    assert hash(config) == hash(OptimizerConfig())
    with pytest.raises(ValueError, match="learning_rate"):
        config.replace(learning_rate=-1.0)


def _values(config: OptimizerConfig, steps: list[int]) -> np.ndarray:
    schedule = make_schedule(config)
    return np.array([float(schedule(jnp.int32(s))) for s in steps])


def test_cosine_schedule():
    peak, low = 1e-3, 0.1
    config = OptimizerConfig(learning_rate=peak, warmup_steps=10, total_steps=110, min_lr_ratio=low)
    steps = [0, 5, 10, 35, 60, 110, 500]

    def expected(t: int) -> float:
        if t < 10:
            return peak * t / 10
        progress = min(t - 10, 100) / 100
        return peak * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress)))

    assert_close("cosine schedule", np.array([expected(t) for t in steps]), _values(config, steps), TOL["float32"])
    assert _values(config, [0])[0] == 0.0


def test_wsd_schedule():
    peak, low = 2e-3, 0.05
    config = OptimizerConfig(
        learning_rate=peak, warmup_steps=10, total_steps=100, schedule="wsd", decay_fraction=0.2, min_lr_ratio=low
    )
    steps = [0, 5, 10, 50, 80, 90, 100, 150]
    mid = peak + (low * peak - peak) * 0.5
    expected = np.array([0.0, peak / 2, peak, peak, peak, mid, low * peak, low * peak])
    assert_close("wsd schedule", expected, _values(config, steps), TOL["float32"])


def test_constant_schedule_without_warmup():
    config = OptimizerConfig(learning_rate=5e-4, warmup_steps=0, total_steps=10, schedule="constant")
    np.testing.assert_array_equal(_values(config, [0, 3, 10, 99]), np.float32(5e-4))


@pytest.fixture(scope="module")
def params():
    """A small tree with the model's parameter names (the rules go by name): matrices, norm weights, a bias."""
    shapes = {
        "embedding": {"embedding": (11, 6)},
        "blocks_0": {
            "mlstm_layer": {"qkvo_kernel": (6, 8), "if_bias": (4,), "multihead_norm": {"weight": (4,)}},
            "norm_mlstm": {"weight": (6,)},
            "ffn": {"proj_down": {"kernel": (9, 6)}},
        },
        "lm_head": {"kernel": (6, 11)},
    }
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    return jax.tree.unflatten(treedef, [1.0 + 0.1 * jax.random.normal(k, s) for k, s in zip(keys, leaves, strict=True)])


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_decay_mask(scan_blocks):
    tree = jax.eval_shape(lambda k: init_params(xLSTMLMConfig.tiny(), k, scan_blocks=scan_blocks), jax.random.key(0))
    for decay_embedding in (True, False):
        mask = decay_mask(tree, decay_embedding=decay_embedding)
        flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
        for path, decayed in flat.items():
            if "embedding" in path:
                assert decayed is decay_embedding, path
            elif "kernel" in path:
                assert decayed is True, path
            else:  # norms' weights and the gate biases
                assert path.endswith("['weight']") or path.endswith("['if_bias']"), path
                assert decayed is False, path
        # 5 matrices per block (one stacked set with scan_blocks, 2 blocks unrolled), the LM head, the embedding
        assert sum(flat.values()) == 5 * (1 if scan_blocks else 2) + 1 + decay_embedding


def test_decay_mask_rejects_unknown_names():
    with pytest.raises(ValueError, match="mystery/scale"):
        decay_mask({"mystery": {"scale": jnp.ones(3)}})


def test_weight_decay_only_on_matrices(params):
    """Zero gradients: Adam's step is 0, so only the decoupled decay moves a parameter, by -lr * wd * p."""
    lr, wd = 0.1, 0.5
    config = OptimizerConfig(learning_rate=lr, warmup_steps=0, total_steps=10, schedule="constant", weight_decay=wd)
    optimizer = make_optimizer(config)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
    new = optax.apply_updates(params, updates)
    for (path, p), q in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(new), strict=True):
        name = jax.tree_util.keystr(path)
        if "kernel" in name or "embedding" in name:
            assert_close(name, np.asarray(p, np.float64) * (1 - lr * wd), q, TOL["float32"])
        else:
            np.testing.assert_array_equal(q, p, err_msg=name)


def test_clipping_precedes_adamw(params):
    """With clipping the update equals AdamW's update of the gradient scaled to norm clip_norm."""
    config = OptimizerConfig(learning_rate=0.01, warmup_steps=0, total_steps=10, eps=1.0, clip_norm=0.5)
    keys = jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(params)))
    leaves = [3.0 * jax.random.normal(k, p.shape) for k, p in zip(keys, jax.tree.leaves(params), strict=True)]
    grads = jax.tree.unflatten(jax.tree.structure(params), leaves)
    norm = global_norm(grads)
    assert norm > 0.5
    clipped = jax.tree.map(lambda g: g * (0.5 / norm), grads)
    optimizer, unclipped = make_optimizer(config), make_optimizer(config.replace(clip_norm=None))
    got, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
    want, _ = unclipped.update(clipped, unclipped.init(params), params)
    far, _ = unclipped.update(grads, unclipped.init(params), params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close("clipped update", w, g, TOL["float32"])
    differences = [
        float(jnp.max(jnp.abs(g - f))) for g, f in zip(jax.tree.leaves(got), jax.tree.leaves(far), strict=True)
    ]
    assert max(differences) > 1e-4  # the clipping changed the update
