"""``project_split``: the fused-kernel product split into projections, in both of its forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.fixture import load, peer
from tests.numerics import TOL, assert_close
from xlstm_jax.models.xlstm_parallel.blocks import dense
from xlstm_jax.models.xlstm_parallel.blocks.dense import project_split
from xlstm_jax.models.xlstm_parallel.model import xLSTMLMModel

FORMS = {"one product per block": 1, "one product, split": 10**9}  # SPLIT_MIN_ROWS forcing each form


@pytest.mark.parametrize("form", FORMS)
def test_project_split_values_and_gradients(form, monkeypatch):
    """Each block and the gradients of x and the kernel equal the float64 product's, whichever form runs."""
    monkeypatch.setattr(dense, "SPLIT_MIN_ROWS", FORMS[form])
    sizes = (5, 3, 7)
    with jax.enable_x64(True):
        kx, kk, kw = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (2, 9, 11), jnp.float64)
        kernel = jax.random.normal(kk, (11, sum(sizes)), jnp.float64)
        weights = [
            jax.random.normal(k, (2, 9, n), jnp.float64) for k, n in zip(jax.random.split(kw, 3), sizes, strict=True)
        ]

        def loss(x, kernel):
            blocks = project_split(x, kernel, sizes, jnp.float64, jax.lax.Precision.HIGHEST)
            return sum(jnp.sum(w * b) for w, b in zip(weights, blocks, strict=True)), blocks

        (_, blocks), (dx, dk) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, kernel)
    xn, kn, wn = np.asarray(x), np.asarray(kernel), np.concatenate([np.asarray(w) for w in weights], axis=-1)
    bounds = np.cumsum((0, *sizes))
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        assert_close(f"block {n}", xn @ kn[:, a:b], blocks[n], TOL["float64"])
    assert_close("dx", wn @ kn.T, dx, TOL["float64"])
    assert_close("dkernel", np.einsum("bsk,bsn->kn", xn, wn), dk, TOL["float64"])


def test_project_split_errors():
    x, kernel = jnp.ones((2, 4)), jnp.ones((4, 6))
    with pytest.raises(ValueError, match=r"sizes=\(2, 3\) must be positive and sum to kernel.shape\[-1\]=6"):
        project_split(x, kernel, (2, 3), jnp.float32)
    with pytest.raises(ValueError, match="must be positive"):
        project_split(x, kernel, (6, 0), jnp.float32)


def test_model_is_the_same_function_in_both_forms(monkeypatch):
    """The model's logits and gradients (float64) agree whether its fused products are split or not."""
    ids = jnp.asarray(peer()["input_ids"][:, :17])

    def logits_and_grads():
        config, params, rt = load(dtype="float64", param_dtype="float64", state_dtype="float64")
        model = xLSTMLMModel(config, rt)

        def loss(p):
            logits = model.apply({"params": p}, ids[:, :-1])
            nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1))
            return nll, logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    with jax.enable_x64(True):
        runs = {}
        for form, rows in FORMS.items():
            monkeypatch.setattr(dense, "SPLIT_MIN_ROWS", rows)
            runs[form] = logits_and_grads()
    (_, split_logits), split_grads = runs["one product per block"]
    (_, fused_logits), fused_grads = runs["one product, split"]
    assert_close("logits", np.asarray(fused_logits), split_logits, TOL["float64"])
    pairs = zip(jax.tree_util.tree_leaves_with_path(fused_grads), jax.tree_util.tree_leaves(split_grads), strict=True)
    for (path, ref), out in pairs:
        assert_close(f"grad {jax.tree_util.keystr(path)}", np.asarray(ref), out, TOL["float64"])


def test_project_split_is_one_product_where_nothing_differentiates(monkeypatch):
    """From ``SPLIT_MIN_ROWS`` rows on, a call that nothing differentiates runs one product and slices its result
    (no column block of the kernel copied out); under differentiation one product per block forward, and per block
    the backward's two; the blocks are the same either way."""
    monkeypatch.setattr(dense, "SPLIT_MIN_ROWS", 1)
    sizes = (5, 3, 7)
    kx, kk = jax.random.split(jax.random.key(1))
    x, kernel = jax.random.normal(kx, (2, 9, 11)), jax.random.normal(kk, (11, sum(sizes)))

    def blocks(x, kernel):
        return project_split(x, kernel, sizes, jnp.float32, jax.lax.Precision.HIGHEST)

    def loss(x, kernel):
        out = blocks(x, kernel)
        return sum(jnp.sum(jnp.sin(b)) for b in out), out

    def products(f, *args):
        return jax.jit(f).lower(*args).as_text().count("stablehlo.dot_general")

    assert products(blocks, x, kernel) == 1
    assert products(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), x, kernel) == 3 * len(sizes)
    (_, differentiated), _ = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, kernel)
    for got, want in zip(jax.jit(blocks)(x, kernel), differentiated, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
