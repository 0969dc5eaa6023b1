"""RuntimeConfig.remat: the rematerialisation choices and the jax.checkpoint policy each one gives."""

from __future__ import annotations

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
