"""RuntimeConfig.remat: the rematerialisation choices and the jax.checkpoint policy each one gives."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from xlstm_jax.models.xlstm_parallel.runtime import Remat, RuntimeConfig


def test_remat_values_and_errors():
    assert RuntimeConfig().remat is Remat.NONE and RuntimeConfig().remat_policy() is None
    assert RuntimeConfig(remat="full").remat is Remat.FULL
    assert hash(RuntimeConfig(remat="dots")) == hash(RuntimeConfig(remat=Remat.DOTS))
    with pytest.raises(ValueError, match="remat"):
        RuntimeConfig(remat="everything")


@pytest.mark.parametrize(("remat", "saved_dots"), [("full", 0), ("dots", 1)])
def test_policies_save_what_they_say(remat, saved_dots, capsys):
    """Under the policy, the backward pass of ``tanh(x W) V`` keeps x W (a dot without batch dims) or nothing."""
    policy = RuntimeConfig(remat=remat).remat_policy()
    x, w, v = (
        jnp.asarray(np.random.default_rng(i).normal(size=s), jnp.float32)
        for i, s in enumerate([(3, 4), (4, 5), (5, 2)])
    )

    def f(w):
        return jnp.sum(jnp.tanh(x @ w) @ v)

    print_saved_residuals(jax.checkpoint(f, policy=policy), w)
    saved = capsys.readouterr().out.splitlines()
    dots = [line for line in saved if "output of dot_general" in line]
    assert len(dots) == saved_dots, saved
    np.testing.assert_array_equal(jax.grad(jax.checkpoint(f, policy=policy))(w), jax.grad(f)(w))


@pytest.fixture(scope="module")
def remat_case():
    from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
    from xlstm_jax.models.xlstm_parallel.model import xLSTMLMModel

    config = xLSTMLMConfig.tiny()
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, config.vocab_size)
    segment_ids = jnp.array([[1] * 5 + [2] * 7, [1] * 12])
    runtime = RuntimeConfig(prefill_backend_kwargs=(("chunk_size", 4),))

    params = {}  # per scan_blocks: the same tree and values with or without remat, so initialised once

    def grad(runtime):
        model = xLSTMLMModel(config, runtime)
        if runtime.scan_blocks not in params:  # jitted: eager Flax initialisation dispatches op by op
            params[runtime.scan_blocks] = jax.jit(model.init)(jax.random.key(0), ids)["params"]
        loss = lambda p: jnp.mean(model.apply({"params": p}, ids, segment_ids=segment_ids) ** 2)
        traced = jax.jit(jax.grad(loss)).trace(params[runtime.scan_blocks])  # one trace: the jaxpr and the program
        return traced.jaxpr, traced.lower().compile()(params[runtime.scan_blocks])

    return config, runtime, grad


@pytest.mark.parametrize(("remat", "scan_blocks"), [("full", False), ("dots", True)])
def test_model_blocks_are_rematerialised(remat_case, remat, scan_blocks):
    """Each block of the model runs under jax.checkpoint with the policy; the gradient is the plain one's."""
    import dataclasses

    from tests.numerics import TOL, assert_close

    config, runtime, grad = remat_case
    runtime = dataclasses.replace(runtime, scan_blocks=scan_blocks)
    jaxpr_plain, g_plain = grad(runtime)
    jaxpr, g = grad(dataclasses.replace(runtime, remat=remat))
    checkpoints = len(re.findall(r"\bremat\d*\[", str(jaxpr)))  # the backward pass of each jax.checkpoint
    assert not re.findall(r"\bremat\d*\[", str(jaxpr_plain))
    # Unrolled: one checkpoint per block; scanned: one inside the scanned body.
    assert checkpoints == (1 if scan_blocks else config.num_blocks), checkpoints
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_plain), jax.tree.leaves(g), strict=True):
        assert_close(jax.tree_util.keystr(path), np.asarray(a, np.float64), b, TOL["float32-model"])
